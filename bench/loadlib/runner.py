"""One load point, and the rate search built from load points."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import mix, procs, sipp
from .systems import Context, System

#: BENCH-NOTES failure criterion.
MIN_RATE_SHARE = 0.99
MAX_FAILED_SHARE = 0.001
MAX_RETRANS_SHARE = 0.001
#: A SIPp process at this share of one core is taken as the limit of the load generator.
GENERATOR_BUSY = 0.90
#: Other processes on the machine using more than this many cores make a point "noisy".
NOISY_OTHERS = 0.2


@dataclass
class Options:
    """Knobs of a bench run."""

    duration: float = 10.0            # seconds of load per point
    sipp_max_rate: float = 40000.0    # calls/s per SIPp instance before the rate is split
    probe_interval_ms: float = 5.0
    kamailio_children: int = 1
    keep: bool = False
    log: Callable[[str], None] = print


class Bench:
    """Holds the shared files of a run (lists, injection files) and runs load points."""

    def __init__(self, workdir: Path, opts: Options) -> None:
        self.workdir = workdir
        self.opts = opts
        self.lists = mix.write_lists(workdir / "lists")
        self.banned_probe = mix.banned_numbers()[0]
        self._inj: dict[tuple[str, int], tuple[Path, int]] = {}

    def injection(self, mix_name: str, instance: int, lines: int) -> Path:
        """The injection file of (mix, instance), regenerated longer when a point needs more lines."""
        key = (mix_name, instance)
        have = self._inj.get(key)
        if have is None or have[1] < lines:
            n = max(lines, 10000)
            path = self.workdir / "inject" / f"{mix_name}-{instance}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            mix.write_injection(path, mix_name, n, instance)
            self._inj[key] = (path, n)
        return self._inj[key][0]

    def point(self, system: System, mix_name: str, rate: float, ports: tuple[int, int]) -> dict[str, Any]:
        """Offer ``rate`` calls/s of ``mix_name`` to a freshly started ``system`` for ``duration`` s."""
        o = self.opts
        n_inst = max(1, math.ceil(rate / o.sipp_max_rate))
        rates = [rate / n_inst] * n_inst
        injections = [self.injection(mix_name, i, int(r * o.duration * 1.05) + 100) for i, r in enumerate(rates)]
        pdir = self.workdir / system.name / f"{mix_name}-{int(rate)}"
        pdir.mkdir(parents=True, exist_ok=True)
        port, trunk_port = ports
        cfg = mix.write_config(pdir / "callguard.yaml", self.lists, port, trunk_port, pdir)
        ctx = Context(pdir, port, trunk_port, self.lists, cfg, o.kamailio_children)
        res: dict[str, Any] = {"system": system.name, "mix": mix_name, "rate": rate, "duration": o.duration,
                               "sipp_instances": n_inst}
        uas = None
        running = None
        prober: subprocess.Popen[str] | None = None
        uac: sipp.UacRun | None = None
        try:
            uas = sipp.start_uas(trunk_port, pdir) if mix_name != "reject" else None
            running = system.start(ctx)
            time.sleep(0.3)   # let a just-started system settle (lazy imports, first allocations)
            cpu0 = procs.tree_cpu(running.pids())
            threads0 = procs.thread_cpu(running.pids()[0])
            ksoft = procs.kernel_threads()
            ksoft0 = sum(procs.cpu_seconds(k) for k in ksoft)
            server_tree = [q for r in running.pids() for q in procs.tree(r)]
            rq0 = procs.runqueue_wait(server_tree)
            sw0 = procs.voluntary_switches(server_tree)
            all0 = procs.all_cpu()
            loadavg0 = os.getloadavg()[0]
            uas_cpu0 = procs.cpu_seconds(uas.pid) if uas else 0.0
            kinds = "reject" if mix_name == "reject" else ("forward" if mix_name == "forward" else "reject,forward")
            # Probe the steady part only: SIPp needs a moment to read its injection file and may
            # create a catch-up burst while it starts, which is not the system's latency.
            probe_delay = min(1.0, o.duration / 4)
            probe_time = max(1.0, o.duration - probe_delay - 0.5)
            prober = subprocess.Popen([sys.executable, str(Path(__file__).with_name("prober.py")), "--port",
                                       str(port), "--duration", f"{probe_time}", "--delay", f"{probe_delay}",
                                       "--interval-ms", str(o.probe_interval_ms), "--kinds", kinds,
                                       "--banned", self.banned_probe],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            t0 = time.monotonic()
            uac = sipp.UacRun(port, rates, o.duration, injections, pdir)
            uac.start()
            # CPU shares over the load phase itself (call creation), not the drain afterwards:
            # a saturated worker shows here as ~1.0 even when retransmissions stretch the run.
            time.sleep(o.duration)
            load_wall = time.monotonic() - t0
            cpu_mid = procs.tree_cpu(running.pids())
            threads_mid = procs.thread_cpu(running.pids()[0])
            sipp_mid = [procs.cpu_seconds(p.pid) for p in uac.procs]
            uas_mid = procs.cpu_seconds(uas.pid) if uas else 0.0
            ksoft_mid = sum(procs.cpu_seconds(k) for k in ksoft)
            rq_mid = procs.runqueue_wait(server_tree)
            sw_mid = procs.voluntary_switches(server_tree)
            all_mid = procs.all_cpu()
            # Memory at the end of the load phase: transactions linger up to 64*T1 (32 s), so a point
            # shorter than that shows the growth, not the plateau.
            res["server_rss_mib"] = procs.rss_mib(server_tree)
            ours = set(server_tree) | {q.pid for q in uac.procs} | {os.getpid(), prober.pid} | set(ksoft)
            if uas:
                ours.add(uas.pid)
            # Everything else on the machine (other work sharing the cores makes a point noisy).
            others = sum(v - all0.get(q, 0.0) for q, v in all_mid.items() if q not in ours)
            results = uac.wait()
            drops = procs.udp_drops()
            res["udp_drops"] = {"system": drops.get(port, 0), "uas": drops.get(trunk_port, 0) if uas else 0,
                                "sipp": sum(drops.get(p, 0) for p in uac.ports)}
            wall = time.monotonic() - t0
            cpu1 = procs.tree_cpu(running.pids())
            names = {p: f"{procs.comm(p)}" for p in cpu1 if p > 0}
            for proc in running.procs:      # name the roots by role (decider vs kamailio, ...)
                names[proc.pid] = proc.name
            uas_cpu1 = procs.cpu_seconds(uas.pid) if uas else 0.0
            alive = running.alive()
            try:
                out, err = prober.communicate(timeout=o.duration + 15)
                probe = json.loads(out) if out.strip() else {"error": err[-500:]}
            except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                prober.kill()
                probe = {"error": str(exc)}
            res.update(self._judge(results, cpu0, cpu1, wall, probe, uas_cpu1 - uas_cpu0, alive))
            res["server_cpu_by_process"] = procs.cpu_by_name(cpu0, cpu1, names)
            # Threads of the first process during the load phase, in µs per call offered: e.g. serve's
            # event loop against its records writer.
            offered = max(1.0, rate * load_wall)
            res["load_phase_cpu_us_per_call_by_thread"] = {
                k: round((v - threads0.get(k, 0.0)) * 1e6 / offered, 2) for k, v in threads_mid.items()
                if v - threads0.get(k, 0.0) > 0}
            per_proc = {p: cpu_mid.get(p, 0.0) - cpu0.get(p, 0.0) for p in cpu_mid if p > 0}
            res["load_phase"] = {
                "seconds": round(load_wall, 2),
                "server_share": round(procs.cpu_delta(cpu0, cpu_mid) / load_wall, 3),
                "busiest_server_process_share": round(max(per_proc.values(), default=0.0) / load_wall, 3),
                "sipp_share": [round(x / load_wall, 3) for x in sipp_mid],
                "uas_share": round((uas_mid - uas_cpu0) / load_wall, 3),
                "ksoftirqd_share": round((ksoft_mid - ksoft0) / load_wall, 3),
                # Runnable but not running: the system waited for a core (contention or steal).
                "server_runqueue_wait_share": round((rq_mid - rq0) / load_wall, 3),
                # Sleeps of the server's threads (each followed by a wake-up): a server that answers a
                # burst sooner sleeps and is woken more often, and each wake-up is a context switch.
                "server_wakeups_per_s": round((sw_mid - sw0) / load_wall),
                "other_processes_share": round(others / load_wall, 3),
                "loadavg_1min_before": round(loadavg0, 2),
            }
            lp = res["load_phase"]
            res["noisy"] = lp["other_processes_share"] > NOISY_OTHERS
            lp["cores_busy"] = round(lp["server_share"] + sum(lp["sipp_share"]) + lp["uas_share"]
                                     + lp["ksoftirqd_share"] + lp["other_processes_share"], 2)
            if not res.get("sustained"):
                answered_all = (res["failed_share"] <= MAX_FAILED_SHARE and res["retrans_share"] <= MAX_RETRANS_SHARE
                                and res["udp_drops"]["system"] == 0)
                if max(lp["sipp_share"], default=0) >= GENERATOR_BUSY:
                    res["limited_by"] = "generator"
                elif answered_all:
                    # The system answered every call in time; SIPp did not create them at the rate.
                    res["limited_by"] = "generator (rate not held)"
                elif lp["cores_busy"] >= 0.95 * (os.cpu_count() or 1):
                    res["limited_by"] = "machine"
                elif lp["busiest_server_process_share"] >= GENERATOR_BUSY:
                    res["limited_by"] = "system (a server process at a full core)"
                else:
                    res["limited_by"] = "system"
        except Exception as exc:  # noqa: BLE001 - one broken point must not end the whole bench
            res.update({"sustained": False, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        finally:
            if uac is not None:
                uac.stop()
            if prober is not None and prober.poll() is None:
                prober.kill()
                prober.wait()
            if running is not None:
                running.stop()
            procs.stop(uas)
        return res

    def _judge(self, results: list[sipp.UacResult], cpu0: dict[int, float], cpu1: dict[int, float], wall: float,
               probe: dict[str, Any], uas_cpu: float, alive: bool) -> dict[str, Any]:
        created = sum(r.created for r in results)
        planned = sum(r.calls_planned for r in results)
        ok = sum(r.successful for r in results)
        failed = sum(r.failed for r in results) + max(0, planned - ok - sum(r.failed for r in results))
        retrans = sum(r.retransmissions for r in results)
        shares = [min(r.per_second_rates) / r.rate for r in results if r.per_second_rates]
        min_share = min(shares) if len(shares) == len(results) else 0.0
        probes = sum(k.get("sent", 0) for k in probe.get("kinds", {}).values())
        server_cpu = procs.cpu_delta(cpu0, cpu1)
        responses: dict[str, int] = {}
        for r in results:
            for code, n in r.responses.items():
                responses[code] = responses.get(code, 0) + n
        sipp_busy = [r.cpu_s / r.wall_s if r.wall_s else 0.0 for r in results]
        base = max(created, 1)
        sustained = (alive and min_share >= MIN_RATE_SHARE and failed / base <= MAX_FAILED_SHARE
                     and retrans / base <= MAX_RETRANS_SHARE and created >= planned)
        # Refined from the load-phase CPU shares by the caller (see ``point``).
        limit = None if sustained else "system"
        return {
            "sustained": sustained, "limited_by": limit, "alive": alive,
            "calls_planned": planned, "calls_created": created, "calls_ok": ok, "calls_failed": failed,
            "retransmissions": retrans, "min_rate_share": round(min_share, 4),
            "failed_share": failed / base, "retrans_share": retrans / base,
            "responses": dict(sorted(responses.items())),
            "response_shares": {k: round(v / max(1, sum(responses.values())), 4)
                                for k, v in sorted(responses.items()) if v},
            "unexpected_msgs": sum(r.unexpected for r in results),
            "dead_call_msgs": sum(r.dead_call_msgs for r in results),
            "server_cpu_s": round(server_cpu, 4),
            "server_cpu_us_per_call": round(server_cpu * 1e6 / (created + probes), 2) if created else None,
            "sipp_cpu_share_whole_run": [round(x, 3) for x in sipp_busy],
            "uas_cpu_share_whole_run": round(uas_cpu / wall, 3) if wall else None,
            "wall_s": round(wall, 2), "probe": probe,
            "sipp_exit_codes": [r.exit_code for r in results],
            "sipp_errors": [r.errors_tail[:300] for r in results if r.errors_tail][:2],
        }

    def search(self, system: System, mix_name: str, start: float, max_rate: float, bisect: int,
               ports: tuple[int, int], granularity: float = 500.0) -> tuple[float | None, list[dict[str, Any]]]:
        """Double the rate from ``start`` until a point fails, then bisect; the highest sustained rate."""
        points: list[dict[str, Any]] = []
        best: float | None = None
        fail: float | None = None
        rate = start
        while rate <= max_rate:
            p = self._log_point(self.point(system, mix_name, rate, ports))
            points.append(p)
            if p["sustained"]:
                best = rate
                if rate == max_rate:
                    break
                rate = min(rate * 2, max_rate)
            else:
                fail = rate
                break
        lo = best or 0.0
        for _ in range(bisect):
            if fail is None or fail - lo <= granularity:
                break
            mid = round((lo + fail) / 2 / granularity) * granularity
            if mid <= lo or mid >= fail:
                break
            p = self._log_point(self.point(system, mix_name, mid, ports))
            points.append(p)
            if p["sustained"]:
                lo, best = mid, mid
            else:
                fail = mid
        return best, points

    def _log_point(self, p: dict[str, Any]) -> dict[str, Any]:
        pr = p.get("probe", {}).get("kinds", {})
        lat = " ".join(f"{k} p50/p99 {v.get('p50_us') or 0:.0f}/{v.get('p99_us') or 0:.0f}us"
                       for k, v in pr.items())
        if "error" in p:
            self.opts.log(f"  {p['system']:<17} {p['mix']:<8} {p['rate']:>8.0f}/s  ERROR {p['error'][:300]}")
        else:
            lp = p.get("load_phase", {})
            verdict = ("ok  " if p["sustained"] else "FAIL") + (" NOISY" if p.get("noisy") else "")
            self.opts.log(f"  {p['system']:<17} {p['mix']:<8} {p['rate']:>8.0f}/s  {verdict} "
                          f"held {p['min_rate_share']:.3f} failed {p['failed_share']:.4f} "
                          f"retrans {p['retrans_share']:.4f} cpu {p['server_cpu_us_per_call'] or 0:.1f}us/call | "
                          f"cores: server {lp.get('server_share')} sipp {lp.get('sipp_share')} "
                          f"uas {lp.get('uas_share')} others {lp.get('other_processes_share')} | "
                          f"drops {p.get('udp_drops', {}).get('system')} | rss {p.get('server_rss_mib')} MiB | "
                          f"{lat} | {p['responses']}")
        return p
