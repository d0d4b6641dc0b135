"""The one plot shape the benchmarks draw: perplexity curves on a log axis, dense as a line."""

from __future__ import annotations

from pathlib import Path

Series = dict[str, list[tuple[float, float]]]


def perplexity_plot(path: Path, series: Series, dense: float, xlabel: str, title: str = "",
                    invert_x: bool = False, extra_lines: dict[str, float] | None = None) -> None:
    """Write a PNG of ``{label: [(x, perplexity)]}``; silently skipped without matplotlib."""
    perplexity_panels(path, {title: (series, dense)}, xlabel, invert_x=invert_x,
                      extra_ratios={k: v / dense for k, v in (extra_lines or {}).items()})


def perplexity_panels(path: Path, panels: dict[str, tuple[Series, float]], xlabel: str,
                      invert_x: bool = False, extra_ratios: dict[str, float] | None = None,
                      max_ratio: float | None = None) -> None:
    """One panel per ``{title: (series, dense perplexity)}``, side by side, same colours.

    ``extra_ratios``: dotted reference lines at ``ratio * dense``; ``max_ratio``: clip the y axis
    at that multiple of dense, naming in the title the series that lie wholly above it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, (series, dense)) in zip(axes[0], panels.items()):
        hidden = []
        for i, (label, points) in enumerate(series.items()):
            points = sorted(points)
            if not points:
                continue
            if max_ratio is not None and min(p[1] for p in points) > max_ratio * dense:
                hidden.append(label)
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                    color=colours[i % len(colours)])
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
        for label, ratio in (extra_ratios or {}).items():
            ax.axhline(ratio * dense, color="grey", linestyle=":", linewidth=1, label=label)
        ax.set_yscale("log")
        if max_ratio is not None:
            ax.set_ylim(top=max_ratio * dense)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out perplexity")
        if hidden:
            title = f"{title}\n(above {max_ratio:g}x dense, not drawn: {', '.join(hidden)})"
        if title:
            ax.set_title(title, fontsize=10)
        if invert_x:
            ax.invert_xaxis()
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
