"""Slim attention: fewer query heads, plain ``nn.Linear`` of smaller shape.

In grouped-query attention (LLaMA 2 70B and 3, Mistral, Qwen2/3, Gemma, SmolLM2) each of the
``n_kv`` key/value heads serves ``g = n_heads / n_kv`` query heads: query head ``h`` reads key
and value head ``h // g`` (the order of transformers' ``repeat_kv``). Keeping ``k < g`` query
heads of every group leaves

    q_proj' = q_proj[rows of the kept heads]          exact on the kept heads
    o_proj' = W G[:, S] G[S, S]^-1                    ``W`` o_proj's weight ``(out, n_heads d)``

with ``S`` the kept heads' ``d`` input features each and ``G = E[a a^T]`` the second moment of
o_proj's input (the heads' outputs) on calibration data: o_proj refitted by least squares from
the kept heads alone, exactly as :mod:`.slim` refits ``down_proj`` (the same ridge,
:func:`~.slim.refit_down`). The key/value projections and the KV cache do not change, so every
cache implementation (dynamic, static, offloaded) works as before; the attention module runs
its own forward with ``num_key_value_groups = k``, which the module check
(:func:`grouped_attentions`) confirms it reads.

The only error is o_proj's, as for a slim MLP: the budget prices ``k`` kept heads per group by
``tr(B Sc B^T)`` on the ridged Gram, less the ridge's share of the dropped features' own
moments (:func:`head_ladder`). Heads are dropped one at a time, each the one whose removal
raises that damage least among the groups not yet reduced in the round (an equal count per
group), so the widths share one order. Attention without groups (``n_kv = n_heads``) would
need smaller key/value heads, a cache of another shape: it is not offered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .fit import corrected_target, stable_cholesky
from .report import LayerReport
from .slim import (REFIT_RIDGE, damage_scale, linear_like, output_errors, refit_down,
                   slim_reports)

__all__ = ["GroupedAttention", "HeadChoice", "grouped_attentions", "head_order", "build_heads"]


@dataclass(frozen=True)
class GroupedAttention:
    """One grouped-query attention module: its name, its query and output projections, and
    ``heads`` query heads of ``head_dim`` features in ``groups`` key/value groups."""

    name: str
    q: str
    o: str
    heads: int
    groups: int
    head_dim: int

    @property
    def members(self) -> tuple[str, str]:
        return self.q, self.o

    @property
    def per_group(self) -> int:
        return self.heads // self.groups

    def features(self, heads: Tensor) -> Tensor:
        """The query / o_proj-input features of ``heads`` ``(k,)``, ``(k head_dim,)``."""
        d = self.head_dim
        return (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()


@dataclass(frozen=True)
class HeadChoice:
    """The budget's choice for one attention module: keep query heads ``keep`` (sorted, the
    same count in every group)."""

    unit: GroupedAttention
    keep: Tensor

    @property
    def width(self) -> int:
        return len(self.keep) // self.unit.groups


def _drop_probe(attn: nn.Module, unit: GroupedAttention) -> bool:
    """``attn`` runs with one query head of each group removed as the full module runs with
    those heads' o_proj columns zeroed (checked on a random input): its forward reads
    ``num_key_value_groups`` and the head count from the projections' shapes."""
    q, o = attn.q_proj, attn.o_proj
    ref = q.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, q.in_features, generator=gen).to(ref)
    angles = torch.randn(1, 5, unit.head_dim, generator=gen).to(ref)
    rotary = (angles.cos(), angles.sin())
    dropped = torch.arange(unit.groups) * unit.per_group  # the first head of each group
    keep = torch.tensor([h for h in range(unit.heads) if h not in set(dropped.tolist())])
    rows = unit.features(keep)
    zeroed = o.weight.clone()
    zeroed[:, unit.features(dropped)] = 0
    small_q = linear_like(q, q.weight[rows], None if q.bias is None else q.bias[rows])
    small_o = linear_like(o, o.weight[:, rows], o.bias)
    training = attn.training
    try:
        attn.eval()  # no attention dropout
        with torch.no_grad():
            attn.o_proj = linear_like(o, zeroed, o.bias)
            want = attn(x, position_embeddings=rotary, attention_mask=None)[0]
            attn.q_proj, attn.o_proj = small_q, small_o
            attn.num_key_value_groups = unit.per_group - 1
            got = attn(x, position_embeddings=rotary, attention_mask=None)[0]
    except Exception:  # another signature or head layout: not this kind of attention
        return False
    finally:  # the module as it was
        attn.q_proj, attn.o_proj, attn.num_key_value_groups = q, o, unit.per_group
        attn.train(training)
    tol = 5e-2 if ref.dtype.itemsize <= 2 else 1e-4
    return isinstance(got, Tensor) and got.shape == want.shape and bool(
        (got - want).norm() <= tol * want.norm().clamp_min(1e-30))


