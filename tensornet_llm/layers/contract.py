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
    "batch_bucket",
    "get_plan",
    "contract_network",
    "reconstruct",
    "tn_linear",
    "tune_strategy",
    "tuned_strategy",
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
#: where the two counts are close. ``benchmarks/fit_cost_model.py`` chooses them from the
#: timings of ``benchmarks/bench_layers.py``.
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
    dense: opt_einsum.contract.ContractExpression
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


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def _dense_expression(spec: NetworkSpec) -> opt_einsum.contract.ContractExpression:
    shapes = spec.core_shapes
    return opt_einsum.contract_expression(spec.dense_equation(), *shapes, optimize="dp")


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan(spec: NetworkSpec, bucket: int) -> ContractionPlan:
    in_shape = tuple(spec.size(l) for l in spec.in_legs)
    network = opt_einsum.contract_expression(
        spec.network_equation(), (bucket, *in_shape), *spec.core_shapes, optimize="dp"
    )
    dense = _dense_expression(spec)
    sizes = _symbol_sizes(spec)
    net_cost = _affine_cost(network.contraction_list, sizes, bucket)
    rebuild_flops, rebuild_moved = _step_costs(dense.contraction_list, sizes)
    rebuild = (
        rebuild_flops
        + FLOPS_PER_ELEMENT * rebuild_moved
        + FLOPS_PER_KERNEL * len(dense.contraction_list)
    )
    n_in, n_out = spec.in_size, spec.out_size
    # The rebuilt W comes out site-major and is permuted into (out, in) order (a read and a
    # write of in*out elements, one kernel); then the matmul: 2*B*in*out FLOPs, reading W and x,
    # writing y (B*(in+out) elements), one kernel.
    dense_cost = (
        rebuild + FLOPS_PER_ELEMENT * 3 * n_in * n_out + 2 * FLOPS_PER_KERNEL,
        MATMUL_FLOP_WEIGHT * 2.0 * n_in * n_out + FLOPS_PER_ELEMENT * (n_in + n_out),
    )
    batch = opt_einsum.get_symbol(BATCH)
    f1 = _step_costs(network.contraction_list, {**sizes, batch: bucket})[0]
    f2 = _step_costs(network.contraction_list, {**sizes, batch: 2 * bucket})[0]
    net_flops = (2 * f1 - f2, (f2 - f1) / bucket)
    return ContractionPlan(
        network, dense, net_cost, dense_cost, net_flops, (rebuild_flops, 2.0 * n_in * n_out)
    )


def get_plan(spec: NetworkSpec, batch: int) -> ContractionPlan:
    """The cached plan for ``spec`` at ``batch`` rows (bucketed to a power of two)."""
    return _plan(spec, batch_bucket(batch))


def clear_plan_cache() -> None:
    """Drop every cached contraction plan and every measured choice."""
    _plan.cache_clear()
    _dense_expression.cache_clear()
    _TUNED.clear()


#: Measured choices: ``(spec, batch bucket, device type, dtype) -> "network" | "dense"``.
_TUNED: dict[tuple, Literal["network", "dense"]] = {}


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
    key = (spec, bucket, ref.device.type, ref.dtype)
    _TUNED[key] = "network" if best["network"] < best["dense"] else "dense"
    return best


def contract_network(
    spec: NetworkSpec, x: Tensor, cores: Sequence[Tensor], plan: ContractionPlan | None = None
) -> Tensor:
    """Contract ``x`` of shape ``(B, spec.in_size)`` through the network: ``(B, spec.out_size)``.

    ``plan`` is the cached plan for this batch size (looked up when not given)."""
    batch = x.shape[0]
    xs = x.reshape(batch, *(spec.size(l) for l in spec.in_legs))
    plan = plan if plan is not None else get_plan(spec, batch)
    return plan.network(xs, *cores, backend="torch").reshape(batch, spec.out_size)


def reconstruct(spec: NetworkSpec, cores: Sequence[Tensor]) -> Tensor:
    """The dense matrix of the network, shape ``(spec.out_size, spec.in_size)``."""
    return _dense_expression(spec)(*cores, backend="torch").reshape(spec.out_size, spec.in_size)


#: Device types that have an autocast mode.
_AUTOCAST_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu"})


class _RebuiltLinear(torch.autograd.Function):
    """``y = x W^T`` with ``W = reconstruct(cores)``, training without storing ``W``.

    Plain autograd would keep every layer's rebuilt ``(out, in)`` weight and the rebuild's
    intermediates until backward: as much memory as the dense model's weights, which is what
    compression was meant to save. Here only ``x`` and the cores are kept, and backward rebuilds
    ``W`` (a few percent of the matmul's FLOPs at training batch sizes) to get
    ``dx = dy W`` and ``dW = dy^T x``, then pulls ``dW`` back through the rebuild to the cores.
    First-order only (no double backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, spec: NetworkSpec, out_features: int, in_features: int,
                *cores: Tensor) -> Tensor:
        ctx.spec, ctx.features = spec, (out_features, in_features)
        ctx.save_for_backward(x, *cores)
        weight = reconstruct(spec, cores)[:out_features, :in_features]
        return F.linear(x, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, *cores = ctx.saved_tensors
        n_out, n_in = ctx.features
        wanted = list(ctx.needs_input_grad[4:])
        with torch.enable_grad():
            leaves = [c.detach().requires_grad_(w) for c, w in zip(cores, wanted)]
            weight = reconstruct(ctx.spec, leaves)[:n_out, :n_in]
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


def tn_linear(
    x: Tensor,
    spec: NetworkSpec,
    cores: Sequence[Tensor],
    bias: Tensor | None,
    in_features: int,
    out_features: int,
    strategy: Strategy = "auto",
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
                             out_features, strategy)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    batch = x2.shape[0]
    plan = get_plan(spec, max(batch, 1)) if strategy != "dense" else None
    if strategy == "auto":
        measured = _TUNED and tuned_strategy(spec, max(batch, 1), x.device, x.dtype)
        strategy = measured or plan.choose(max(batch, 1))
    if strategy == "dense" or batch == 0:
        if torch.is_grad_enabled() and any(c.requires_grad for c in cores):
            y = _RebuiltLinear.apply(x, spec, out_features, in_features, *cores)
            return y if bias is None else y + bias
        weight = reconstruct(spec, cores)[:out_features, :in_features]
        return F.linear(x, weight, bias)
    if strategy != "network":
        raise ArgumentError(f"strategy must be 'auto', 'network' or 'dense', got {strategy!r}")
    if spec.in_size != in_features:  # zero-pad the input legs; the padded columns never count
        x2 = F.pad(x2, (0, spec.in_size - in_features))
    y = contract_network(spec, x2, cores, plan)
    if spec.out_size != out_features:
        y = y[:, :out_features]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features)
