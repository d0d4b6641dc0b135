"""Both diagnostics of a model in one call, written to a directory: the files ``tensornet-llm
profile`` produces and the docs cite.

``profile_model`` measures the sensitivity profile (loss increase of compressing each module
alone) and the entanglement profile (entropy across every bond of every layer), then writes::

    sensitivity.json / sensitivity.txt     rows, and the table most sensitive first
    entanglement.json                      one row per bond
    sensitivity.png / entanglement.png     heatmap (blocks x module types), entropy across depth
    summary.json                           Spearman rank correlations (see below)

The correlations are over modules: the layer's mean normalised entropy against its measured
loss increase, and the Gauss-Newton prediction against the measurement.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import nn

from ..helpers.files import atomic_directory, check_output
from .entanglement import entanglement_profile, layer_entropy
from .sensitivity import profile_sensitivity, rank_correlation

__all__ = ["profile_model"]


def profile_model(
    model: nn.Module,
    calibration: Iterable[Any],
    out_dir: str | os.PathLike,
    keep: Sequence[float] = (0.5,),
    *,
    method: str = "mpo",
    n_sites: int = 3,
    cache_dir: str | os.PathLike | bool | None = None,
    progress: bool = True,
    plots: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Profile ``model`` and write the results to ``out_dir`` (atomically: a failure leaves no
    half-written directory). Returns the summary (also in ``summary.json``).

    An existing ``out_dir`` that is not a previous output of this library is refused before any
    work, unless ``overwrite=True``."""
    check_output(out_dir, overwrite)
    profile = profile_sensitivity(model, calibration, keep, method=method, n_sites=n_sites,
                                  cache_dir=cache_dir, progress=progress)
    bonds = entanglement_profile(model, method, n_sites, progress=progress)
    entropy = layer_entropy(bonds)
    smallest = min(r.keep for r in profile.rows)
    rows = [r for r in profile.rows if r.keep == smallest and r.name in entropy]
    measured = [r.delta_loss for r in rows]
    summary: dict[str, Any] = {
        "modules": len({r.name for r in profile.rows}),
        "keep": list(keep),
        "tokens": profile.tokens,
        "base_loss": profile.base_loss,
        "correlation_keep": smallest,
        "spearman_entropy_vs_sensitivity": rank_correlation([entropy[r.name] for r in rows],
                                                            measured),
    }
    predicted = [r.predicted_delta for r in rows]
    if all(p is not None for p in predicted) and rows:
        summary["spearman_predicted_vs_measured"] = rank_correlation(predicted, measured)
    most = sorted(rows, key=lambda r: -r.delta_loss)[:5]
    summary["most_sensitive"] = [(r.name, r.delta_loss) for r in most]
    with atomic_directory(Path(out_dir), overwrite) as tmp:
        (tmp / "sensitivity.json").write_text(json.dumps(profile.to_dict(), indent=1))
        (tmp / "sensitivity.txt").write_text(profile.table() + "\n")
        (tmp / "entanglement.json").write_text(json.dumps([asdict(b) for b in bonds], indent=1))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        if plots:
            from .plots import plot_entanglement, plot_sensitivity

            plot_sensitivity(profile, tmp / "sensitivity.png", keep=smallest)
            plot_entanglement(bonds, tmp / "entanglement.png")
    return summary