def _unit(name: str, attn: nn.Module) -> GroupedAttention | None:
    """The :class:`GroupedAttention` of ``attn`` if it has the parts and attributes grouped
    attention needs (plain linear projections, ``head_dim``, ``num_key_value_groups`` >= 2 that
    match the projections' shapes), else ``None``."""
    parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    per_group, d = getattr(attn, "num_key_value_groups", None), getattr(attn, "head_dim", None)
    if not (all(type(m) is nn.Linear for m in parts) and isinstance(per_group, int)
            and isinstance(d, int) and per_group >= 2 and d >= 1):
        return None
    q, k, v, o = parts
    groups, rest = divmod(k.out_features, d)
    if rest or not groups or v.out_features != k.out_features or \
            q.out_features != groups * per_group * d or o.in_features != q.out_features or \
            q.weight.is_meta:
        return None
    prefix = f"{name}." if name else ""
    return GroupedAttention(name, f"{prefix}q_proj", f"{prefix}o_proj", groups * per_group,
                            groups, d)


def grouped_attentions(model: nn.Module, names: set[str] | list[str]) -> list[GroupedAttention]:
    """The grouped-query attention modules of ``model`` (module docs) whose query and output
    projections are both among ``names``, in model order."""
    names = set(names)
    found = []
    for name, module in model.named_modules():
        unit = _unit(name, module)
        if unit is not None and all(n in names for n in unit.members) and \
                _drop_probe(module, unit):
            found.append(unit)
    return found


