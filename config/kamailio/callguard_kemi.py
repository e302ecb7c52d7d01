"""Kamailio app_python3 script for callguard: finds the callguard package and hands Kamailio its routing class.

Kamailio embeds the system Python (Debian: /usr/bin/python3) with sys.path = this file's
folder plus Debian's dist-packages, so a callguard installed in a virtualenv (or pyenv)
is invisible until its folders are put on the path.  kamailio.cfg names them:

    #!define CG_PYTHONPATH "/opt/callguard/venv/lib/python3.11/site-packages"

(colon-separated; .pth files in them are honoured, so editable installs work).
`python -m callguard.kamailio` prints the value for the current environment.
When CG_PYTHONPATH is empty, $CALLGUARD_PYTHONPATH is used, and a source checkout's
``src/`` next to this file's ``config/kamailio/`` folder is found on its own.

The other defines read here: CG_CONFIG (the YAML), CG_SOCKET (the decider's socket;
empty = embedded guard, one worker only), CG_TIMEOUT_MS (wait for the decider before
failing open), CG_RECORD_ROUTE (1: record-route relayed INVITEs so BYEs come back and
calls get their end time and duration; 0: never; auto: sip.record_route in the YAML).
"""

import glob
import os
import site
import sys

import KSR  # provided by app_python3


def _define(name, default=""):
    """The value of a #!define in kamailio.cfg (or -A on the command line), quotes removed."""
    try:
        value = KSR.pv.get(f"$def({name})")
    except Exception:  # noqa: BLE001 - an old Kamailio without $def: fall back to the environment
        value = None
    if value is None:
        return os.environ.get(name, default)
    value = str(value).strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def _extend_path():
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [p for p in (_define("CG_PYTHONPATH") or os.environ.get("CALLGUARD_PYTHONPATH", "")).split(":") if p]
    checkout = os.path.normpath(os.path.join(here, "..", "..", "src"))
    first = None
    if os.path.isdir(os.path.join(checkout, "callguard")):
        # A checkout built in place wins; an unbuilt one only backs up an installed package.
        built = glob.glob(os.path.join(checkout, "callguard", "_core*.so"))
        if built:
            paths.insert(0, checkout)
            first = checkout
        else:
            paths.append(checkout)
    before = list(sys.path)
    for p in paths:
        site.addsitedir(p)   # honours .pth files (editable installs, namespace packages)
    added = [p for p in sys.path if p not in before]
    # Ours first: Debian's dist-packages may hold older numpy/yaml than the environment's.
    sys.path[:] = added + before
    if first is not None:
        # Also when PYTHONPATH had put it on the path already, behind the folders added here.
        sys.path[:] = [first] + [p for p in sys.path if p != first]


def mod_init():
    # numpy's BLAS threads would be started before Kamailio forks its workers; none are needed.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _extend_path()
    try:
        from callguard.kamailio.kemi import PluginSettings, make_handler, parse_switch

        here = os.path.dirname(os.path.abspath(__file__))
        settings = PluginSettings(
            config=_define("CG_CONFIG") or os.path.join(here, "..", "callguard.yaml"),
            socket=_define("CG_SOCKET"),
            timeout_ms=float(_define("CG_TIMEOUT_MS") or 100),
            record_route=parse_switch(_define("CG_RECORD_ROUTE", "1")),
        )
        return make_handler(KSR, settings)
    except Exception as exc:  # noqa: BLE001 - say why, then let Kamailio refuse to start
        KSR.err(f"callguard: cannot load the plug-in: {exc!r} (sys.path={sys.path!r})\n")
        raise
