"""Cross-layer networks against the per-layer default and Basis Sharing (SmolLM2-135M).

    python benchmarks/bench_cross_layer.py [--keep 0.6 0.4 0.8] [--methods ...]
                                           [--calibration-tokens 4096] [--tokens 4096]
                                           [--heal-minutes 5]

Every method keeps the same fraction of the targeted parameters, calibrated on the same
``calibration_mix`` windows, no fine-tuning; perplexity on the held-out part of every domain:

* ``per-layer``: ``compactify(model, ratio=keep, calibration=...)``, the default (per-module
  layouts and chi chosen by the budget, block-by-block fit);
* ``cross-layer 1``: the same budget and layouts as ``per-layer``, through the cross-layer path
  with groups of one: every module fitted on the *dense* model's inputs instead of block by
  block on the compressed model's (what the cross-layer path must do), to separate that effect
  from sharing;
* ``svd-llm``: the matched low-rank control, every module at the same keep, whitened SVD
  (SVD-LLM; ``cross_layer=1``, input side), stored as two factors as published;
* ``basis-sharing``: the cross-layer control, Basis Sharing as published (arXiv 2410.03765):
  every group at the same keep; q, k, v, gate and up shared over pairs of blocks, o and down per
  layer; input basis, no sweeps (one SVD of the stacked weights whitened by the summed input
  covariance), stored as published (basis and coefficients, no kept rows);
* ``cross-layer G``: ``compactify(model, ratio=keep, calibration=..., cross_layer=G)``: the
  budget chooses per group between a cross-layer network (any side, at any size of the grid),
  per-layer networks for its members, or dense; groups fitted with two sweeps.

The row marked ``(shared bases without kept rows)`` was measured before a shared input basis
was stored as kept rows of the stacked cores (``in_rank^2`` fewer parameters per group, so the
budget priced every shared network higher than it does now).
Rows marked ``two factors`` were measured before low-rank layers were stored as kept rows
(``CompactifyConfig.interpolative``, the default since): their low-rank layers held
``r (in + out)`` parameters, not ``r (in + out - r)``, so the budget gave them lower ranks.
Rows marked ``(dense inputs)`` were measured before groups were fitted block by block: every
module was fitted on the dense model's inputs (including ``cross-layer 1``'s per-layer ones).
Rows marked ``(unweighted)`` were measured before ``CompactifyConfig.weigh_outputs`` (on by
default since): the modules compressed alone were fitted with every output feature weighted
alike; the row marked ``(shared bases unweighted)`` weighted its per-layer members but fitted
the shared input bases unweighted (the budget then chose no group).

With ``--heal-minutes M`` every method's model is then healed for ``M`` minutes of wall clock
by the default recipe (as ``bench_pareto.py``: next-token loss plus distillation from the dense
model, ``healing_mix`` batches of 4 x 256 tokens, lr 3e-4, checks on ``check_mix``), in rows
named ``<method>, healed M min`` whose compress time includes the healing.

Also written: the spectra of the cross-layer bonds: for each role, the whitened singular values
of a single layer against those of two and four stacked consecutive layers, and a plot of the
stacked energy curves against the layers' own spectra merged (no shared direction),
``bench_cross_layer_spectra.png``.
Rows are appended to ``docs/results/bench_cross_layer.json`` as they finish (a rerun skips
rows it has) and rendered to ``bench_cross_layer.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tensornet_llm import CompactifyConfig, compactify, heal
from tensornet_llm.helpers.data import calibration_mix, check_mix, healing_mix
from tensornet_llm.helpers.evaluate import perplexity_table
from tensornet_llm.helpers.models import load_smollm2

from harness import RESULTS, domain_table, held_out_row, pyplot, resume, write_results

METHODS = ["per-layer", "cross-layer 1", "svd-llm", "basis-sharing", "cross-layer 2", "cross-layer 4"]
#: Basis Sharing's grouping: q, k, v, gate, up over pairs of blocks; o and down per layer.
BASIS_SHARING_GROUPS = {"re:.*(o_proj|down_proj)": 1, "_default": 2}


def uniform_chi(model, sizes, keep: float) -> dict:
    """``chi`` per group (by its first member's exact name) so that every group keeps ``keep``
    of its parameters with a shared input basis: the uniform compression of the published
    methods (a group of one is SVD-LLM's whitened SVD)."""
    from tensornet_llm.compress.groups import find_groups
    from tensornet_llm.compress.sweeps import group_ranks
    from tensornet_llm.compress.targets import find_targets

    chi = {"_default": 1}
    for group in find_groups(find_targets(model)[0], sizes):
        out_f, in_f = group.shape
        rank, _ = group_ranks("input", in_f, out_f, len(group.names), keep)
        chi["re:" + group.names[0].replace(".", "[.]")] = rank
    return chi


def compress(model, name: str, keep: float, data):
    if name == "per-layer":
        return compactify(model, ratio=keep, calibration=data, progress=False)
    if name in ("svd-llm", "basis-sharing"):  # the published methods: uniform, no sweeps
        sizes = 1 if name == "svd-llm" else BASIS_SHARING_GROUPS
        return compactify(model, chi=uniform_chi(model, sizes, keep), calibration=data,
                          cross_layer=sizes, progress=False,
                          config=CompactifyConfig(cross_layer_side="input", sweeps=0,
                                                  interpolative=False))  # two factors
    size = int(name.split()[-1])  # ours: the budget chooses per group, sides auto, 2 sweeps
    return compactify(model, ratio=keep, calibration=data, cross_layer=size, progress=False)


def healed(model, report, dense, tokenizer, minutes: float):
    """``model`` healed in place for ``minutes`` by the default recipe (module docs)."""
    model.train()
    batches = healing_mix(tokenizer, 262144, seq_len=256, batch_size=4)
    heal(model, batches, steps=100000, lr=3e-4, warmup_steps=20, teacher=dense,
         check=check_mix(tokenizer, 2048), check_every=50, max_minutes=minutes, progress=False)
    model.eval()
    return report


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    lines = ["# Cross-layer networks, per-layer default, Basis Sharing (SmolLM2-135M, no "
             "fine-tuning)", "",
             f"Every method keeps the same fraction of the targeted parameters, calibrated on "
             f"{meta['calibration_tokens']} tokens of `calibration_mix`; perplexity on "
             f"{meta['tokens']} held-out tokens of each domain. {meta['threads']} CPU threads. "
             "Written by `benchmarks/bench_cross_layer.py`.", ""]
    order = {m: i for i, m in enumerate(METHODS)}  # earlier variants' rows after the current
    lines += domain_table(meta["dense"], sorted(
        rows, key=lambda r: (-r["keep"], order.get(r["method"], len(order)), r["method"])), {
        "method": lambda r: r["method"], "keep": lambda r: f"{r['keep']:.0%}",
        "kept": lambda r: f"{r['kept']:.1%}"})
    if meta.get("spectra"):
        lines += ["", "## How much consecutive layers share", "",
                  "Rank that holds 90% of the whitened energy (sum of squared singular values) "
                  "of one layer, and of 2 and 4 stacked consecutive layers (blocks 12-15), "
                  "against 2x and 4x the single layer's: a stacked rank well below the multiple "
                  "means the layers share input directions. The whole curves, against what the "
                  "layers would give if they shared nothing: "
                  "[bench_cross_layer_spectra.png](bench_cross_layer_spectra.png).", "",
                  "| role | 1 layer | 2 stacked (2x one) | 4 stacked (4x one) |", "|---|---|---|---|"]
        for role, ranks in meta["spectra"].items():
            lines.append(f"| {role} | {ranks['1']} | {ranks['2']} ({2 * ranks['1']}) | "
                         f"{ranks['4']} ({4 * ranks['1']}) |")
    write_results(out, "bench_cross_layer", meta, rows, lines)


ROLES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
CURVE_POINTS = 64


def spectra(model, batches) -> tuple[dict, dict]:
    """Per role (blocks 12-15): the rank holding 90% of the whitened energy of 1, 2 and 4
    stacked layers; and for 2 and 4 layers the cumulative energy against rank, stacked (what a
    shared basis sees) and with the layers' own spectra merged (what it would see if they
    shared no input direction), at ``CURVE_POINTS`` ranks."""
    from tensornet_llm.compress.calibrate import as_batches, collect_covariances
    from tensornet_llm.compress.sweeps import stacked_spectrum

    names = {r: [f"model.layers.{b}.{r}" for b in range(12, 16)] for r in ROLES}
    modules = {n: model.get_submodule(n) for ns in names.values() for n in ns}
    collector = collect_covariances(model, as_batches(batches), modules)
    ranks, curves = {}, {}
    for role, ns in names.items():
        ranks[role], curves[role] = {}, {}
        for g in (1, 2, 4):
            weights, covs = [modules[n].weight for n in ns[:g]], [collector.covariance(n)
                                                                  for n in ns[:g]]
            s = stacked_spectrum(weights, covs)
            energy = (s ** 2).cumsum(0) / (s ** 2).sum()
            ranks[role][str(g)] = int((energy < 0.9).sum()) + 1
            if g == 1:
                continue
            # The same whitening (the summed covariance), each layer alone: no shared direction.
            alone = torch.cat([stacked_spectrum(weights[i:i + 1], [sum(covs)]) for i in range(g)])
            alone = alone.sort(descending=True).values
            separate = (alone ** 2).cumsum(0) / (alone ** 2).sum()
            at = torch.linspace(0, len(s) - 1, CURVE_POINTS).round().long()
            curves[role][str(g)] = {"rank": (at + 1).tolist(),
                                    "stacked": [round(float(v), 4) for v in energy[at]],
                                    "separate": [round(float(v), 4) for v in separate[at]]}
    return ranks, curves


def plot_spectra(path: Path, curves: dict) -> None:
    """One panel per role: cumulative whitened energy against rank, stacked against separate."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(2.6 * len(curves), 3.0), sharey=True)
    for ax, (role, by_group) in zip(axes, curves.items()):
        for g, colour in (("2", "tab:blue"), ("4", "tab:red")):
            c = by_group[g]
            ax.plot(c["rank"], c["stacked"], color=colour, label=f"{g} layers, stacked")
            ax.plot(c["rank"], c["separate"], color=colour, linestyle="--",
                    label=f"{g} layers, nothing shared")
        ax.set_title(role.split(".")[-1], fontsize=9)
        ax.set_xlabel("rank of the shared basis", fontsize=8)
        ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylabel("whitened energy kept")
    axes[0].legend(fontsize=6, loc="lower right")
    fig.suptitle("How much consecutive layers share (SmolLM2-135M, blocks 12-15): a stacked "
                 "curve above its dashed one means shared input directions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.6, 0.4, 0.8])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--heal-minutes", type=float, default=0.0,
                        help="heal every model this long after compressing (0: no healing)")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    meta = {"tokens": args.tokens, "calibration_tokens": args.calibration_tokens,
            "threads": torch.get_num_threads()}
    meta, rows = resume(args.out / "bench_cross_layer.json", meta, args.fresh, parser)
    data = calibration_mix(tokenizer, args.calibration_tokens, seq_len=512)
    args.out.mkdir(parents=True, exist_ok=True)
    if "spectra" not in meta or "spectra_curves" not in meta:
        meta["spectra"], meta["spectra_curves"] = spectra(model, data)
        print("spectra", json.dumps(meta["spectra"]), flush=True)
    plot_spectra(args.out / "bench_cross_layer_spectra.png", meta["spectra_curves"])
    if "dense" not in meta:
        meta["dense"] = perplexity_table(model, tokenizer, args.tokens)
        print("dense", json.dumps(meta["dense"]), flush=True)
        write(args.out, meta, rows)
    suffix = f", healed {args.heal_minutes:g} min" if args.heal_minutes else ""

    def run(student, name: str, keep: float):
        report = compress(student, name, keep, data)
        return healed(student, report, model, tokenizer, args.heal_minutes) if suffix else report

    for keep in args.keep:
        for name in args.methods:
            if any((r["method"], r["keep"]) == (name + suffix, keep) for r in rows):
                continue
            rows.append({"method": name + suffix, "keep": keep, **held_out_row(
                lambda student: run(student, name, keep), tokenizer, args.tokens,
                meta["dense"])})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "choices"}), flush=True)
            write(args.out, meta, rows)
    write(args.out, meta, rows)


if __name__ == "__main__":
    main()
