"""PNG plots of the profiles (matplotlib, drawn off-screen).

* :func:`plot_sensitivity`: heatmap of the loss increase, blocks (rows) by module type (columns).
* :func:`plot_entanglement`: mean normalised entanglement entropy per layer across depth, one
  line per module type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import ArgumentError, MissingDependencyError
from .entanglement import EntanglementRow
from .sensitivity import SensitivityProfile

__all__ = ["plot_sensitivity", "plot_entanglement", "block_grid"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("plotting needs matplotlib: pip install 'tensornet-llm[plots]'") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def block_grid(rows: Sequence, value: str) -> tuple[list[str], list[str], list[list[float | None]]]:
    """``(blocks, module types, grid[block][type])`` of the mean of ``value`` over the rows in
    each cell; blocks and types in first-seen order (forward order for profiles)."""
    blocks: list[str] = []
    kinds: list[str] = []
    cells: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        block = r.block if r.block is not None else "(outside blocks)"
        if block not in blocks:
            blocks.append(block)
        if r.module_type not in kinds:
            kinds.append(r.module_type)
        cells.setdefault((block, r.module_type), []).append(float(getattr(r, value)))
    grid = [[(sum(v) / len(v)) if (v := cells.get((b, k))) else None for k in kinds]
            for b in blocks]
    return blocks, kinds, grid


def _block_label(block: str) -> str:
    return block.rsplit(".", 1)[-1] if block.rsplit(".", 1)[-1].isdigit() else block


def plot_sensitivity(profile: SensitivityProfile, path: str | os.PathLike,
                     keep: float | None = None) -> Path:
    """Heatmap of ``delta_loss`` (blocks x module types) at one keep fraction (default: the
    smallest profiled). Colour is logarithmic; cells where the loss fell are drawn at the
    bottom of the scale."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    keeps = sorted({r.keep for r in profile.rows})
    if not keeps:
        raise ArgumentError("the profile has no rows")
    keep = keeps[0] if keep is None else keep
    rows = [r for r in profile.rows if abs(r.keep - keep) < 1e-9]
    if not rows:
        raise ArgumentError(f"keep={keep} is not in the profile; profiled: {keeps}")
    blocks, kinds, grid = block_grid(rows, "delta_loss")
    positive = [v for line in grid for v in line if v is not None and v > 0]
    floor = min(positive) if positive else 1e-6
    data = [[max(v, floor) if v is not None else float("nan") for v in line] for line in grid]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(kinds), 1.5 + 0.22 * len(blocks)))
    image = ax.imshow(data, aspect="auto", cmap="magma", norm=LogNorm(vmin=floor,
                      vmax=max(positive) if positive else 1.0))
    ax.set_xticks(range(len(kinds)), kinds, rotation=40, ha="right")
    ax.set_yticks(range(len(blocks)), [_block_label(b) for b in blocks])
    ax.set_ylabel("block")
    ax.set_title(f"loss increase, one module at keep {keep:.0%} ({profile.method})")
    fig.colorbar(image, ax=ax, label="delta loss (nats/token)")
    return _save(fig, plt, path)


def plot_entanglement(rows: Sequence[EntanglementRow], path: str | os.PathLike) -> Path:
    """Mean normalised entanglement entropy of each layer across depth, per module type."""
    plt = _pyplot()
    if not rows:
        raise ArgumentError("no entanglement rows to plot")
    blocks, kinds, grid = block_grid(rows, "entropy")
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, kind in enumerate(kinds):
        xs = [i for i in range(len(blocks)) if grid[i][j] is not None]
        ax.plot(xs, [grid[i][j] for i in xs], marker="o", markersize=3, label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("normalised entanglement entropy")
    ax.set_title(f"entanglement across depth ({rows[0].method})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
