"""What calibration measured and what it fitted, as a markdown table and a plot.

The table has one row per (table, bin, K): trials, mean paired loss with its 95 % interval, the upper
bound the fit used, and whether that K is within the budget; the fitted tables follow. The plot (one
panel per table, needs matplotlib) draws each bin's mean loss against K with its interval and the
budget line, and marks the K each bin was granted.
"""

from __future__ import annotations

from pathlib import Path

from .fit import Fit

__all__ = ["markdown", "plot", "tiers_text"]


def _bin(lo: float, hi: float) -> str:
    return f"{lo:.3g} - {hi:.3g}"


def tiers_text(fit: Fit, table: str) -> str:
    """A table in the daemon's flag syntax (similarity:fraction, best first; composed: object x background)."""
    tiers = fit.table(table)
    if not tiers:
        return "(grants nothing)"
    if table == "composed":
        return ", ".join(f"obj >= {o:.3g} & bg >= {b:.3g}: {f:.2f}" for o, b, f in tiers)
    return ",".join(f"{s:.3g}:{f:.2f}" for s, f in tiers)


def markdown(fit: Fit, summary: str = "") -> str:
    """The report; `summary`: a line about what was sampled (Measurement.summary)."""
    lines = [summary, ""] if summary else []
    lines += [f"Budget: loss <= {fit.max_loss:g} points, upper bound at {fit.confidence:.0%} confidence; "
              f"N = {fit.total_steps}.", "",
              "| table | similarity | background similarity | K | trials | mean loss ± 95 % CI | upper bound "
              "| within |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for s in fit.stats:
        bg = _bin(s.background_low, s.background_high) if s.table == "composed" else "-"
        lines.append(f"| {s.table} | {_bin(s.low, s.high)} | {bg} | {s.k} | {s.n} | {s.mean:+.2f} ± {s.ci95:.2f} | "
                     f"{s.upper:+.2f} | {'yes' if s.within else 'no'} |")
    lines += ["", "| table | fitted tiers |", "|---|---|"]
    lines += [f"| {t} | {tiers_text(fit, t)} |" for t in ("whole", "composed", "partial_object", "partial_background")]
    return "\n".join(lines) + "\n"


def plot(fit: Fit, path: str | Path) -> Path | None:
    """Write the plot to `path`; None (and no file) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    tables = [t for t in ("whole", "composed", "partial_object", "partial_background")
              if any(s.table == t for s in fit.stats)]
    fig, axes = plt.subplots(1, max(1, len(tables)), figsize=(4.5 * max(1, len(tables)), 3.6), squeeze=False)
    for ax, table in zip(axes[0], tables, strict=False):
        rows = [s for s in fit.stats if s.table == table and s.n >= 2]
        for key in sorted({(s.low, s.background_low) for s in rows}):
            mine = sorted((s for s in rows if (s.low, s.background_low) == key), key=lambda s: s.k)
            label = f"{key[0]:.3g}" + (f" x {key[1]:.3g}" if table == "composed" else "")
            line = ax.errorbar([s.k for s in mine], [s.mean for s in mine], yerr=[s.ci95 for s in mine],
                               marker="o", ms=3, capsize=2, label=label)
            k = fit.granted[table].get(key, 0)
            if k:
                ax.axvline(k, color=line[0].get_color(), ls=":", lw=1)
        ax.axhline(fit.max_loss, color="k", lw=1)
        ax.set_title(table)
        ax.set_xlabel("K (steps skipped)")
        ax.set_ylabel("paired loss (points)")
        ax.legend(fontsize=6, title="similarity from", title_fontsize=6)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
