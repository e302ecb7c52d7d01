"""callguard: SIP call screening at call setup.

The public API is :class:`Guard` (one decision per call) and its ``Verdict``.
"""

from .errors import CallguardError, ConfigError, InputError, ListError, SipError
from .guard import IMPLEMENTATION, RULE_NAMES, Guard, Verdict

__version__ = "0.1.0"

__all__ = ["Guard", "Verdict", "RULE_NAMES", "IMPLEMENTATION", "CallguardError", "ConfigError", "ListError",
           "InputError", "SipError", "__version__"]
