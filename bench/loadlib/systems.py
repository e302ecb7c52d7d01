"""The systems under test: how each is started, checked and measured.

Every system is started by the bench for each load point (fresh rate-limit state, no leftover
transactions), listens on a free UDP port of 127.0.0.1 and forwards allowed calls to the bench
UAS.  Its CPU is the sum over its process tree (Kamailio: main process and every child; the
plug-in: Kamailio plus the decider process).
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import site
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import mix, procs

ROOT = Path(__file__).resolve().parents[2]      # the source checkout
KAMAILIO_DIR = ROOT / "config" / "kamailio"
#: Shared memory (-m), MB: tm keeps every transaction ~5 s after its final reply (wait timer), so
#: at 10k forwarded calls/s some 50k transactions with their INVITE copies live at once and 256 MB
#: runs out ("build_cell(): could not allocate shared memory"); the machine has memory to spare.
KAMAILIO_SHM_MB = "2048"


@dataclass
class Context:
    """What a system needs to start for one load point."""

    workdir: Path
    port: int                 # where the system listens
    trunk_port: int           # the bench UAS
    lists: dict[str, Path]    # blocklist, service_numbers, allowlist (callguard CSV formats)
    config: Path              # the bench's callguard YAML (same lists, ports above)
    kamailio_children: int = 1


@dataclass
class Running:
    """A started system: the roots of its process trees."""

    procs: list[procs.Proc] = field(default_factory=list)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return all(p.alive() for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            procs.stop(p)


@dataclass
class System:
    """One system: a name, a one-line description, and how to start it."""

    name: str
    description: str
    available: Callable[[], str | None]      # None when it can run, else why not
    start: Callable[[Context], Running]
    info: Callable[[], dict[str, str]] = lambda: {}
    #: The call mixes it can be measured on (the C floor answers every INVITE 403: reject only).
    paths: tuple[str, ...] = tuple(mix.MIXES)


@functools.lru_cache(maxsize=1)
def _installed_compiled_core() -> bool:
    """Whether this interpreter, without the source tree, imports an installed compiled core."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CALLGUARD_NO_EXTENSIONS")}
    probe = subprocess.run([sys.executable, "-c", "import callguard._core, callguard.sip._fastpath"], cwd="/",
                           env=env, capture_output=True, timeout=60)
    return probe.returncode == 0


def _python_env() -> dict[str, str]:
    """Environment of the Python systems: the source tree when it is built in place, else the installed
    package (after the README's install command), else the source tree with the pure-Python twin."""
    env = dict(os.environ)
    built_in_place = glob.glob(str(ROOT / "src" / "callguard" / "_core*.so"))
    if not built_in_place and _installed_compiled_core():
        env.pop("PYTHONPATH", None)
        return env
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not built_in_place:
        env["CALLGUARD_NO_EXTENSIONS"] = "1"     # no compiled core anywhere: the pure-Python twin
    return env


def core_in_use() -> str:
    """Which decision core the Python systems will use."""
    return "python" if _python_env().get("CALLGUARD_NO_EXTENSIONS") else "cython"


def _wait_healthy(run: Running, port: int, timeout: float) -> None:
    """OPTIONS answered 200 (or any final response) by the system, or raise with its log."""
    ok = procs.wait_until(lambda: not run.alive() or procs.options_ping(port, 0.3) is not None, timeout, 0.1)
    if not ok or not run.alive():
        tails = "\n".join(f"--- {p.name} ({p.log}):\n{p.log_tail()}" for p in run.procs)
        run.stop()
        raise RuntimeError(f"system did not answer OPTIONS on 127.0.0.1:{port} within {timeout:.0f} s\n{tails}")


# ------------------------------------------------------------------ uvloop responder
def _responder_start(ctx: Context) -> Running:
    p = procs.start("responder", [sys.executable, str(Path(__file__).with_name("responder.py")),
                                  "--listen", f"127.0.0.1:{ctx.port}", "--trunk", f"127.0.0.1:{ctx.trunk_port}",
                                  "--blocklist", str(ctx.lists["blocklist"])],
                    ctx.workdir / "responder.log")
    run = Running([p])
    _wait_healthy(run, ctx.port, 15)
    return run


# ------------------------------------------------------------------ the C floor
CRESPONDER_SOURCE = Path(__file__).with_name("cresponder.c")


def _c_compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def _cresponder_available() -> str | None:
    return None if _c_compiler() else "no C compiler (cc or gcc) to build bench/loadlib/cresponder.c"


