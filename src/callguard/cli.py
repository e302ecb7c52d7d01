"""The ``callguard`` command line (SPEC §5).

Exit codes: 0 success / call allowed, 3 call rejected (``check``), 2 bad input or
config, 1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .config import default_config_path
from .errors import CallguardError
from .log import configure as configure_logging

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_REJECT = 3


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML config (default: $CALLGUARD_CONFIG or config/callguard.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callguard", description="SIP call screening at call setup.")
    parser.add_argument("--version", action="version", version=f"callguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the SIP screening proxy in the foreground")
    _add_config(p)
    p.add_argument("--listen", action="append", default=[], metavar="udp:HOST:PORT",
                   help="listener (repeatable; tcp: works too); replaces sip.listen from the config")
    p.add_argument("--trunk", default=None, metavar="udp:HOST:PORT", help="single trunk; replaces trunks")

    p = sub.add_parser("check", help="one verdict for one call (exit 0 allow, 3 reject, 2 bad input)")
    p.add_argument("caller", help="caller as URI or digits (empty or 'anonymous' for a hidden caller ID)")
    p.add_argument("callee", help="callee as URI or digits")
    p.add_argument("--source", default=None, metavar="IP", help="sender's IP address (default: none, "
                   "untrusted_source is not applied)")
    p.add_argument("--time", default=None, metavar="T", help="call time, ISO 8601 or epoch seconds (default: now)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config(p)

    p = sub.add_parser("replay", help="run a call log through the core and summarise per rule")
    p.add_argument("log", metavar="LOG.csv", help="CSV with time,caller,callee[,source,direction]")
    p.add_argument("--out", default=None, metavar="FILE", help="write the rows plus verdict,code,rule ('-': stdout)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress line on stderr (auto: when stderr is a terminal)")
    _add_config(p)

    p = sub.add_parser("records", help="query the call records")
    _add_config(p)
    p.add_argument("--caller", default=None)
    p.add_argument("--callee", default=None)
    p.add_argument("--rule", default=None)
    p.add_argument("--since", default=None, help="ISO 8601, epoch seconds or relative (-1h, -30d)")
    p.add_argument("--until", default=None, help="ISO 8601, epoch seconds or relative")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--prune", action="store_true", help="delete records past the retention period first")

    p = sub.add_parser("decider", help="decision service for the Kamailio plug-in (one Guard for all workers)")
    _add_config(p)
    p.add_argument("--socket", default="/run/callguard/decider.sock", metavar="PATH", help="Unix socket path")
    p.add_argument("--socket-mode", default="660", help="permissions of the socket file, octal")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reload", action="store_true", help="ask the running decider to reload, wait, report")
    g.add_argument("--stats", action="store_true", help="print the running decider's counters as JSON")
    g.add_argument("--ping", action="store_true", help="exit 0 when a decider answers on --socket")

    p = sub.add_parser("validate", help="check a config and its lists; report every broken list row")
    _add_config(p)
    return parser


def _cmd_check(args: argparse.Namespace) -> int:
    from .guard import Guard
    from .lists import parse_tz
    from .replay import TimeParser

    guard = Guard.from_config(args.config or default_config_path())
    now = None
    if args.time is not None:
        try:
            now = TimeParser(parse_tz(guard.config.lists.timezone))(args.time)
        except ValueError:
            print(f"error: --time: not ISO 8601 or epoch seconds: {args.time!r}", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.source is not None:
        import ipaddress
        try:
            ipaddress.ip_address(args.source)
        except ValueError:
            print(f"error: --source: not an IP address: {args.source!r}", file=sys.stderr)
            return EXIT_BAD_INPUT
    v = guard.check(args.caller, args.callee, source=args.source, now=now)
    if guard.faults:
        print(f"error: internal fault, failed open: {guard.last_fault!r}", file=sys.stderr)
    if args.json:
        out = v.as_dict()
        out["features"] = {name: value for name, value in v.features}
        out["shadowed"] = list(v.shadowed)
        print(json.dumps(out, ensure_ascii=False))
    else:
        text = f"{v.verdict} {v.code or '-'} {v.rule}"
        if v.reason and v.verdict == "reject":
            text += f": {v.reason}"
        if v.detail:
            text += f" ({v.detail})"
        text += f"  score={v.score:.3f} caller={v.caller or '(hidden)'} callee={v.callee or '(none)'}"
        if v.shadowed:
            text += f" shadow={','.join(v.shadowed)}"
        print(text)
    if guard.faults:
        return EXIT_INTERNAL     # the verdict printed is the fail-open one, not a decision
    return EXIT_OK if v.verdict == "allow" else EXIT_REJECT


def _cmd_replay(args: argparse.Namespace) -> int:
    from .guard import Guard
    from .replay import Output, replay

    guard = Guard.from_config(args.config or default_config_path())
    out = Output(args.out, args.log)
    summary_stream = sys.stderr if out.stream is sys.stdout else sys.stdout
    show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    try:
        summary = replay(guard, args.log, out.stream, progress=sys.stderr if show else None)
    except BaseException:
        out.abort()
        raise
    out.commit()
    for problem in summary.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(summary.format(), file=summary_stream)
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from .guard import load_lists

    cfg = config_mod.load(args.config or default_config_path())
    strict = cfg.lists.strict
    # Every broken row is listed, strict or not: strict loading stops at the first one.
    lists = load_lists(cfg, strict=False)
    for problem in lists.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if strict and lists.problems:
        print("error: lists.strict is on: the proxy refuses a list with a broken row", file=sys.stderr)
    print(f"{cfg.source_file}: ok; blocklist {len(lists.blocklist)} entries, filings {len(lists.filings)}, "
          f"allowlist {len(lists.allowlist)}; {len(lists.problems)} broken row(s) skipped")
    return EXIT_BAD_INPUT if lists.problems else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    from .records import join_time_values

    parser = build_parser()
    args = parser.parse_args(join_time_values(sys.argv[1:] if argv is None else list(argv)))
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    configure_logging("warning", "json")
    if args.command in ("serve", "records", "decider") and args.config is None:
        args.config = default_config_path()
    try:
        if args.command == "check":
            return _cmd_check(args)
        if args.command == "replay":
            return _cmd_replay(args)
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "serve":
            from .sip.server import serve_main
            return serve_main(args)
        if args.command == "records":
            from .records import records_main
            return records_main(args)
        if args.command == "decider":
            from .kamailio.daemon import run as decider_run
            return decider_run(args)
    except CallguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return EXIT_BAD_INPUT  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
