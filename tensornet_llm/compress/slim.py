"""Slim MLPs: an MLP of smaller width, made of plain ``nn.Linear`` of smaller shape.

A gated MLP computes ``down(act(gate(x)) * up(x))`` with ``m`` intermediate neurons
(LLaMA, Mistral, Qwen, Gemma and their kin), a plain one ``down(act(up(x)))`` (GPT-2,
GPT-NeoX, Falcon, Bloom, OPT, Phi, StarCoder2, GPT-J, T5), whatever the projections are
called: a module whose only two or three linear children map ``h -> m`` and ``m -> h``, and
whose forward reads each neuron by itself between them (checked on a random input). Keeping
``k`` of the neurons, the set ``S``, leaves

    gate' = gate[S], up' = up[S]            rows S of the weights (and biases): exact on the kept
    down' = W G[:, S] G[S, S]^-1            ``W`` down's weight ``(out, m)``, ``G = E[h h^T]``

where ``h`` ``(m,)`` is down's input (the neurons' outputs) on calibration data: the least-squares
refit of ``down`` from the kept neurons alone, which predicts each dropped neuron from the kept
ones (MoDeGPT, arXiv 2408.09632, does the same with a Nystrom selection; :func:`refit_down`
adds a small ridge to that prediction). The MLP is then a dense MLP of width ``k``: one plain
matmul per projection, no new forward code. A report row's ``act_error`` is the MLP's relative
output error on the calibration data (the same for its three layers), ``act_error_start`` that
of the kept neurons without the refit.

The only error is down's, ``E = W (h - G[:, S] G[S, S]^-1 h_S)``, with
``E[E E^T] = W Sc W^T`` for the Schur complement ``Sc = G - G[:, S] G[S, S]^-1 G[S, :]``. The
neurons are chosen greedily to minimise the damage the budget prices every layout by
(``0.5 tr(R W Sc W^T R^T)``, ``R`` the loss-gradient weights of down's outputs): a pivoted
Cholesky of ``G`` whose pivot is the neuron that lowers that damage most. One pass gives the
damage at every width, which is the slim MLP's ladder in the budget.

The budget runs that search on ``G + ridge diag(G)``, the Gram of the ridge refit: its
prediction of the dropped neurons is the refit's own, and its Schur complement is the refit's
error on the calibration data plus the ridge penalty of the prediction's coefficients plus
``ridge`` times the dropped neurons' own share. The budget prices a width by the first two:
the penalty prices the risk that the correlations between neurons the refit relies on are the
calibration text's and not other text's (priced by the plain ``Sc``, a slim MLP looks cheaper
than it is on held-out text of other domains), while a neuron dropped and not predicted runs
no such risk.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..layers.base import is_linear_like, is_plain, linear_weight
from .fit import corrected_target, metric_roots, output_weights, stable_cholesky, weigh_rows
from .report import LayerReport

__all__ = ["GATED_NAMES", "MLPUnit", "SlimChoice", "mlp_units", "greedy_neurons", "damage_scale",
           "refit_down", "kept_rows", "slim_layers", "build_slim", "linear_like", "output_errors",
           "slim_reports", "SLIM", "REFIT_RIDGE"]

#: The method name a slim MLP's layers carry in reports.
SLIM = "slim"


@dataclass(frozen=True)
class MLPUnit:
    """The qualified names of one MLP and its projections; ``gate`` is ``None`` for a plain
    MLP. ``name`` is the module whose forward runs them (a plain MLP's may be a whole block)."""

    name: str
    gate: str | None
    up: str
    down: str

    @property
    def members(self) -> tuple[str, ...]:
        """The projections' names, inputs first, ``down`` last."""
        return tuple(n for n in (self.gate, self.up, self.down) if n is not None)


@dataclass(frozen=True)
class SlimChoice:
    """The budget's choice for one MLP: keep the neurons ``keep`` ``(width,)``."""

    unit: MLPUnit
    keep: Tensor

    @property
    def width(self) -> int:
        return len(self.keep)

    @property
    def members(self) -> tuple[str, ...]:
        """The projections this choice replaces: all of the unit's."""
        return self.unit.members


#: The names LLaMA and its kin give a gated MLP's projections (gate, up, down).
GATED_NAMES = ("gate_proj", "up_proj", "down_proj")


def _projections(mlp: nn.Module, children: dict[str, nn.Module]
                 ) -> tuple[tuple[str, ...], str] | None:
    """``(inputs, down)``, the child names of ``mlp``'s projections if it is an MLP (module
    docs): its only two or three linear-like children, the inputs ``(h -> m)`` in the order
    registered (``gate_proj``, ``up_proj`` by name where so called) and ``down`` ``(m -> h)``,
    with a forward that reads each of the ``m`` neurons by itself between them
    (:func:`_slims_exactly`). ``None`` for anything else, and where more than one choice of
    ``down`` passes. ``children``: ``mlp``'s linear-like children by name."""
    if len(children) not in (2, 3) or len({id(c) for c in children.values()}) < len(children):
        return None
    shapes = {n: tuple(linear_weight(c)[0].shape) for n, c in children.items()}  # (out, in)
    if set(children) == set(GATED_NAMES):
        options = [(GATED_NAMES[:2], GATED_NAMES[2])]
    else:
        options = [(tuple(n for n in children if n != down), down) for down in children]
    # A pair's shapes fit either way round; the forward tells (the other way fails or differs).
    options = [(inputs, down) for inputs, down in options
               if all(shapes[n] == shapes[down][::-1] for n in inputs)
               and _slims_exactly(mlp, inputs, down)]
    return options[0] if len(options) == 1 else None


def _more_required(module: nn.Module) -> int:
    """How many positional arguments ``module``'s forward requires after the first."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return 0
    return max(0, sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                          p.POSITIONAL_OR_KEYWORD)
                      for p in params) - 1)


@torch.no_grad()
def _slims_exactly(mlp: nn.Module, inputs: tuple[str, ...], down: str) -> bool:
    """Whether ``mlp`` computes, with the slim layers of half its neurons (:func:`slim_layers`,
    down's columns as they are) in place of its children ``inputs`` and ``down``, what it
    computes with the other neurons' columns of ``down`` set to zero. That holds where the
    forward reads each neuron by itself (an elementwise activation, a gate's product, dropout)
    and nothing else reads the projections: the condition for slimming. Checked on a random
    input of 3 tokens, in eval mode (the modes are put back); further required arguments get
    zeros of the input's shape (Bloom's MLP adds the residual after ``down``)."""
    layers = [getattr(mlp, n) for n in (*inputs, down)]
    if not all(is_plain(layer.weight) for layer in layers):  # meta, or quantized: not offered
        return False
    w_down = linear_weight(layers[-1])[0]
    if w_down.is_meta or w_down.shape[1] < 2:
        return False
    keep = torch.arange(0, w_down.shape[1], 2, device=w_down.device)
    slim = _slim(layers, keep, w_down[:, keep])
    zeroed = w_down.clone()
    zeroed[:, 1::2] = 0
    stored = zeroed if w_down is layers[-1].weight else zeroed.t()  # Conv1D: (in, out)
    x = torch.randn(1, 3, w_down.shape[0], generator=torch.Generator().manual_seed(0))
    x = x.to(device=w_down.device, dtype=w_down.dtype)
    args = (x,) + (torch.zeros_like(x),) * _more_required(mlp)  # Bloom's MLP: the residual
    swapped = copy.copy(mlp)
    swapped._modules = {**mlp._modules, **dict(zip((*inputs, down), slim))}
    modes = {m: m.training for m in mlp.modules()}
    try:
        mlp.eval()
        swapped.eval()
        want = functional_call(mlp, {f"{down}.weight": stored}, args)
        got = swapped(*args)
    except Exception:  # a forward that needs more than hidden states: not offered
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode
    want, got = (t[0] if isinstance(t, (tuple, list)) and t else t for t in (want, got))
    if not (isinstance(got, Tensor) and isinstance(want, Tensor) and got.shape == want.shape):
        return False
    tol = 5e-2 if w_down.dtype.itemsize <= 2 else 1e-4
    return bool((got - want).norm() <= tol * want.norm().clamp_min(1e-30))


def mlp_units(model: nn.Module, names: set[str] | list[str]) -> list[MLPUnit]:
    """The MLPs of ``model`` (module docs, :func:`_projections`) whose projections are all among
    ``names``, in model order: gated ones (``gate`` and ``up`` both read the input), and plain
    ones (``gate`` is ``None``), whatever the projections are called."""
    names = set(names)
    found = []
    for name, mlp in model.named_modules():
        prefix = f"{name}." if name else ""
        children = {n: c for n, c in mlp.named_children() if is_linear_like(c)}
        if len(children) in (2, 3) and all(prefix + n in names for n in children):
            projections = _projections(mlp, children)
            if projections is not None:
                (*gate, up), down = projections
                found.append(MLPUnit(name, prefix + gate[0] if gate else None, prefix + up,
                                     prefix + down))
    return found


def damage_scale(down_weight: Tensor, grad_sq: Tensor | None, gram: Tensor
                 ) -> tuple[Tensor, float]:
    """``(B, c)`` with the budget's damage of a slim MLP ``c tr(B Sc B^T)``: ``B = R W``
    ``(out, m)`` weighs down's outputs as :func:`~.budget.damage` does (``R = diag(sqrt(E[g^2]))``,
    or the root of the K-FAC metric scaled to mean diagonal 1 with ``c`` its mean diagonal over
    two), and without gradients ``B = W``, ``c = 1 / tr(W G W^T)`` (the relative output error)."""
    w = down_weight.detach().to(torch.float64)
    if grad_sq is None:
        return w, 1.0 / max(float((w @ gram.to(w) * w).sum()), 1e-300)
    grad_sq = grad_sq.to(device=w.device, dtype=torch.float64)
    if grad_sq.dim() == 1:
        return grad_sq.sqrt()[:, None] * w, 0.5
    root = metric_roots(output_weights(grad_sq))[0]
    return weigh_rows(root, w), 0.5 * float(grad_sq.diagonal().mean())


@torch.no_grad()
def greedy_neurons(gram: Tensor, weighted: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Choose ``count`` neurons greedily to minimise ``tr(B Sc B^T)`` (module docs).

    Args:
        gram: ``G`` ``(m, m)``, down's input second moment.
        weighted: ``B`` ``(out, m)`` (:func:`damage_scale`).
        count: neurons to choose, at most ``m``.

    Returns:
        ``order`` ``(count,)``, the neurons in the order chosen, and ``left`` ``(count + 1,)``,
        ``tr(B Sc B^T)`` after choosing the first ``j`` of them (float64). Neurons that the
        chosen ones already determine (a singular ``G``) come last, at no cost.

    The search runs in float32 (``B Sc`` stays in cache; a step costs two passes over it);
    ``left`` is then recomputed in float64 from the pivoted Cholesky factor of the order.
    """
    g = gram.to(torch.float64)
    m = g.shape[0]
    g32 = g.float()
    c = weighted.to(device=g.device, dtype=torch.float32) @ g32  # B Sc, (out, m); Sc = G at first
    norms = c.pow(2).sum(0)  # ||B Sc[:, q]||^2
    diag = g32.diagonal().clone()  # Sc's diagonal
    tiny = 1e-6 * float(diag.max().clamp_min(1e-30))
    rows = g32.new_zeros(count, m)  # pivoted Cholesky rows: Sc = G - rows^T rows
    taken = torch.zeros(m, dtype=torch.bool, device=g.device)
    order = []
    for j in range(count):
        # Choosing p lowers tr(B Sc B^T) by ||B Sc[:, p]||^2 / Sc[p, p].
        score = norms / diag.clamp_min(tiny)
        score[taken | (diag <= tiny)] = -1.0
        p = int(score.argmax())
        if score[p] < 0:  # every neuron left is determined by those chosen
            break
        l = (g32[p] - rows[:j, p] @ rows[:j]) / diag[p].sqrt()  # Sc[p, :] / sqrt(Sc[p, p])
        u = c[:, p] / diag[p].sqrt()
        # B Sc' = B Sc - u l^T: the column norms follow without a second pass over B Sc.
        norms += l * (l * float(u @ u) - 2 * (u @ c))
        c.addr_(u, l, alpha=-1.0)
        rows[j] = l
        diag -= l.pow(2)
        norms.clamp_(min=0)
        taken[p] = True
        order.append(p)
    order += (~taken).nonzero().flatten()[: count - len(order)].tolist()
    order = torch.tensor(order, dtype=torch.long, device=g.device)
    return order, _damage_left(g, weighted, order)


def _damage_left(gram: Tensor, weighted: Tensor, order: Tensor) -> Tensor:
    """``tr(B Sc B^T)`` after each prefix of ``order`` ``(count + 1,)``, float64. With ``L`` the
    Cholesky factor of ``G`` permuted to that order (``P G P^T = L L^T``), the first ``j``
    neurons explain ``||B P^T L[:, :j]||^2``, column by column."""
    b = weighted.to(device=gram.device, dtype=torch.float64)
    total = (b @ gram * b).sum()
    perm = torch.cat([order, _rest(order, gram.shape[0])])
    pivoted = gram[perm][:, perm]
    factor, info = torch.linalg.cholesky_ex(pivoted)
    factor = factor[:, : len(order)]  # (m, count), lower
    if int(info) > 0:  # singular G: the neurons from the failed pivot on explain nothing more
        factor = factor.clone()
        factor[:, int(info) - 1:] = 0.0
    explained = (b[:, perm] @ factor).pow(2).sum(0).cumsum(0)
    return torch.cat([total[None], (total - explained).clamp_min(0.0)])


def _rest(order: Tensor, m: int) -> Tensor:
    mask = torch.ones(m, dtype=torch.bool, device=order.device)
    mask[order] = False
    return mask.nonzero().flatten()


#: Ridge of the refit, relative to each kept neuron's second moment (module docs of
#: :func:`refit_down`).
REFIT_RIDGE = 0.3


@torch.no_grad()
def refit_down(target: Tensor, gram: Tensor, keep: Tensor, ridge: float = REFIT_RIDGE
               ) -> Tensor:
    """Down's weight on the kept neurons ``keep`` ``(k,)``, ``(out, k)``: the least-squares fit
    that reproduces ``target`` ``W`` ``(out, m)`` on inputs of second moment ``gram`` ``G``
    (float64 inside, ``target``'s dtype out),

        W' = W[:, S] + W[:, D] G[D, S] (G[S, S] + ridge diag(G[S, S]))^-1      (D: the dropped)

    i.e. every dropped neuron predicted from the kept ones by ridge regression on the calibration
    activations. ``ridge=0`` is the plain least squares ``W G[:, S] G[S, S]^-1``; a ridge makes
    the prediction generalise beyond the calibration text (on SmolLM2's MLPs at keep 80%,
    ``ridge=0.3`` lowered the held-out output error of every domain by 1-3% of itself, more
    lowered it less). Keeping every neuron returns ``W`` itself."""
    g = gram.to(torch.float64)
    w = target.detach().to(device=g.device, dtype=torch.float64)
    dropped = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
    dropped[keep.to(g.device)] = False
    kept = w[:, keep]
    if dropped.any():
        g_kept = g[keep][:, keep]
        factor = stable_cholesky(g_kept + ridge * torch.diag_embed(g_kept.diagonal()))
        predict = torch.cholesky_solve(g[keep][:, dropped], factor)  # (k, |D|)
        kept = kept + w[:, dropped] @ predict.T
    return kept.to(device=target.device, dtype=target.dtype)


def linear_like(reference: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` ``(out, in)`` and ``bias``, with ``reference``'s device,
    dtype, ``requires_grad`` and mode."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device,
                      dtype=reference.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.train(reference.training).requires_grad_(reference.weight.requires_grad)


@torch.no_grad()
def kept_rows(layer: nn.Module, rows: Tensor) -> nn.Linear:
    """An ``nn.Linear`` computing the outputs ``rows`` of ``layer`` (a linear, or GPT-2's
    ``Conv1D``): those rows of its weight and bias, its device, dtype and mode."""
    weight, bias = linear_weight(layer)
    return linear_like(layer, weight[rows], None if bias is None else bias[rows])


@torch.no_grad()
def slim_layers(gate: nn.Module | None, up: nn.Module, down: nn.Module, keep: Tensor,
                down_weight: Tensor) -> tuple[nn.Linear, ...]:
    """The layers of the slim MLP keeping neurons ``keep`` ``(k,)``: rows of ``gate`` (none for
    a plain MLP) and ``up``, and ``down_weight`` ``(out, k)`` (:func:`refit_down`) with down's
    bias; all ``nn.Linear`` (GPT-2's ``Conv1D`` stores its weight transposed, these do not)."""
    w_up, _ = linear_weight(up)
    keep = keep.to(w_up.device)
    inputs = tuple(kept_rows(layer, keep) for layer in (gate, up) if layer is not None)
    return (*inputs, linear_like(down, down_weight.to(w_up), down.bias))


def _slim(layers: tuple[nn.Module, ...], keep: Tensor, down_weight: Tensor
          ) -> tuple[nn.Linear, ...]:
    """:func:`slim_layers` of ``layers``, ``(gate, up, down)`` or ``(up, down)``."""
    *inputs, down = layers
    return slim_layers(*([None] * (2 - len(inputs)) + inputs), down, keep, down_weight)


def output_errors(target: Tensor, gram: Tensor, keep: Tensor, refit: Tensor
                  ) -> tuple[float, float]:
    """The relative output error, on inputs of second moment ``gram`` ``(m, m)``, of the layer
    ``target`` ``(out, m)`` reading only its inputs ``keep`` ``(k,)``: with their columns as
    they are, and with ``refit`` ``(out, k)`` in their place."""
    w = target.to(torch.float64)
    reference = max(float((w @ gram * w).sum()), 1e-300)

    def error(on_kept: Tensor) -> float:
        e = w.clone()
        e[:, keep] -= on_kept.to(w)
        return (float((e @ gram * e).sum()) / reference) ** 0.5

    return error(w[:, keep]), error(refit)


def slim_reports(names: tuple[str, ...], old: tuple[nn.Linear, ...], new: tuple[nn.Linear, ...],
                 axes: tuple[int, ...], keep: Tensor, width: int, seconds: float,
                 errors: tuple[float, float]) -> list[LayerReport]:
    """A report row for each layer ``old`` -> ``new`` of a slim unit that keeps the entries
    ``keep`` along ``axes`` (rows 0, columns 1), at ``width``; ``errors`` from
    :func:`output_errors`."""
    reports = []
    for name, old_layer, layer, axis in zip(names, old, new, axes):
        # The weight error of the layer as a full-size weight, zero on what was dropped.
        full = linear_weight(old_layer)[0].detach().to(torch.float64)
        placed = torch.zeros_like(full).index_copy_(axis, keep, layer.weight.detach().to(full))
        reports.append(LayerReport(
            name=name, in_features=layer.in_features, out_features=layer.out_features,
            method=SLIM, chi=width, bond_dims=[width],
            params_before=sum(p.numel() for p in old_layer.parameters()),
            params_after=sum(p.numel() for p in layer.parameters()),
            rel_error=float((placed - full).norm() / full.norm().clamp_min(1e-30)),
            seconds=seconds, act_error_start=errors[0], act_error=errors[1]))
    return reports


@torch.no_grad()
def build_slim(choice: SlimChoice, layers: tuple[nn.Module, ...], gram: Tensor,
               cross: Tensor | None = None) -> tuple[tuple[nn.Linear, ...], list[LayerReport]]:
    """The slim MLP ``choice`` asks for, from its ``layers`` (``(gate, up, down)``, or ``(up,
    down)`` for a plain MLP: ``choice.unit.members``) and down's input second moment ``gram``
    on the calibration data, as the compressed earlier blocks produce it (with ``cross``, the
    dense model's inputs against these, down is refitted to the dense model's outputs, as
    ``match_dense`` does for every layer): its layers and a report row for each. The neurons
    are the budget's (chosen on the dense model's statistics)."""
    t0 = time.perf_counter()
    *inputs, down = layers
    target = linear_weight(down)[0].detach()
    gram = gram.to(device=target.device, dtype=torch.float64)
    keep = choice.keep.to(gram.device).sort().values
    if cross is not None:
        target = corrected_target(target, gram, cross.to(gram)).to(target.dtype)
    new_weight = refit_down(target, gram, keep)
    new = _slim(layers, keep, new_weight)
    errors = output_errors(target, gram, keep, new_weight)
    reports = slim_reports(choice.unit.members, layers, new, (0,) * len(inputs) + (1,), keep,
                           choice.width, (time.perf_counter() - t0) / len(layers), errors)
    return new, reports