def _cresponder_binary(workdir: Path) -> Path:
    """bench/loadlib/cresponder.c built into the point's work folder, unless a point before it built it there."""
    binary = workdir / "cresponder"
    if not binary.exists():
        cc = _c_compiler()
        if cc is None:
            raise RuntimeError(_cresponder_available())
        built = subprocess.run([cc, "-O2", "-o", str(binary), str(CRESPONDER_SOURCE)], capture_output=True,
                               text=True, timeout=120)
        if built.returncode != 0:
            raise RuntimeError(f"building {CRESPONDER_SOURCE.name} failed:\n{built.stderr[-2000:]}")
    return binary


def _cresponder_start(mode: str) -> Callable[[Context], Running]:
    def start(ctx: Context) -> Running:
        p = procs.start(f"cresponder-{mode}", [str(_cresponder_binary(ctx.workdir)), str(ctx.port), mode],
                        ctx.workdir / f"cresponder-{mode}.log")
        run = Running([p])
        _wait_healthy(run, ctx.port, 15)
        return run
    return start


# ------------------------------------------------------------------ callguard serve
def _serve_available() -> str | None:
    if not (ROOT / "src" / "callguard" / "sip" / "server.py").exists():
        return "src/callguard/sip/server.py is missing"
    return None


def _serve_start(ctx: Context) -> Running:
    p = procs.start("callguard-serve", [sys.executable, "-m", "callguard", "serve", "--config", str(ctx.config)],
                    ctx.workdir / "serve.log", env=_python_env(), cwd=ROOT)
    run = Running([p])
    _wait_healthy(run, ctx.port, 30)
    return run


# ------------------------------------------------------------------ Kamailio
def kamailio_binary() -> str | None:
    return shutil.which("kamailio") or ("/usr/sbin/kamailio" if os.path.exists("/usr/sbin/kamailio") else None)


def cfg_defines(cfg: Path) -> dict[str, str]:
    """``#!define NAME default`` pairs of a Kamailio config (the knobs it documents at its top)."""
    out: dict[str, str] = {}
    try:
        text = cfg.read_text()
    except OSError:
        return out
    for m in re.finditer(r"^#!(?:define|substdef)\s+(\w+)(?:\s+(.*))?$", text, re.M):
        out.setdefault(m.group(1), (m.group(2) or "").strip())
    return out


def _kamailio_argv(cfg: Path, ctx: Context, defines: dict[str, str]) -> list[str]:
    """Kamailio in the foreground with the TLSF allocator (BENCH-NOTES: the strong anchor)."""
    argv = [kamailio_binary() or "kamailio", "-f", str(cfg), "-DD", "-E", "-x", "tlsf", "-m", KAMAILIO_SHM_MB,
            "-M", "64", "-b", "4194304", "-P", str(ctx.workdir / "kamailio.pid"), "-Y", str(ctx.workdir), "-w",
            str(ctx.workdir)]
    for k, v in defines.items():
        argv += ["-A", f"{k}={v}"]
    return argv


def _q(s: str | Path) -> str:
    return f'"{s}"'


def _site_packages() -> str:
    """The running interpreter's package folders, for Kamailio's embedded Python."""
    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    return ":".join(paths)


def _kamailio_common(prefix: str, known: dict[str, str], ctx: Context) -> dict[str, str]:
    """Defines every bench Kamailio config understands: listen socket, workers, buffer, ctl socket."""
    want = {f"{prefix}LISTEN": f"udp:127.0.0.1:{ctx.port}", f"{prefix}CHILDREN": str(ctx.kamailio_children),
            f"{prefix}MAXBUFFER": "4194304", f"{prefix}CTL": _q(f"unix:{ctx.workdir}/kamailio_ctl"),
            f"{prefix}DEBUG": "1"}
    return {k: v for k, v in want.items() if k in known}


def _plugin_available() -> str | None:
    cfg = KAMAILIO_DIR / "kamailio.cfg"
    if not kamailio_binary():
        return "kamailio is not installed"
    if not cfg.exists():
        return f"{cfg.relative_to(ROOT)} is missing"
    if not (KAMAILIO_DIR / "callguard_kemi.py").exists():
        return "config/kamailio/callguard_kemi.py is missing"
    return None


