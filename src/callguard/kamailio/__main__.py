"""Print the folders Kamailio's embedded Python needs to import callguard (the CG_PYTHONPATH define)."""

import site
import sys
from pathlib import Path

import callguard


def main() -> int:
    package_parent = str(Path(callguard.__file__).resolve().parent.parent)
    paths = [package_parent] + [p for p in site.getsitepackages() if p != package_parent]
    print(":".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
