"""callguard: SIP call screening at call setup.

The public API is :class:`Guard` (one decision per call) and its ``Verdict``.
They are imported on first use, so tools that need no decisions (``callguard
records``, the config reference) work even where the compiled core is missing.
"""

from typing import TYPE_CHECKING, Any

from .errors import CallguardError, ConfigError, InputError, ListError, SipError

if TYPE_CHECKING:
    from .guard import IMPLEMENTATION, RULE_NAMES, Guard, Verdict

__version__ = "0.1.0"

__all__ = ["Guard", "Verdict", "RULE_NAMES", "IMPLEMENTATION", "CallguardError", "ConfigError", "ListError",
           "InputError", "SipError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Guard", "Verdict", "RULE_NAMES", "IMPLEMENTATION"):
        from . import guard

        return getattr(guard, name)
    raise AttributeError(f"module 'callguard' has no attribute {name!r}")
