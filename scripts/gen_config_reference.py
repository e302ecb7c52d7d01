"""Regenerate the configuration reference in README.md from the options table in config.py."""

import os
import re
import sys
from pathlib import Path

os.environ.setdefault("CALLGUARD_NO_EXTENSIONS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from callguard.config import markdown_reference  # noqa: E402

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text(encoding="utf-8")
begin, end = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
new = f"{begin}\n{markdown_reference()}{end}"
text, n = re.subn(re.escape(begin) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
if n != 1:
    sys.exit("README.md lacks the config-reference markers")
readme.write_text(text, encoding="utf-8")
