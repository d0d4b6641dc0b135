"""Can an MLP's ``gate_proj`` and ``up_proj`` share one row order, and at what conditioning?

A kept-rows layer stores ``W = P^T [I; Y] Z``: ``r`` kept rows ``Z = W[R]`` and every other row
as a combination ``Y`` of them. ``bench_prefill_gathers.py`` shows that putting the outputs of
``gate_proj`` and ``up_proj`` back in order costs float32 prefill about a tenth; if both layers
kept nested row sets in one shared order, ``act(gate) * up`` could be computed unordered and
the order folded into ``down_proj``. Each layer's rows are chosen by maxvol alone today, which
keeps every entry of ``Y`` near or below 1 (well conditioned). This measures, per MLP of a
compactified SmolLM2, the largest ``|Y|`` entry of each layer:

* **alone**: the rows each layer has now (maxvol on its own left factor);
* **larger first**: the higher-rank layer keeps its maxvol rows, the other chooses its rows
  among them (maxvol on its left factor restricted to those rows);
* **smaller first**: the lower-rank layer keeps its maxvol rows, the other keeps them too and
  adds the rest by maxvol swaps that leave them in place;
* **both at once** (where the ranks are equal, so both keep the same rows): swaps that grow the
  product of the two blocks' volumes.

``compactify`` shares the rows by default since stop 38
(:func:`tensornet_llm.layers.shared_rows.shared_row_order`: *smaller first* where the ranks
differ, *both at once* where they are equal); every strategy here starts afresh from each layer's
left factor, so the figures do not depend on the rows the model holds.

    python benchmarks/diag_shared_mlp_rows.py [--keep 0.8] [--model DIR]

``--model``: a directory written by ``save_compactified`` (default: ``compactify(model,
ratio=keep)`` without calibration). Prints one line per MLP and a summary; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tensornet_llm import compactify, load_compactified
from tensornet_llm.helpers.models import load_smollm2
from tensornet_llm.layers.interpolative import InterpolativeLinear, maxvol_rows
from tensornet_llm.layers.shared_rows import extend_rows, joint_rows


def left_factor(layer: InterpolativeLinear) -> torch.Tensor:
    return layer.factors()[0].detach().double()


def largest_coefficient(u: torch.Tensor, rows: torch.Tensor) -> float:
    """``max |u u[rows]^-1|``: the largest entry of ``Y`` for kept rows ``rows``."""
    return float(torch.linalg.solve(u[rows], u, left=False).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--model", help="a save_compactified directory (default: compactify "
                        "SmolLM2 at --keep without calibration)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.model:
        model = load_compactified(args.model)
    else:
        if not 0 < args.keep < 1:
            parser.error("--keep must lie in (0, 1)")
        model, _ = load_smollm2()
        compactify(model, ratio=args.keep, progress=False)
    found = {"alone": [], "larger first": [], "smaller first": []}
    both = []  # equal ranks only: rows chosen for the two layers at once
    for name, mlp in model.named_modules():
        gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
        if not (isinstance(gate, InterpolativeLinear) and isinstance(up, InterpolativeLinear)):
            continue
        big, small = (gate, up) if gate.rank >= up.rank else (up, gate)
        u_big, u_small = left_factor(big), left_factor(small)
        rows_big, _ = maxvol_rows(u_big)
        rows_small, _ = maxvol_rows(u_small)
        alone = max(largest_coefficient(u_big, rows_big),
                    largest_coefficient(u_small, rows_small))
        inside, _ = maxvol_rows(u_small[rows_big])
        larger_first = max(largest_coefficient(u_big, rows_big),
                           largest_coefficient(u_small, rows_big[inside]))
        smaller_first = max(largest_coefficient(u_small, rows_small),
                            largest_coefficient(u_big, extend_rows(u_big, rows_small, 0.1)))
        for key, value in zip(found, (alone, larger_first, smaller_first)):
            found[key].append(value)
        at_once = ""
        if gate.rank == up.rank:
            rows = joint_rows(u_big, u_small, 0.1)
            both.append(max(largest_coefficient(u_big, rows), largest_coefficient(u_small, rows)))
            at_once = f", both at once {both[-1]:.3g}"
        print(f"{name}: ranks {gate.rank} (gate) / {up.rank} (up); largest |Y|: alone "
              f"{alone:.2f}, larger first {larger_first:.3g}, smaller first "
              f"{smaller_first:.3g}{at_once}", flush=True)
    if not found["alone"]:
        parser.error("no MLP has both gate_proj and up_proj stored as kept rows")
    for key, values in [*found.items(), ("both at once (equal ranks)", both)]:
        if values:
            print(f"{key}: median {statistics.median(values):.3g}, largest {max(values):.3g} "
                  f"over {len(values)} MLPs")


if __name__ == "__main__":
    main()