def _plugin_start(ctx: Context) -> Running:
    cfg = KAMAILIO_DIR / "kamailio.cfg"
    known = cfg_defines(cfg)
    defines = _kamailio_common("CG_", known, ctx)
    sock = ctx.workdir / "decider.sock"
    run = Running()
    if "CG_SOCKET" in known:
        env = _python_env()
        decider = procs.start("decider", [sys.executable, "-m", "callguard.kamailio.daemon", "--config",
                                          str(ctx.config), "--socket", str(sock)],
                              ctx.workdir / "decider.log", env=env, cwd=ROOT)
        run.procs.append(decider)
        if not procs.wait_until(lambda: sock.exists() or not decider.alive(), 30):
            run.stop()
            raise RuntimeError(f"decider did not create {sock}: {decider.log_tail()}")
        if not decider.alive():
            run.stop()
            raise RuntimeError(f"decider exited: {decider.log_tail()}")
        defines["CG_SOCKET"] = _q(sock)
    for k, v in (("CG_CONFIG", _q(ctx.config)), ("CG_KEMI_SCRIPT", _q(KAMAILIO_DIR / "callguard_kemi.py")),
                 ("CG_PYTHONPATH", _q(_site_packages()))):
        if k in known:
            defines[k] = v
    env = _python_env()
    env["CALLGUARD_PYTHONPATH"] = _site_packages()
    run.procs.append(procs.start("kamailio", _kamailio_argv(cfg, ctx, defines), ctx.workdir / "kamailio.log",
                                 env=env, cwd=ctx.workdir))
    _wait_healthy(run, ctx.port, 30)
    return run


def _native_available() -> str | None:
    cfg = KAMAILIO_DIR / "kamailio-native.cfg"
    if not kamailio_binary():
        return "kamailio is not installed"
    if not cfg.exists():
        return f"{cfg.relative_to(ROOT)} is missing"
    return None


def _native_tables(ctx: Context) -> Path:
    """The bench's lists as db_text tables for the native script (the project's own exporter)."""
    out = ctx.workdir / "native-db"
    import subprocess

    r = subprocess.run([sys.executable, "-m", "callguard.kamailio.native_lists", "--config", str(ctx.config),
                        "--out", str(out)], env=_python_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"native_lists failed: {r.stderr[-800:]}")
    return out


def _native_start(ctx: Context) -> Running:
    cfg = KAMAILIO_DIR / "kamailio-native.cfg"
    known = cfg_defines(cfg)
    defines = _kamailio_common("CG_", known, ctx)
    values = {"CG_TRUNK": _q(f"sip:127.0.0.1:{ctx.trunk_port}"), "CG_DBURL": _q(f"text://{_native_tables(ctx)}")}
    # The shipped policy's per-minute limit, so every system rejects the same bursts.
    values.update({"CG_RATE_MAX": "10", "CG_RATE_WINDOW": "60"})
    defines.update({k: v for k, v in values.items() if k in known})
    run = Running([procs.start("kamailio", _kamailio_argv(cfg, ctx, defines), ctx.workdir / "kamailio.log",
                               cwd=ctx.workdir)])
    _wait_healthy(run, ctx.port, 30)
    return run


def _kamailio_info() -> dict[str, str]:
    import subprocess

    try:
        v = subprocess.run([kamailio_binary() or "kamailio", "-v"], capture_output=True, text=True, timeout=10)
        return {"kamailio": v.stdout.splitlines()[0] if v.stdout else "?", "allocator": "tlsf"}
    except (OSError, subprocess.SubprocessError):
        return {}


SYSTEMS: dict[str, System] = {
    "uvloop-responder": System("uvloop-responder", "bare uvloop responder (set lookup, stateless forward): "
                               "the Python I/O floor", lambda: None, _responder_start),
    "serve": System("serve", "callguard serve (built-in proxy)", _serve_available, _serve_start,
                    lambda: {"core": core_in_use()}),
    "kamailio-plugin": System("kamailio-plugin", "Kamailio -x tlsf + callguard KEMI plug-in (+ decider)",
                              _plugin_available, _plugin_start, lambda: {**_kamailio_info(), "core": core_in_use()}),
    "kamailio-native": System("kamailio-native", "Kamailio -x tlsf, native script (htable blocklist, rate "
                              "limit): the anchor", _native_available, _native_start, _kamailio_info),
    # The floor under any screening, reject path only; not in load.py's default set.
    "c-floor": System("c-floor", "C responder, blocking recvmmsg: answers every INVITE 403, screens nothing",
                      _cresponder_available, _cresponder_start("block"), paths=("reject",)),
    "c-floor-epoll": System("c-floor-epoll", "C responder, epoll + recvmmsg: answers every INVITE 403, screens "
                            "nothing", _cresponder_available, _cresponder_start("epoll"), paths=("reject",)),
}
