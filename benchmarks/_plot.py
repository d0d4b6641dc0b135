"""The one plot shape the benchmarks draw: perplexity curves on a log axis, dense as a line."""

from __future__ import annotations

from pathlib import Path


def perplexity_plot(path: Path, series: dict[str, list[tuple[float, float]]], dense: float,
                    xlabel: str, title: str = "", invert_x: bool = False,
                    extra_lines: dict[str, float] | None = None) -> None:
    """Write a PNG of ``{label: [(x, perplexity)]}``; silently skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    for label, y in (extra_lines or {}).items():
        ax.axhline(y, color="grey", linestyle=":", linewidth=1, label=label)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out perplexity")
    if title:
        ax.set_title(title)
    if invert_x:
        ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