@torch.no_grad()
def head_order(unit: GroupedAttention, gram: Tensor, weighted: Tensor,
               ridge: float = REFIT_RIDGE) -> tuple[Tensor, Tensor]:
    """The query heads in the order they are dropped, and the damage left after each drop.

    Args:
        unit: the attention module.
        gram: ``G`` ``(n_heads d, n_heads d)``, o_proj's input second moment.
        weighted: ``B`` ``(out, n_heads d)`` (:func:`~.slim.damage_scale` of o_proj's weight).
        ridge: the refit's ridge (:func:`~.slim.refit_down`).

    Returns:
        ``dropped`` ``(n_heads - n_kv,)``, heads in the order removed (each round removes one
        of every group), and ``damage`` ``(n_heads - n_kv + 1,)``, ``tr(B Sc B^T)`` of the
        ridged Gram less the ridge's share of the dropped features' own moments, after
        ``0, 1, ...`` drops (float64).

    With ``P = G_S^-1`` for the kept features ``S`` and ``M = B G[:, S] P``, removing head
    ``b`` from ``S`` raises ``tr(B Sc B^T)`` by ``tr(M_b P_bb^-1 M_b^T)`` (block downdate of
    the inverse): one inverse per drop prices every candidate.
    """
    g = gram.to(torch.float64)
    moments = g.diagonal().clone()
    g = g + ridge * torch.diag_embed(moments)
    b = weighted.to(device=g.device, dtype=torch.float64)
    own = ridge * b.pow(2).sum(0) * moments  # no risk of the refit: not priced
    bg = b @ g
    total = float((bg * b).sum())
    kept = list(range(unit.heads))
    dropped: list[int] = []
    damage = [0.0]

    def inverse_and_m() -> tuple[Tensor, Tensor]:
        """``P = G_S^-1`` and ``M = B G[:, S] P`` for the kept heads' features ``S``."""
        feats = unit.features(torch.tensor(kept, device=g.device))
        p = torch.cholesky_inverse(stable_cholesky(g[feats][:, feats]))
        return p, bg[:, feats] @ p

    def record() -> None:  # the damage left with the heads kept now
        feats = unit.features(torch.tensor(kept, device=g.device))
        gone = unit.features(torch.tensor(dropped, device=g.device))
        left = total - float((m * bg[:, feats]).sum())
        damage.append(max(left - float(own[gone].sum()), 0.0))

    p, m = inverse_and_m()
    for _ in range(unit.per_group - 1):
        reduced: set[int] = set()
        for _ in range(unit.groups):
            best = None
            for i, h in enumerate(kept):
                if h // unit.per_group in reduced:
                    continue
                blk = slice(i * unit.head_dim, (i + 1) * unit.head_dim)
                mb = m[:, blk]
                rise = float((torch.linalg.solve(p[blk, blk], mb.T) * mb.T).sum())
                if best is None or rise < best[0]:
                    best = (rise, h)
            _, h = best
            kept.remove(h)
            dropped.append(h)
            reduced.add(h // unit.per_group)
            p, m = inverse_and_m()  # one factorisation per drop: the damage and the next choice
            record()
    return torch.tensor(dropped, dtype=torch.long), torch.tensor(damage, dtype=torch.float64)


def head_rungs(unit: GroupedAttention, q: nn.Linear, o: nn.Linear, gram: Tensor,
               grad_sq: Tensor | None, max_keep: float = 1.0
               ) -> list[tuple[int, int, float, Tensor]]:
    """``(heads kept per group, parameters, damage, kept heads)`` for every narrower width the
    budget may choose (parameters of q_proj and o_proj together, at most ``max_keep`` of
    theirs), priced as :func:`~.slim.damage_scale` prices a slim MLP."""
    per_head = unit.head_dim * (q.in_features + o.out_features + (q.bias is not None))
    fixed = o.out_features if o.bias is not None else 0
    dense = per_head * unit.heads + fixed
    weighted, scale = damage_scale(o.weight, grad_sq, gram)
    dropped, left = head_order(unit, gram, weighted)
    rungs = []
    for width in range(unit.per_group - 1, 0, -1):
        n = (unit.per_group - width) * unit.groups  # heads dropped
        params = per_head * width * unit.groups + fixed
        if params <= max_keep * dense:
            keep = sorted(set(range(unit.heads)) - set(dropped[:n].tolist()))
            rungs.append((width, params, scale * float(left[n]), torch.tensor(keep)))
    return rungs


@torch.no_grad()
def build_heads(choice: HeadChoice, attn: nn.Module, gram: Tensor, cross: Tensor | None = None
                ) -> tuple[tuple[nn.Linear, nn.Linear], list[LayerReport]]:
    """The query and output projections ``choice`` asks for, from ``attn``'s and o_proj's input
    second moment ``gram`` on the calibration data, as the compressed earlier blocks produce
    it (with ``cross``, o_proj is refitted to the dense model's outputs, as ``match_dense``
    does for every layer), and a report row for each. The caller sets
    ``attn.num_key_value_groups`` to ``choice.width``."""
    t0 = time.perf_counter()
    q, o = attn.q_proj, attn.o_proj
    gram = gram.to(device=o.weight.device, dtype=torch.float64)
    feats = choice.unit.features(choice.keep.to(gram.device).sort().values)
    target = o.weight.detach()
    if cross is not None:
        target = corrected_target(target, gram, cross.to(gram)).to(target.dtype)
    refit = refit_down(target, gram, feats)
    new_o = linear_like(o, refit.to(o.weight), o.bias)
    new_q = linear_like(q, q.weight[feats], None if q.bias is None else q.bias[feats])
    reports = slim_reports(choice.unit.members, (q, o), (new_q, new_o), (0, 1), feats,
                           choice.width, (time.perf_counter() - t0) / 2,
                           output_errors(target, gram, feats, refit))
    return (new_q, new_o), reports
