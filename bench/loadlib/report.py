"""Summaries of a bench run: per-system figures, ratios against the native anchor, table, plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ANCHOR = "kamailio-native"


def _at(points: list[dict[str, Any]], mix: str, rate: float) -> dict[str, Any] | None:
    for p in points:
        if p["mix"] == mix and p["rate"] == rate and "error" not in p:
            return p
    return None


def summarise(system: str, max_rates: dict[str, float | None], points: list[dict[str, Any]],
              fixed_rates: list[float]) -> dict[str, Any]:
    """The headline figures of one system from its load points."""
    s: dict[str, Any] = {"system": system, "max_sustained": max_rates, "limited_by": {}, "cpu_us_per_call": {},
                         "latency_us": {}}
    for mix, best in max_rates.items():
        tried = [p for p in points if p["mix"] == mix and "stage" not in p]
        above = sorted((p for p in tried if not p.get("sustained") and (best is None or p["rate"] > best)),
                       key=lambda p: p["rate"])
        # The failure closest above the best rate says what stopped the system.
        s["limited_by"][mix] = (above[0].get("limited_by") or "error") if above else "max rate tried"
    s["noisy_points"] = sum(1 for p in points if p.get("noisy"))
    # How the calls ended at the first sustained point of each mix (a check of the decisions).
    s["response_shares"] = {}
    for mix in max_rates:
        first = next((p for p in points if p["mix"] == mix and p.get("sustained")), None)
        if first is not None:
            s["response_shares"][mix] = first.get("response_shares")
    s["points"] = len(points)
    for path in ("reject", "forward"):
        for rate in fixed_rates:
            p = _at(points, path, rate)
            if p is not None:
                s["cpu_us_per_call"][f"{path}@{int(rate)}"] = {
                    "us": p.get("server_cpu_us_per_call"), "sustained": p.get("sustained")}
                k = p.get("probe", {}).get("kinds", {}).get(path, {})
                s["latency_us"][f"{path}@{int(rate)}"] = {"p50": k.get("p50_us"), "p99": k.get("p99_us"),
                                                          "sustained": p.get("sustained")}
    return s


def ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each system's figures divided by the native Kamailio anchor's (throughput: higher is better;
    CPU per call: lower is better)."""
    anchor = summaries.get(ANCHOR)
    out: dict[str, dict[str, float | None]] = {}
    if anchor is None:
        return out
    for name, s in summaries.items():
        r: dict[str, float | None] = {}
        for mix, best in s["max_sustained"].items():
            a = anchor["max_sustained"].get(mix)
            r[f"max_sustained.{mix}"] = round(best / a, 3) if best and a else None
        for key, v in s["cpu_us_per_call"].items():
            av = anchor["cpu_us_per_call"].get(key, {})
            a = av.get("us")
            # Only sustained points compare: an overloaded system spends its CPU on retransmissions.
            both = v.get("sustained") and av.get("sustained")
            r[f"cpu_us_per_call.{key}"] = round(v["us"] / a, 3) if both and v.get("us") and a else None
        out[name] = r
    return out


def _f(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(summaries: dict[str, dict[str, Any]], rat: dict[str, dict[str, float | None]],
          fixed_rates: list[float]) -> str:
    """A plain-text table (Markdown-compatible) of the headline figures."""
    mixes = sorted({m for s in summaries.values() for m in s["max_sustained"]})
    head = ["system"] + [f"max {m} c/s" for m in mixes]
    for rate in fixed_rates:
        k = int(rate)
        head += [f"rej p50/p99 us @{k // 1000}k", f"cpu us/call rej@{k // 1000}k", f"fwd@{k // 1000}k"]
    head += ["vs native (max, cpu rej)", "noisy pts"]
    rows = [head]
    for name, s in summaries.items():
        row = [name]
        for m in mixes:
            best = s["max_sustained"].get(m)
            lim = s["limited_by"].get(m)
            tag = {"generator": " (gen)", "generator (rate not held)": " (gen)", "machine": " (cores)",
                   "error": " (err)"}.get(lim or "", "")
            row.append(_f(best) + tag)
        for rate in fixed_rates:
            k = int(rate)
            lat = s["latency_us"].get(f"reject@{k}", {})
            star = "" if lat.get("sustained", True) else "*"
            row.append(f"{_f(lat.get('p50'))}/{_f(lat.get('p99'))}{star}" if lat else "-")
            for path in ("reject", "forward"):
                c = s["cpu_us_per_call"].get(f"{path}@{k}", {})
                star = "" if c.get("sustained", True) else "*"
                row.append(_f(c.get("us"), "{:.1f}") + star if c else "-")
        r = rat.get(name, {})
        mx = r.get(f"max_sustained.{mixes[0]}") if mixes else None
        # CPU ratio at the highest fixed rate both this system and the anchor sustained.
        cp_txt = "-"
        for rate in sorted(fixed_rates, reverse=True):
            cp = r.get(f"cpu_us_per_call.reject@{int(rate)}")
            if cp:
                cp_txt = f"{cp:.2f}x@{int(rate) // 1000}k"
                break
        row.append(f"{_f(mx, '{:.2f}')}x, {cp_txt}")
        row.append(f"{s.get('noisy_points', 0)}/{s.get('points', 0)}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot(points: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Probe latency (p50 and p99) against offered load, one line per system, reject and forward probes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5), sharey=True)
    systems = sorted({p["system"] for p in points})
    colors = {s: c for s, c in zip(systems, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"))}
    for ax, kind in zip(axes, ("reject", "forward")):
        for s in systems:
            pts = sorted((p for p in points if p["system"] == s and "error" not in p
                          and p.get("probe", {}).get("kinds", {}).get(kind, {}).get("p50_us") is not None
                          and p["mix"] in ("mixed", kind)), key=lambda p: (p["mix"] != "mixed", p["rate"]))
            for mix, style in (("mixed", "-"), (kind, ":")):
                sel = sorted((p for p in pts if p["mix"] == mix), key=lambda p: p["rate"])
                if not sel:
                    continue
                x = [p["rate"] / 1000 for p in sel]
                p50 = [p["probe"]["kinds"][kind]["p50_us"] for p in sel]
                p99 = [p["probe"]["kinds"][kind]["p99_us"] for p in sel]
                ax.plot(x, p50, style, marker="o", color=colors[s], label=f"{s} {mix} p50")
                ax.plot(x, p99, style, marker="^", color=colors[s], alpha=0.6, label=f"{s} {mix} p99")
                for xi, yi, p in zip(x, p99, sel):
                    if not p.get("sustained"):
                        ax.annotate("x", (xi, yi), color="red", ha="center", va="center", fontsize=12)
        ax.set_yscale("log")
        ax.set_xlabel("offered load (k calls/s)")
        ax.set_title(f"{kind} probe: INVITE to final response")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (us, kernel timestamps)")
    handles, labels = axes[0].get_legend_handles_labels()
    seen = set(labels)
    for h, lab in zip(*axes[1].get_legend_handles_labels()):
        if lab not in seen:
            handles.append(h)
            labels.append(lab)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.suptitle(title + "  (x: point not sustained)")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
