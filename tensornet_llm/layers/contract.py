"""Pure contraction functions for tensor-network linear maps.

Nothing here owns parameters: a :class:`NetworkSpec` describes which legs every core has, and
the functions contract an input (or nothing, to rebuild the dense weight) with a list of cores.

Two strategies compute ``y = x W^T`` for a batch of ``B`` rows:

``"network"``
    one fused einsum of the input with all cores, ``x[b, i_1..i_N] * cores -> y[b, o_1..o_N]``;
    its FLOPs grow with ``B`` times the bond dimensions.
``"dense"``
    contract the cores alone into ``W[o_1..o_N, i_1..i_N]`` (cost independent of ``B``), then one
    matmul of ``2 * B * in * out`` FLOPs.

Each einsum's contraction order is chosen once by opt_einsum (``optimize="dp"``) and cached as a
``ContractExpression`` per ``(spec, batch bucket)``; buckets are powers of two, so the cache stays
small while token counts vary.  The FLOPs of a fixed path are exactly ``alpha + beta * B`` (the
batch leg enters each pairwise step at most once), so the per-call choice between strategies is
exact for every ``B``, not just at bucket sizes, and costs two multiplications.

A FLOP model cannot see everything (memory bandwidth, how well each kernel runs on this machine):
where the two strategies' modelled costs are close it may pick the slower one.
:func:`tune_strategy` times both on the actual device and dtype and records the faster per batch
bucket; ``"auto"`` then follows the measurement instead of the model (as
``torch.backends.cudnn.benchmark`` does for convolutions).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import opt_einsum
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError

__all__ = [
    "NetworkSpec",
    "ContractionPlan",
    "Strategy",
    "Steps",
    "RebuildPlan",
    "Regime",
    "DispatchTable",
    "batch_bucket",
    "get_plan",
    "rebuild_plan",
    "dispatch_table",
    "run_steps",
    "rebuild",
    "factors_linear",
    "factor_pair",
    "contract_network",
    "reconstruct",
    "clear_scratch",
    "tn_linear",
    "tune_strategy",
    "tuned_strategy",
    "record_strategy",
    "tune_version",
    "clear_plan_cache",
]

Strategy = Literal["auto", "network", "dense"]

#: Label of the batch leg in every network equation.
BATCH = 0

#: Upper bound on cached plans (each holds two small ContractExpressions).
PLAN_CACHE_SIZE = 512


@dataclass(frozen=True)
class NetworkSpec:
    """Index structure of a tensor-network operator ``W[(o_1..o_N), (i_1..i_N)]``.

    Legs are integer labels; label ``0`` is reserved for the batch leg of the input.

    Attributes:
        core_legs: for each core, the labels of its legs in storage order.
        out_legs: labels of the output legs ``o_1..o_N`` in row-major order (site 1 most
            significant), so ``out_features == prod(size(o_k))``.
        in_legs: labels of the input legs ``i_1..i_N``, same convention.
        leg_sizes: ``(label, size)`` pairs for every label except the batch leg.
    """

    core_legs: tuple[tuple[int, ...], ...]
    out_legs: tuple[int, ...]
    in_legs: tuple[int, ...]
    leg_sizes: tuple[tuple[int, int], ...]

    def size(self, label: int) -> int:
        return dict(self.leg_sizes)[label]

    @property
    def core_shapes(self) -> tuple[tuple[int, ...], ...]:
        sizes = dict(self.leg_sizes)
        return tuple(tuple(sizes[l] for l in legs) for legs in self.core_legs)

    @property
    def in_size(self) -> int:
        return math.prod(self.size(l) for l in self.in_legs)

    @property
    def out_size(self) -> int:
        return math.prod(self.size(l) for l in self.out_legs)

    def network_equation(self) -> str:
        """``x[b, i..] , core_1 , ... -> y[b, o..]``."""
        x = _symbols((BATCH, *self.in_legs))
        cores = ",".join(_symbols(legs) for legs in self.core_legs)
        return f"{x},{cores}->{_symbols((BATCH, *self.out_legs))}"

    def dense_equation(self) -> str:
        """``core_1 , ... -> W[o.., i..]``."""
        cores = ",".join(_symbols(legs) for legs in self.core_legs)
        return f"{cores}->{_symbols((*self.out_legs, *self.in_legs))}"


def _symbols(labels: Sequence[int]) -> str:
    return "".join(opt_einsum.get_symbol(l) for l in labels)


def batch_bucket(batch: int) -> int:
    """Smallest power of two ``>= batch`` (the plan cache key for a batch size)."""
    return 1 << max(0, int(batch) - 1).bit_length()


#: Cost-model weights, in FLOP equivalents. Small contractions are bound by memory traffic and
#: per-kernel overhead, not arithmetic, while the dense strategy's one large matmul runs much
#: closer to peak than the network's many skinny contractions (its FLOPs weigh
#: ``MATMUL_FLOP_WEIGHT``); without these terms the FLOP count alone picks the slower strategy
#: where the two counts are close. They were fitted to the timings of
#: ``benchmarks/bench_layers.py`` (the fitting script is in git history).
MATMUL_FLOP_WEIGHT = 0.5
FLOPS_PER_ELEMENT = 192.0
FLOPS_PER_KERNEL = 1.0e5


def _step_costs(contractions: list, sizes: dict[str, int]) -> tuple[float, float]:
    """``(flops, elements moved)`` of an opt_einsum contraction list at the given leg sizes."""
    flops = moved = 0.0
    for _, removed, eq, _, _ in contractions:
        inputs, output = eq.split("->")
        terms = inputs.split(",")
        legs = set("".join(terms))
        flops += opt_einsum.helpers.flop_count(legs, bool(removed), len(terms), sizes)
        moved += sum(math.prod(sizes[c] for c in t) for t in (*terms, output))
    return flops, moved


def _affine_cost(contractions: list, sizes: dict[str, int], bucket: int) -> tuple[float, float]:
    """Model cost of a fixed contraction list as ``alpha + beta * B`` in the batch size ``B``.

    The batch leg enters every pairwise step at most once, so FLOPs and elements moved are
    both affine in ``B``; reading them at ``bucket`` and ``2 * bucket`` gives the exact line.
    """
    batch = opt_einsum.get_symbol(BATCH)
    costs = []
    for b in (bucket, 2 * bucket):
        flops, moved = _step_costs(contractions, {**sizes, batch: b})
        costs.append(flops + FLOPS_PER_ELEMENT * moved + FLOPS_PER_KERNEL * len(contractions))
    beta = (costs[1] - costs[0]) / bucket
    return costs[0] - beta * bucket, beta


@dataclass(frozen=True)
class ContractionPlan:
    """Cached contraction expressions for one spec and one batch bucket.

    The modelled cost of each strategy at batch ``B`` is ``alpha + beta * B``, in FLOP
    equivalents: FLOPs (a multiply-add counts 2, as in opt_einsum), plus
    :data:`FLOPS_PER_ELEMENT` per tensor element read or written by each pairwise step, plus
    :data:`FLOPS_PER_KERNEL` per step.
    """

    network: opt_einsum.contract.ContractExpression
    steps: "Steps"
    network_cost: tuple[float, float]
    dense_cost: tuple[float, float]
    network_flops: tuple[float, float]
    dense_flops: tuple[float, float]

    def cost(self, strategy: Literal["network", "dense"], batch: int) -> float:
        alpha, beta = self.network_cost if strategy == "network" else self.dense_cost
        return alpha + beta * batch

    def flops(self, strategy: Literal["network", "dense"], batch: int) -> float:
        alpha, beta = self.network_flops if strategy == "network" else self.dense_flops
        return alpha + beta * batch

    def choose(self, batch: int) -> Literal["network", "dense"]:
        """The strategy with the lower modelled cost at this batch size (ties go to dense)."""
        return "network" if self.cost("network", batch) < self.cost("dense", batch) else "dense"


def _symbol_sizes(spec: NetworkSpec) -> dict[str, int]:
    return {opt_einsum.get_symbol(l): s for l, s in spec.leg_sizes}


def _steps_of(contractions: list) -> "Steps":
    return tuple((tuple(inds), equation) for inds, _, equation, _, _ in contractions)


#: A contraction program: pairwise steps ``(positions, equation)``. Each step pops the operands at
#: ``positions`` (in the order given, which is descending, as opt_einsum lists them) and appends
#: their einsum; what is left at the end is the result. Plain tuples of ints and strings, so a
#: program runs under ``torch.compile`` without tracing opt_einsum.
Steps = tuple[tuple[tuple[int, ...], str], ...]


def run_steps(steps: Steps, operands: Sequence[Tensor]) -> Tensor:
    """Execute a contraction program (see :data:`Steps`) on ``operands``."""
    ops = list(operands)
    for positions, equation in steps:
        # positions are descending, so these are the operands sequential pops would take
        picked = [ops[p] for p in positions]
        ops = [op for i, op in enumerate(ops) if i not in positions]
        ops.append(torch.einsum(equation, *picked))
    return ops[0]


@dataclass(frozen=True)
class RebuildPlan:
    """How the dense weight is rebuilt from the cores with one large matrix product.

    The network is cut at one bond of size ``bond`` into a *left* block holding sites
    ``1..k`` and a *right* block holding sites ``k+1..N`` (every MPO bond and the bonds above a
    tree's root children and left spine cut this way). Each block is contracted alone (small):
    ``L[(o_1..o_k), (i_1..i_k), bond]`` and ``R[bond, (o_k+1..o_N), (i_k+1..i_N)]``. Then one
    GEMM ``(O_L I_L, bond) @ (bond, O_R I_R)`` gives ``W[O_L, I_L, O_R, I_R]``, and one copy swaps
    ``I_L`` and ``O_R`` into ``W[(O_L O_R), (I_L I_R)]``; the copy is skipped when either is 1.
    ``two_factors``: the network *is* ``W = A B`` with ``A = L (out, bond)`` and
    ``B = R (bond, in)`` stored as single cores (the low-rank layout), so ``x W^T`` is two
    matrix products and ``W`` is never needed.
    """

    left: tuple[int, ...]
    right: tuple[int, ...]
    left_steps: Steps
    right_steps: Steps
    out_left: int
    in_left: int
    bond: int
    out_right: int
    in_right: int
    two_factors: bool

    @property
    def gemm_flops(self) -> float:
        return 2.0 * self.out_left * self.in_left * self.bond * self.out_right * self.in_right


def _components(core_legs: tuple[tuple[int, ...], ...], cut: int) -> list[set[int]]:
    """Connected groups of cores when bond ``cut`` is removed."""
    groups: list[set[int]] = []
    for k in range(len(core_legs)):
        legs = set(core_legs[k]) - {cut}
        joined = [g for g in groups if any(set(core_legs[j]) & legs for j in g)]
        merged = {k}.union(*joined) if joined else {k}
        groups = [g for g in groups if g not in joined] + [merged]
    return groups


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def rebuild_plan(spec: NetworkSpec) -> RebuildPlan:
    """The :class:`RebuildPlan` of ``spec``: of the bonds that split the sites into a prefix and
    a suffix, the one whose blocks and GEMM take the fewest FLOPs (ties: the longer contiguous
    runs ``I_R`` in the final copy)."""
    sizes = dict(spec.leg_sizes)
    n = len(spec.out_legs)
    site_of = {l: k for k, l in enumerate(spec.out_legs)} | {l: k for k, l in enumerate(spec.in_legs)}
    physical = set(spec.out_legs) | set(spec.in_legs)
    bonds = sorted({l for legs in spec.core_legs for l in legs} - physical)
    size = lambda legs: math.prod(sizes[l] for l in legs)  # noqa: E731
    symbol_sizes = _symbol_sizes(spec)

    def block(cores: list[int], outputs: tuple[int, ...]) -> tuple[Steps, float]:
        shapes = [tuple(sizes[l] for l in spec.core_legs[c]) for c in cores]
        equation = ",".join(_symbols(spec.core_legs[c]) for c in cores) + "->" + _symbols(outputs)
        if len(cores) == 1:
            return (((0,), equation),), 0.0
        expression = opt_einsum.contract_expression(equation, *shapes, optimize="dp")
        return (_steps_of(expression.contraction_list),
                _step_costs(expression.contraction_list, symbol_sizes)[0])

    best = None
    for bond in bonds:
        groups = _components(spec.core_legs, bond)
        if len(groups) != 2:
            continue
        sites = [sorted({site_of[l] for c in g for l in spec.core_legs[c] if l in site_of})
                 for g in groups]
        left_index = 0 if 0 in sites[0] else 1
        k = len(sites[left_index])
        if sites[left_index] != list(range(k)) or not 0 < k < n:
            continue
        left, right = sorted(groups[left_index]), sorted(groups[1 - left_index])
        left_out = (*spec.out_legs[:k], *spec.in_legs[:k], bond)
        right_out = (bond, *spec.out_legs[k:], *spec.in_legs[k:])
        (left_steps, left_flops), (right_steps, right_flops) = (block(left, left_out),
                                                                block(right, right_out))
        flops = left_flops + right_flops + 2.0 * spec.out_size * spec.in_size * sizes[bond]
        score = (flops, -size(spec.in_legs[k:]))
        if best is None or score < best[0]:
            best = (score, bond, left, right, k, left_steps, right_steps, left_out, right_out)
    if best is None:  # one core (one site): the weight is the core itself
        out_legs, in_legs = spec.out_legs, spec.in_legs
        equation = (_symbols(spec.core_legs[0]) + "->" + _symbols((*out_legs, *in_legs)))
        return RebuildPlan((0,), (), (((0,), equation),), (), spec.out_size, spec.in_size, 1, 1, 1,
                           False)
    _, bond, left, right, k, left_steps, right_steps, left_out, right_out = best
    out_l, in_l = spec.out_legs[:k], spec.in_legs[:k]
    out_r, in_r = spec.out_legs[k:], spec.in_legs[k:]
    two = (len(left) == 1 and len(right) == 1 and size(in_l) == 1 and size(out_r) == 1
           and tuple(l for l in spec.core_legs[left[0]] if sizes[l] > 1) == tuple(
               l for l in left_out if sizes[l] > 1)
           and tuple(l for l in spec.core_legs[right[0]] if sizes[l] > 1) == tuple(
               l for l in right_out if sizes[l] > 1))
    return RebuildPlan(tuple(left), tuple(right), left_steps, right_steps, size(out_l),
                       size(in_l), sizes[bond], size(out_r), size(in_r), two)


#: Rebuilt weights at least this large (elements) are written into a reused scratch buffer when
#: no gradient is needed: a fresh buffer of that size costs more in page faults than the GEMM.
SCRATCH_MIN_ELEMENTS = 1 << 20
_SCRATCH = threading.local()


def _scratch(size: int, like: Tensor) -> Tensor:
    """A flat buffer of at least ``size`` elements on ``like``'s device and dtype, reused across
    calls (one per thread, device and dtype; it grows to the largest rebuild and stays)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (like.device, like.dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < size:
        # A normal tensor even under inference_mode: an inference tensor could not be written
        # into later outside it (torch.no_grad, as in generate()).
        with torch.inference_mode(False):
            buffer = buffers[key] = torch.empty(size, device=like.device, dtype=like.dtype)
    return buffer[:size]


def clear_scratch() -> None:
    """Free the scratch buffers that large rebuilds reuse (in this thread)."""
    _SCRATCH.__dict__.pop("buffers", None)


def rebuild(plan: RebuildPlan, cores: Sequence[Tensor], scratch: bool = False) -> Tensor:
    """The dense matrix ``(out_size, in_size)`` of the network (see :class:`RebuildPlan`).

    ``scratch``: write a large result into a reused buffer instead of a fresh one (only where
    nothing keeps it past the next rebuild: inference, with no gradient to record).
    """
    left = run_steps(plan.left_steps, [cores[i] for i in plan.left])
    if not plan.right:
        return left.reshape(plan.out_left, plan.in_left)
    right = run_steps(plan.right_steps, [cores[i] for i in plan.right])
    left, right = left.reshape(-1, plan.bond), right.reshape(plan.bond, -1)
    out_size, in_size = plan.out_left * plan.out_right, plan.in_left * plan.in_right
    reorder = plan.in_left > 1 and plan.out_right > 1
    n = out_size * in_size
    if not scratch or n < SCRATCH_MIN_ELEMENTS or torch.compiler.is_compiling():
        product = left @ right
        if not reorder:
            return product.reshape(out_size, -1)
        quad = product.reshape(plan.out_left, plan.in_left, plan.out_right, plan.in_right)
        return quad.transpose(1, 2).reshape(out_size, -1)
    buffer = _scratch(2 * n if reorder else n, left)
    product = torch.mm(left, right, out=buffer[:n].view(left.shape[0], right.shape[1]))
    if not reorder:
        return product.view(out_size, in_size)
    weight = buffer[n:].view(plan.out_left, plan.out_right, plan.in_left, plan.in_right)
    weight.copy_(product.view(plan.out_left, plan.in_left, plan.out_right, plan.in_right)
                 .transpose(1, 2))
    return weight.view(out_size, in_size)


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan(spec: NetworkSpec, bucket: int) -> ContractionPlan:
    in_shape = tuple(spec.size(l) for l in spec.in_legs)
    network = opt_einsum.contract_expression(
        spec.network_equation(), (bucket, *in_shape), *spec.core_shapes, optimize="dp"
    )
    sizes = _symbol_sizes(spec)
    net_cost = _affine_cost(network.contraction_list, sizes, bucket)
    rp = rebuild_plan(spec)
    n_in, n_out = spec.in_size, spec.out_size
    block_flops = block_moved = 0.0
    kernels = 1
    for cores, steps in ((rp.left, rp.left_steps), (rp.right, rp.right_steps)):
        for _, equation in steps:
            flops, moved = _step_costs([((), True, equation, None, None)], sizes)
            block_flops, block_moved, kernels = block_flops + flops, block_moved + moved, kernels + 1
    # The blocks, then one GEMM writing W (out * in elements) and, unless a side is 1, one copy
    # that reorders it (a read and a write of out * in elements); then the matmul with x:
    # 2*B*in*out FLOPs, reading W and x, writing y (B*(in+out) elements), one kernel.
    permute = 0.0 if rp.in_left == 1 or rp.out_right == 1 else 2.0 * n_in * n_out
    rebuild_cost = (block_flops + FLOPS_PER_ELEMENT * block_moved
                    + MATMUL_FLOP_WEIGHT * rp.gemm_flops
                    + FLOPS_PER_ELEMENT * (n_in * n_out + permute)
                    + FLOPS_PER_KERNEL * (kernels + (permute > 0)))
    dense_cost = (
        rebuild_cost + FLOPS_PER_KERNEL,
        MATMUL_FLOP_WEIGHT * 2.0 * n_in * n_out + FLOPS_PER_ELEMENT * (n_in + n_out),
    )
    batch = opt_einsum.get_symbol(BATCH)
    f1 = _step_costs(network.contraction_list, {**sizes, batch: bucket})[0]
    f2 = _step_costs(network.contraction_list, {**sizes, batch: 2 * bucket})[0]
    net_flops = (2 * f1 - f2, (f2 - f1) / bucket)
    return ContractionPlan(network, _steps_of(network.contraction_list), net_cost, dense_cost,
                           net_flops, (block_flops + rp.gemm_flops, 2.0 * n_in * n_out))


def get_plan(spec: NetworkSpec, batch: int) -> ContractionPlan:
    """The cached plan for ``spec`` at ``batch`` rows (bucketed to a power of two)."""
    return _plan(spec, batch_bucket(batch))


#: Measured choices: ``(spec, batch bucket, device type, dtype) -> "network" | "dense"``.
_TUNED: dict[tuple, Literal["network", "dense"]] = {}
#: Bumped whenever :data:`_TUNED` changes, so layers know to fetch a fresh dispatch table.
_TUNE_VERSION = [0]


def tune_version() -> int:
    """A number that changes whenever a measured choice is recorded or forgotten."""
    return _TUNE_VERSION[0]


def clear_plan_cache() -> None:
    """Drop every cached contraction plan and every measured choice."""
    _plan.cache_clear()
    _dispatch.cache_clear()
    rebuild_plan.cache_clear()
    _TUNED.clear()
    _TUNE_VERSION[0] += 1


def record_strategy(spec: NetworkSpec, batch: int, device: torch.device | str,
                    dtype: torch.dtype, choice: Literal["network", "dense"]) -> None:
    """Make ``"auto"`` use ``choice`` for ``spec`` at this batch bucket, device type and dtype
    (what :func:`tune_strategy` records after measuring)."""
    if choice not in ("network", "dense"):
        raise ArgumentError(f"choice must be 'network' or 'dense', got {choice!r}")
    _TUNED[(spec, batch_bucket(max(int(batch), 1)), torch.device(device).type, dtype)] = choice
    _TUNE_VERSION[0] += 1


def tuned_strategy(
    spec: NetworkSpec, batch: int, device: torch.device | str, dtype: torch.dtype
) -> Literal["network", "dense"] | None:
    """The choice :func:`tune_strategy` measured for this bucket, device type and dtype, if any."""
    return _TUNED.get((spec, batch_bucket(batch), torch.device(device).type, dtype))


def tune_strategy(
    spec: NetworkSpec,
    cores: Sequence[Tensor],
    bias: Tensor | None,
    in_features: int,
    out_features: int,
    batch: int,
    repeats: int = 3,
    min_seconds: float = 0.2,
) -> dict[str, float]:
    """Time both strategies at ``batch`` rows and make ``"auto"`` use the faster from now on.

    The input is random, of shape ``(batch_bucket(batch), in_features)`` on the cores' device
    and dtype; each strategy runs once to warm up, then in interleaved rounds, at least
    ``repeats`` and until ``min_seconds`` have passed (at most 1000), and the fastest round
    counts (interference on a shared machine only ever adds time; millisecond calls need many
    rounds to see through it). The winner is recorded for that batch bucket, device type and
    dtype; :func:`clear_plan_cache` forgets it.

    Returns:
        ``{"network": seconds, "dense": seconds}`` per call.
    """
    if repeats < 1:
        raise ArgumentError(f"repeats must be >= 1, got {repeats}")
    ref = cores[0]
    bucket = batch_bucket(max(int(batch), 1))
    x = torch.randn(bucket, in_features, device=ref.device, dtype=ref.dtype)
    sync = torch.cuda.synchronize if ref.device.type == "cuda" else (lambda: None)
    best = {"network": math.inf, "dense": math.inf}
    with torch.no_grad():
        round_, start = 0, time.perf_counter()
        while round_ <= repeats or (time.perf_counter() - start < min_seconds and round_ <= 1000):
            for strategy in best:
                sync()
                t0 = time.perf_counter()
                tn_linear(x, spec, cores, bias, in_features, out_features, strategy)
                sync()
                if round_:  # round 0 warms up plans, allocator and caches
                    best[strategy] = min(best[strategy], time.perf_counter() - t0)
            round_ += 1
    record_strategy(spec, bucket, ref.device, ref.dtype,
                    "network" if best["network"] < best["dense"] else "dense")
    return best


@dataclass(frozen=True)
class Regime:
    """Up to ``max_batch`` rows (``None``: any number), compute with ``strategy``:
    ``"network"`` runs the program ``steps`` on the input and the cores, ``"factors"`` the two
    matrix products of a two-factor network, ``"dense"`` the rebuilt weight."""

    max_batch: int | None
    strategy: Literal["network", "factors", "dense"]
    steps: Steps = ()


@dataclass(frozen=True)
class DispatchTable:
    """Everything one call of :func:`tn_linear` needs, decided in advance: the regimes by batch
    size (ascending; the last has ``max_batch=None``), the rebuild plan, and the input and
    output leg sizes. Plain data, so the choice is a few integer comparisons in eager mode and a
    branch on the (symbolic) batch size under ``torch.compile``: at most one graph per regime."""

    regimes: tuple[Regime, ...]
    rebuild: RebuildPlan
    in_shape: tuple[int, ...]
    in_size: int
    out_size: int

    def regime(self, batch: int) -> Regime:
        for regime in self.regimes:
            if regime.max_batch is None or batch <= regime.max_batch:
                return regime
        return self.regimes[-1]


#: Batch buckets a dispatch table distinguishes: 1, 2, 4, ..., 2^16 rows, then "more".
TABLE_BUCKETS = tuple(1 << k for k in range(17))


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def _dispatch(spec: NetworkSpec, strategy: Strategy, tuned: tuple[tuple[int, str], ...]
              ) -> DispatchTable:
    rp = rebuild_plan(spec)
    measured = dict(tuned)
    regimes: list[Regime] = []
    for bucket in TABLE_BUCKETS:
        if strategy != "auto":
            choice = strategy
        elif bucket in measured:
            choice = measured[bucket]
        elif rp.two_factors:  # two thin matmuls never cost more than rebuilding W = A B first
            choice = "network"
        else:
            choice = _plan(spec, bucket).choose(bucket)
        if choice == "dense":
            regime = Regime(bucket, "dense")
        elif rp.two_factors:
            regime = Regime(bucket, "factors")
        else:
            regime = Regime(bucket, "network", _plan(spec, bucket).steps)
        if regimes and (regimes[-1].strategy, regimes[-1].steps) == (regime.strategy, regime.steps):
            regimes[-1] = regime
        else:
            regimes.append(regime)
    regimes[-1] = Regime(None, regimes[-1].strategy, regimes[-1].steps)
    in_shape = tuple(spec.size(l) for l in spec.in_legs)
    return DispatchTable(tuple(regimes), rp, in_shape, spec.in_size, spec.out_size)


def dispatch_table(spec: NetworkSpec, strategy: Strategy = "auto",
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> DispatchTable:
    """The :class:`DispatchTable` of ``spec``: ``"auto"`` follows the choices measured by
    :func:`tune_strategy` for this device type and dtype and the cost model elsewhere;
    ``"network"`` or ``"dense"`` force one strategy. Cached."""
    if strategy not in ("auto", "network", "dense"):
        raise ArgumentError(f"strategy must be 'auto', 'network' or 'dense', got {strategy!r}")
    device_type = torch.device(device).type
    tuned = tuple(sorted((b, c) for (s, b, d, t), c in _TUNED.items()
                         if s == spec and d == device_type and t == dtype))
    return _dispatch(spec, strategy, tuned)


def contract_network(
    spec: NetworkSpec, x: Tensor, cores: Sequence[Tensor], plan: ContractionPlan | None = None
) -> Tensor:
    """Contract ``x`` of shape ``(B, spec.in_size)`` through the network: ``(B, spec.out_size)``.

    ``plan`` is the cached plan for this batch size (looked up when not given)."""
    batch = x.shape[0]
    xs = x.reshape(batch, *(spec.size(l) for l in spec.in_legs))
    plan = plan if plan is not None else get_plan(spec, batch)
    return run_steps(plan.steps, [xs, *cores]).reshape(batch, spec.out_size)


def reconstruct(spec: NetworkSpec, cores: Sequence[Tensor]) -> Tensor:
    """The dense matrix of the network, shape ``(spec.out_size, spec.in_size)``."""
    return rebuild(rebuild_plan(spec), cores)


#: Device types that have an autocast mode.
_AUTOCAST_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu"})


class _RebuiltLinear(torch.autograd.Function):
    """``y = x W^T`` with ``W = rebuild(cores)``, training without storing ``W``.

    Plain autograd would keep every layer's rebuilt ``(out, in)`` weight and the rebuild's
    intermediates until backward: as much memory as the dense model's weights, which is what
    compression was meant to save. Here only ``x`` and the cores are kept, and backward rebuilds
    ``W`` (a few percent of the matmul's FLOPs at training batch sizes) to get
    ``dx = dy W`` and ``dW = dy^T x``, then pulls ``dW`` back through the rebuild to the cores.
    First-order only (no double backward). Eager mode only: under ``torch.compile`` the
    compiler's own partitioner decides what to keep.
    """

    @staticmethod
    def forward(ctx, x: Tensor, plan: RebuildPlan, out_features: int, in_features: int,
                *cores: Tensor) -> Tensor:
        ctx.plan, ctx.features = plan, (out_features, in_features)
        ctx.save_for_backward(x, *cores)
        weight = rebuild(plan, cores)[:out_features, :in_features]
        return F.linear(x, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, *cores = ctx.saved_tensors
        n_out, n_in = ctx.features
        wanted = list(ctx.needs_input_grad[4:])
        with torch.enable_grad():
            leaves = [c.detach().requires_grad_(w) for c, w in zip(cores, wanted)]
            weight = rebuild(ctx.plan, leaves)[:n_out, :n_in]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.matmul(weight.detach().to(grad_y.dtype)).to(x.dtype)
        grads: list[Tensor | None] = [None] * len(cores)
        if any(wanted):
            dtype = weight.dtype
            grad_w = grad_y.reshape(-1, n_out).to(dtype).T @ x.reshape(-1, n_in).to(dtype)
            needed = [leaf for leaf, w in zip(leaves, wanted) if w]
            found = iter(torch.autograd.grad(weight, needed, grad_w))
            grads = [next(found) if w else None for w in wanted]
        return (grad_x, None, None, None, *grads)


def factor_pair(cores: Sequence[Tensor], plan: RebuildPlan, in_features: int,
                out_features: int) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``W = A B`` for a two-factor network (``plan.two_factors``): ``A`` the
    left core as ``(out_features, bond)``, ``B`` the right one as ``(bond, in_features)``
    (reshapes, so the boundary legs of size 1 may still be on the cores; padding cut off)."""
    a = cores[plan.left[0]].reshape(plan.out_left, plan.bond)
    b = cores[plan.right[0]].reshape(plan.bond, plan.in_right)
    if plan.out_left != out_features:
        a = a[:out_features]
    if plan.in_right != in_features:
        b = b[:, :in_features]
    return a, b


def factors_linear(x: Tensor, cores: Sequence[Tensor], plan: RebuildPlan, bias: Tensor | None,
                   in_features: int, out_features: int) -> Tensor:
    """``y = x (A B)^T + bias`` for a two-factor network as two thin matmuls, no einsum
    (``A``, ``B`` as :func:`factor_pair` gives them)."""
    a, b = factor_pair(cores, plan, in_features, out_features)
    return F.linear(F.linear(x, b), a, bias)


def tn_linear(
    x: Tensor,
    spec: NetworkSpec,
    cores: Sequence[Tensor],
    bias: Tensor | None,
    in_features: int,
    out_features: int,
    strategy: Strategy = "auto",
    table: DispatchTable | None = None,
) -> Tensor:
    """``y = x W^T + bias`` with ``W`` given by a tensor network.

    Args:
        x: input of shape ``(..., in_features)``.
        spec: the network's index structure; ``spec.in_size >= in_features`` and
            ``spec.out_size >= out_features`` (larger when the dimensions were padded).
        cores: one tensor per ``spec.core_legs`` entry.
        bias: ``(out_features,)`` or ``None``.
        strategy: ``"network"``, ``"dense"`` or ``"auto"`` (the faster as measured by
            :func:`tune_strategy` for this batch bucket if it was run, else the cheaper by the
            cost model at this batch).
        table: the :func:`dispatch_table` to follow (a layer passes its own, decided in
            advance); ``strategy`` is then ignored.

    Returns:
        Tensor of shape ``(..., out_features)``.
    """
    device_type = x.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        # Contract wholly in the autocast dtype, as nn.Linear computes under autocast (left to
        # itself, autocast would cast only some of the pairwise steps and mix dtypes). The casts
        # are differentiable: float32 cores still get float32 gradients.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return tn_linear(x.to(dtype), spec, [c.to(dtype) for c in cores],
                             None if bias is None else bias.to(dtype), in_features,
                             out_features, strategy, table)
    if table is None:
        table = dispatch_table(spec, strategy, x.device, x.dtype)
    if torch.compiler.is_exporting():  # one computation for every length, so no guard on it
        weight = rebuild(table.rebuild, cores, scratch=False)[:out_features, :in_features]
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    regime = table.regime(x2.shape[0])
    plan = table.rebuild
    if regime.strategy == "factors":
        return factors_linear(x, cores, plan, bias, in_features, out_features)
    if regime.strategy == "dense" or x2.shape[0] == 0:
        training = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        if training and not torch.compiler.is_compiling():
            y = _RebuiltLinear.apply(x, plan, out_features, in_features, *cores)
            return y if bias is None else y + bias
        weight = rebuild(plan, cores, scratch=not training)[:out_features, :in_features]
        return F.linear(x, weight, bias)
    if table.in_size != in_features:  # zero-pad the input legs; the padded columns never count
        x2 = F.pad(x2, (0, table.in_size - in_features))
    xs = x2.reshape(-1, *table.in_shape)
    y = run_steps(regime.steps, [xs, *cores]).reshape(-1, table.out_size)
    if table.out_size != out_features:
        y = y[:, :out_features]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features)
