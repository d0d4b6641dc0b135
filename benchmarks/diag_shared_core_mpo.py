"""Why the shared-core MPO (MPOBERT, arXiv 2303.16753) is not offered as a cross-layer network:
for groups of consecutive same-role layers of SmolLM2, the data-aware output error of an MPO
whose central core is shared by the group (outer cores per layer), fitted by L-BFGS, against
the networks ``compactify`` offers at the same parameter count: the cross-layer tree
(``fit_group``, best side, two sweeps), each layer's own whitened low-rank cut (SVD-LLM), and
each layer's own 3-site MPO (site-whitened start, then ``fit_weighted``), which separates what
the sharing costs from what the MPO form costs.

    python benchmarks/diag_shared_core_mpo.py [--keep 0.5] [--group 2] [--first-block 12]
                                              [--steps 200] [--calibration-tokens 4096]

Every layer of a group is a 3-site MPO ``W_l[o1 o2 o3, i1 i2 i3] = A_l[o1, i1, a] C[a, o2, i2, b]
B_l[b, o3, i3]`` with the library's default site shapes; ``C`` is shared, ``A_l`` and ``B_l`` are
the layer's own. The bonds are the largest within the budget (at most ``o1 i1`` and ``o3 i3``).
The fit starts from the TT-SVD of the group's mean weight (whitened site by site by the summed
covariance)
and minimises ``sum_l tr(E_l S_l E_l^T)`` with each layer's own input covariance ``S_l`` from
``calibration_mix`` through the dense model. Prints one line per role: relative output error of
the group (``sqrt(sum_l tr(E_l S_l E_l^T) / sum_l tr(W_l S_l W_l^T))``) for each network;
writes nothing.
"""

from __future__ import annotations

import argparse
import math

import torch

from tensornet_llm.compress.calibrate import as_batches, collect_covariances
from tensornet_llm.compress.budget import chi_for_params
from tensornet_llm.compress.fit import (
    fit_weighted, kronecker_whitened, stable_cholesky, whitened_svd,
)
from tensornet_llm.compress.mpo_sweeps import _chain
from tensornet_llm.compress.sweeps import fit_group, group_parameters, group_ranks
from tensornet_llm.helpers.data import calibration_mix
from tensornet_llm.helpers.models import load_smollm2
from tensornet_llm.layers.layout import Layout
from tensornet_llm.layers.mpo import MPOLinear

ROLES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def group_error(weights, fits, covs) -> float:
    num = sum(float(((w - f) @ c * (w - f)).sum()) for w, f, c in zip(weights, fits, covs))
    return math.sqrt(num / sum(float((w @ c * w).sum()) for w, c in zip(weights, covs)))


def shared_core_bond(out_shape, in_shape, group: int, budget: float) -> int:
    """The largest equal bond ``r`` (both inner bonds) whose shared-core MPO fits ``budget``."""
    (o1, o2, o3), (i1, i2, i3) = out_shape, in_shape
    top = min(o1 * i1, o3 * i3)
    return max(r for r in range(1, top + 1)
               if o2 * i2 * r * r + group * (o1 * i1 + o3 * i3) * r <= budget)


def fit_shared_core(weights, covs, out_shape, in_shape, rank: int, steps: int) -> list:
    """The group's fitted weights (see the module docs)."""
    mean = sum(weights) / len(weights)
    probe = MPOLinear(mean.shape[1], mean.shape[0], rank, 3, in_shape=in_shape,
                      out_shape=out_shape, device="meta")
    start = kronecker_whitened(probe, mean, sum(covs))  # TT-SVD of the mean, site-whitened
    if start is None:
        start = MPOLinear.from_weight(mean, None, rank, 3, in_shape=in_shape, out_shape=out_shape)
    a0, c0, b0 = (core.detach().double() for core in start.cores)
    shared = c0.clone().requires_grad_(True)
    own = [(a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)) for _ in weights]
    params = [shared] + [t for pair in own for t in pair]
    factors = [stable_cholesky(c) for c in covs]
    scale = sum(float(((w @ f) ** 2).sum()) for w, f in zip(weights, factors))

    def fits():
        return [_chain([a, shared, b], out_shape, in_shape) for a, b in own]

    def loss():
        return sum((((w - f) @ l) ** 2).sum() for w, f, l in zip(weights, fits(), factors)) / scale

    optimizer = torch.optim.LBFGS(params, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        return fits()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--group", type=int, default=2)
    parser.add_argument("--first-block", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    blocks = range(args.first_block, args.first_block + args.group)
    names = {r: [f"model.layers.{b}.{r}" for b in blocks] for r in ROLES}
    modules = {n: model.get_submodule(n) for ns in names.values() for n in ns}
    data = calibration_mix(tokenizer, args.calibration_tokens, seq_len=512)
    collector = collect_covariances(model, as_batches(data), modules)
    print(f"blocks {blocks.start}-{blocks.stop - 1}, keep {args.keep:.0%} of the group's "
          "parameters; relative output error of the group (lower is better)", flush=True)
    for role, ns in names.items():
        weights = [modules[n].weight.detach().double() for n in ns]
        covs = [collector.covariance(n).double() for n in ns]
        out_f, in_f = weights[0].shape
        g = len(weights)
        budget = args.keep * g * out_f * in_f
        probe = MPOLinear(in_f, out_f, 1, 3, device="meta")
        out_shape, in_shape = tuple(probe.out_shape), tuple(probe.in_shape)
        rank = shared_core_bond(out_shape, in_shape, g, budget)
        shared = fit_shared_core(weights, covs, out_shape, in_shape, rank, args.steps)
        low_rank = math.floor(args.keep * out_f * in_f / (out_f + in_f))
        alone = [whitened_svd(w, c, low_rank) for w, c in zip(weights, covs)]
        chi = chi_for_params(Layout(MPOLinear, 3), in_f, out_f, None,
                             int(args.keep * out_f * in_f))
        own = []
        for w, c in zip(weights, covs):
            layer = (kronecker_whitened(MPOLinear(in_f, out_f, chi, 3, device="meta"), w, c)
                     or MPOLinear.from_weight(w, None, chi, 3))
            fit_weighted(layer, w, c, steps=args.steps)
            own.append(layer.to_dense().detach().double())
        tree = {}
        for side in ("input", "output", "both"):
            in_rank, out_rank = group_ranks(side, in_f, out_f, g, args.keep)
            fit = fit_group(weights, covs, side=side, in_rank=in_rank, out_rank=out_rank)
            tree[side] = (fit.history[-1], group_parameters(side, in_f, out_f, g, in_rank,
                                                             out_rank))
        side = min(tree, key=lambda s: tree[s][0])
        shared_params = (math.prod(out_shape[1:2] + in_shape[1:2]) * rank * rank
                         + g * (out_shape[0] * in_shape[0] + out_shape[2] * in_shape[2]) * rank)
        print(f"{role:16s} shared-core MPO (bond {rank}, {shared_params / (g * out_f * in_f):.0%})"
              f" {group_error(weights, shared, covs):.3f}   tree ({side}, "
              f"{tree[side][1] / (g * out_f * in_f):.0%}) {tree[side][0]:.3f}   "
              f"low rank per layer (rank {low_rank}) {group_error(weights, alone, covs):.3f}   "
              f"MPO per layer (chi {chi}) {group_error(weights, own, covs):.3f}",
              flush=True)


if __name__ == "__main__":
    main()
