"""The chain benchmark's PNG: time per chain against batch size and against hidden width."""

from __future__ import annotations

import os

from harness.models import MLP_DIMS


def plot(rows: list[dict], path: str) -> str | None:
    """Time per chain against batch (MLP 100-200-200-1, one line per implementation) and against hidden width;
    returns the path, or None when there is nothing to plot or no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return None
    base = "-".join(map(str, MLP_DIMS))
    by_batch, by_width, steps = {}, {}, set()
    for r in rows:
        if r.get("median_s") is None:
            continue
        steps.add(r["n_steps"])
        name = r["impl"]
        if r["impl"] == "fused":  # say which path ran, so a fallback is never read as the fused chain
            name += f" (ran {r['backend']})" if r["backend"].endswith(":fused") else \
                f" (fell back: ran {r['backend']} step-op)"
        if r["case"] in ("mlp", "scaling-batch") and r["model"] == base:
            by_batch.setdefault(name, {})[r["batch"]] = (r["median_s"], r["min_s"], r["max_s"])
        at_1024 = r["model"] == base and r["batch"] == 1024 and r["impl"] in ("eager", "fused")
        if r["case"] == "scaling-width" or at_1024:
            by_width.setdefault(name, {})[r["width"]] = (r["median_s"], r["min_s"], r["max_s"])
    k = "K=" + ",".join(map(str, sorted(steps)))
    panels = [(by_batch, "batch size B", f"MLP {base}, {k}: time per chain"),
              (by_width, "hidden width H", f"MLP 100-H-H-1, {k}, B=1024")]
    panels = [p for p in panels if p[0]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (series, xlabel, title) in zip(axes[0], panels):
        for name, points in series.items():
            xs = sorted(points)
            line, = ax.plot(xs, [points[x][0] for x in xs], marker="o", label=name)
            ax.fill_between(xs, [points[x][1] for x in xs], [points[x][2] for x in xs], color=line.get_color(),
                            alpha=0.15, linewidth=0)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="seconds per chain (median; band: min-max)",
               title=title)
        ticks = sorted({x for points in series.values() for x in points})
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
