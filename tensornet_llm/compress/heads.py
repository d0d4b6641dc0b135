"""Slim attention: fewer heads, plain ``nn.Linear`` of smaller shape.

In grouped-query attention (LLaMA 2 70B and 3, Mistral, Qwen2/3, Gemma, SmolLM2) each of the
``n_kv`` key/value heads serves ``g = n_heads / n_kv`` query heads: query head ``h`` reads key
and value head ``h // g`` (the order of transformers' ``repeat_kv``); multi-head attention is
the case ``g = 1``. Two ways to drop heads keep it an ordinary attention:

* **fewer query heads**: ``k < g`` query heads in every group; the key/value projections and
  the KV cache keep their shapes;
* **fewer key/value heads**: whole groups dropped, their key/value head with the query heads
  that read it (and, in the groups kept, possibly fewer query heads too); ``k_proj`` and
  ``v_proj`` lose those heads' rows and the KV cache shrinks alike. Offered where ``k_proj``
  and ``v_proj`` are targets too.

Either way ``q_proj'``, ``k_proj'``, ``v_proj'`` are rows of the originals (exact on what is
kept), and

    o_proj' = W G[:, S] G[S, S]^-1                    ``W`` o_proj's weight ``(out, n_heads d)``

with ``S`` the kept query heads' ``d`` input features each and ``G = E[a a^T]`` the second moment
of o_proj's input (the heads' outputs) on calibration data: o_proj refitted by least squares
from the kept heads alone, exactly as :mod:`.slim` refits ``down_proj`` (the same ridge,
:func:`~.slim.refit_down`). The attention module runs its own forward with
``num_key_value_groups = k``, reading the number of heads from its projections' shapes, which
the module check (:func:`grouped_attentions`) confirms on a random input for each kind of drop.
transformers' caches size themselves from the first keys and values they get, so dynamic and
static caches both work with fewer key/value heads.

The only error is o_proj's, as for a slim MLP: the budget prices every kept set by
``tr(B Sc B^T)`` on the ridged Gram, less the ridge's share of the dropped features' own
moments (:func:`drop_rungs`). Whole groups go first, each the one whose removal raises that
damage least; then, with each number of groups kept, query heads are dropped one at a time,
each the cheapest among the groups not yet reduced in the round (an equal count per group).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .fit import corrected_target, stable_cholesky
from .report import LayerReport
from .slim import (REFIT_RIDGE, damage_scale, kept_rows, linear_like, output_errors, refit_down,
                   slim_reports)

__all__ = ["GroupedAttention", "HeadChoice", "grouped_attentions", "drop_rungs", "head_rungs",
           "build_heads"]


@dataclass(frozen=True)
class GroupedAttention:
    """One attention module whose heads may be dropped: its name, its projections' names, and
    ``heads`` query heads of ``head_dim`` features in ``groups`` key/value groups. ``k`` and
    ``v`` name the key/value projections where whole groups may go (:attr:`drops_groups`),
    else ``None``."""

    name: str
    q: str
    o: str
    heads: int
    groups: int
    head_dim: int
    k: str | None = None
    v: str | None = None

    @property
    def members(self) -> tuple[str, ...]:
        """The projections a choice changes: ``(q, o)``, or ``(q, k, v, o)``."""
        return (self.q, self.o) if self.k is None else (self.q, self.k, self.v, self.o)

    @property
    def per_group(self) -> int:
        return self.heads // self.groups

    @property
    def drops_groups(self) -> bool:
        return self.k is not None

    def features(self, heads: Tensor) -> Tensor:
        """The query / o_proj-input features of query ``heads`` ``(k,)``, ``(k head_dim,)``;
        also the key / value features of key/value heads."""
        return _spans(heads, self.head_dim)

    def heads_of(self, groups: Tensor) -> Tensor:
        """The query heads of ``groups`` ``(j,)``, ``(j per_group,)``, in order."""
        return _spans(groups, self.per_group)


def _spans(starts: Tensor, size: int) -> Tensor:
    """``[i size, ..., i size + size - 1]`` for each ``i`` of ``starts``, concatenated."""
    return (starts[:, None] * size + torch.arange(size, device=starts.device)).flatten()


@dataclass(frozen=True)
class HeadChoice:
    """The budget's choice for one attention module: keep query heads ``keep`` (sorted, the
    same count in every group that keeps any), and the key/value heads of those groups."""

    unit: GroupedAttention
    keep: Tensor

    @property
    def groups(self) -> Tensor:
        """The key/value groups kept ``(j,)``, sorted."""
        return torch.unique(self.keep // self.unit.per_group)

    @property
    def width(self) -> int:
        """Query heads per kept group: the attention's ``num_key_value_groups``."""
        return len(self.keep) // len(self.groups)

    @property
    def members(self) -> tuple[str, ...]:
        """The projections this choice replaces: the unit's, less ``k`` and ``v`` where every
        group stays."""
        return self.unit.members if len(self.groups) < self.unit.groups else (
            self.unit.q, self.unit.o)


def _slimmed(attn: nn.Module, unit: GroupedAttention, keep: Tensor, o_weight: Tensor
             ) -> dict[str, nn.Linear]:
    """The projections of ``attn`` keeping query heads ``keep`` and their groups, o_proj with
    ``o_weight`` ``(out, len(keep) d)``, by attribute name (``k_proj`` and ``v_proj`` only
    where a group goes)."""
    choice = HeadChoice(unit, keep)
    layers = {"q_proj": kept_rows(attn.q_proj, unit.features(keep)),
              "o_proj": linear_like(attn.o_proj, o_weight, attn.o_proj.bias)}
    if len(choice.groups) < unit.groups:
        for part in ("k_proj", "v_proj"):
            layers[part] = kept_rows(getattr(attn, part), unit.features(choice.groups))
    return layers


def _drop_probe(attn: nn.Module, unit: GroupedAttention, keep: Tensor) -> bool:
    """``attn`` runs with only query heads ``keep`` and their groups' key/value heads as the full
    module runs with the other heads' o_proj columns zeroed (checked on a random input): its
    forward reads ``num_key_value_groups`` and the head counts from the projections' shapes."""
    o = attn.o_proj
    ref = o.weight
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, attn.q_proj.in_features, generator=gen).to(ref)
    angles = torch.randn(1, 5, unit.head_dim, generator=gen).to(ref)
    rotary = (angles.cos(), angles.sin())
    zeroed = torch.zeros_like(o.weight)
    rows = unit.features(keep)
    zeroed[:, rows] = o.weight[:, rows]
    small = _slimmed(attn, unit, keep, o.weight[:, rows])
    original = {n: getattr(attn, n) for n in (*small, "num_key_value_groups")}
    training = attn.training
    try:
        attn.eval()  # no attention dropout
        with torch.no_grad():
            attn.o_proj = linear_like(o, zeroed, o.bias)
            want = attn(x, position_embeddings=rotary, attention_mask=None)[0]
            for n, layer in small.items():
                setattr(attn, n, layer)
            attn.num_key_value_groups = HeadChoice(unit, keep).width
            got = attn(x, position_embeddings=rotary, attention_mask=None)[0]
    except Exception:  # another signature or head layout: not this kind of attention
        return False
    finally:  # the module as it was
        for n, part in original.items():
            setattr(attn, n, part)
        attn.train(training)
    tol = 5e-2 if ref.dtype.itemsize <= 2 else 1e-4
    return isinstance(got, Tensor) and got.shape == want.shape and bool(
        (got - want).norm() <= tol * want.norm().clamp_min(1e-30))


def _unit(name: str, attn: nn.Module, names: set[str]) -> GroupedAttention | None:
    """The :class:`GroupedAttention` of ``attn`` if it has the parts and attributes grouped
    attention needs (plain linear projections, ``head_dim``, ``num_key_value_groups`` that
    match the projections' shapes), with ``q_proj`` and ``o_proj`` among ``names`` and a way to
    drop heads (two query heads per group, or two groups with ``k_proj`` and ``v_proj`` among
    ``names``) that its forward passes (:func:`_drop_probe`); else ``None``."""
    parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    per_group, d = getattr(attn, "num_key_value_groups", None), getattr(attn, "head_dim", None)
    if not (all(type(m) is nn.Linear for m in parts) and isinstance(per_group, int)
            and isinstance(d, int) and per_group >= 1 and d >= 1):
        return None
    q, k, v, o = parts
    groups, rest = divmod(k.out_features, d)
    if rest or not groups or v.out_features != k.out_features or \
            q.out_features != groups * per_group * d or o.in_features != q.out_features or \
            q.weight.is_meta:
        return None
    prefix = f"{name}." if name else ""
    full = {p: f"{prefix}{p}_proj" for p in "qkvo"}
    if not {full["q"], full["o"]} <= names:
        return None
    heads = groups * per_group
    unit = GroupedAttention(name, full["q"], full["o"], heads, groups, d)
    if per_group >= 2 and not _drop_probe(  # the first head of every group dropped
            attn, unit, torch.tensor([h for h in range(heads) if h % per_group])):
        return None
    if groups >= 2 and {full["k"], full["v"]} <= names and _drop_probe(  # the first group
            attn, unit, torch.arange(per_group, heads)):
        return GroupedAttention(name, full["q"], full["o"], heads, groups, d, full["k"],
                                full["v"])
    return unit if per_group >= 2 else None


def grouped_attentions(model: nn.Module, names: set[str] | list[str]) -> list[GroupedAttention]:
    """The attention modules of ``model`` whose heads may be dropped (module docs), with their
    query and output projections among ``names`` (and the key/value projections, for whole
    groups), in model order."""
    names = set(names)
    found = []
    for name, module in model.named_modules():
        unit = _unit(name, module, names)
        if unit is not None:
            found.append(unit)
    return found


class _Drops:
    """``tr(B Sc B^T)`` on the ridged Gram for o_proj refitted from the features of the query
    heads kept, as heads are removed a block at a time.

    With ``P = G_S^-1`` for the kept features ``S`` and ``M = B G[:, S] P``, removing the block
    ``b`` raises it by ``tr(M_b P_bb^-1 M_b^T)``, and the block downdates
    ``P' = P_rr - P_rb P_bb^-1 P_br``, ``M' = M_r - M_b P_bb^-1 P_br`` (``r`` the rest) keep
    both for the next step without a new factorisation. Every query head is kept at first;
    :meth:`start` begins again from another set."""

    def __init__(self, unit: GroupedAttention, gram: Tensor, weighted: Tensor,
                 ridge: float) -> None:
        g = gram.to(torch.float64)
        moments = g.diagonal().clone()
        self.g = g + ridge * torch.diag_embed(moments)
        b = weighted.to(device=g.device, dtype=torch.float64)
        self.unit = unit
        self.own = ridge * b.pow(2).sum(0) * moments  # no risk of the refit: not priced
        self.bg = b @ self.g
        self.total = float((self.bg * b).sum())
        self.start(torch.arange(unit.heads))

    def start(self, heads: Tensor) -> None:
        """Keep the query heads ``heads`` ``(k,)`` (in order), and no others."""
        self.heads = heads.tolist()
        feats = self.unit.features(heads.to(self.g.device))
        self.p = torch.cholesky_inverse(stable_cholesky(self.g[feats][:, feats]))
        self.m = self.bg[:, feats] @ self.p
        self.left = self.total - float((self.m * self.bg[:, feats]).sum())

    def _blocks(self, heads: list[int]) -> tuple[Tensor, Tensor]:
        """The positions of ``heads``' features among the kept ones, and of the others."""
        block = set(heads)
        inside = torch.tensor([h in block for h in self.heads], device=self.m.device)
        inside = inside.repeat_interleave(self.unit.head_dim)
        return inside.nonzero().flatten(), (~inside).nonzero().flatten()

    def rise(self, heads: list[int]) -> float:
        b, _ = self._blocks(heads)
        mb = self.m[:, b]
        return float((torch.linalg.solve(self.p[b][:, b], mb.T) * mb.T).sum())

    def drop(self, heads: list[int]) -> None:
        b, r = self._blocks(heads)
        mb = self.m[:, b]
        solved = torch.linalg.solve(self.p[b][:, b], torch.cat([mb.T, self.p[b][:, r]], 1))
        self.left += float((solved[:, : mb.shape[0]] * mb.T).sum())
        to_rest = solved[:, mb.shape[0]:]  # P_bb^-1 P_br
        self.m = self.m[:, r] - mb @ to_rest
        self.p = self.p[r][:, r] - self.p[r][:, b] @ to_rest
        block = set(heads)
        self.heads = [h for h in self.heads if h not in block]

    def cheapest(self, blocks: list[list[int]]) -> list[int]:
        return min(blocks, key=self.rise)

    @property
    def damage(self) -> float:
        """``tr(B Sc B^T)`` less the ridge's share of the dropped features' own moments."""
        kept = set(self.heads)
        gone = [h for h in range(self.unit.heads) if h not in kept]
        own = float(self.own[self.unit.features(torch.tensor(gone, dtype=torch.long))].sum())
        return max(self.left - own, 0.0)


@torch.no_grad()
def drop_rungs(unit: GroupedAttention, gram: Tensor, weighted: Tensor,
               ridge: float = REFIT_RIDGE) -> list[tuple[Tensor, float]]:
    """Every narrower attention the budget may choose, as ``(kept query heads, damage)``: with
    ``j`` groups kept (fewer only if :attr:`~GroupedAttention.drops_groups`), each number of
    query heads per group, the full attention excepted (module docs).

    Args:
        unit: the attention module.
        gram: ``G`` ``(n_heads d, n_heads d)``, o_proj's input second moment.
        weighted: ``B`` ``(out, n_heads d)`` (:func:`~.slim.damage_scale` of o_proj's weight).
        ridge: the refit's ridge (:func:`~.slim.refit_down`).

    The damage is ``tr(B Sc B^T)`` of the ridged Gram less the ridge's share of the dropped
    features' own moments (float64). Groups are dropped in one greedy order (each the cheapest
    left), so fewer groups keep a subset of the groups more keep."""
    every = torch.arange(unit.groups)
    order: list[int] = []
    rungs = []
    drops = _Drops(unit, gram, weighted, ridge)
    if unit.drops_groups:  # whole groups, every query head of the rest kept
        for _ in range(unit.groups - 1):
            kept = [int(g) for g in every if int(g) not in set(order)]
            group = drops.cheapest([unit.heads_of(torch.tensor([g])).tolist() for g in kept])
            drops.drop(group)
            order.append(group[0] // unit.per_group)
            rungs.append((torch.tensor(drops.heads), drops.damage))
    # With j groups kept, rounds of query heads (none where a group has one query head only).
    for j in (range(unit.groups, unit.groups - len(order) - 1, -1) if unit.per_group > 1 else ()):
        groups = torch.tensor(sorted(set(every.tolist()) - set(order[: unit.groups - j])))
        drops.start(unit.heads_of(groups))
        for _ in range(unit.per_group - 1):  # a round: one query head of every kept group
            reduced: set[int] = set()
            for _ in range(j):
                head = drops.cheapest([[h] for h in drops.heads
                                       if h // unit.per_group not in reduced])
                drops.drop(head)
                reduced.add(head[0] // unit.per_group)
            rungs.append((torch.tensor(drops.heads), drops.damage))
    return rungs


def head_rungs(unit: GroupedAttention, layers: dict[str, nn.Linear], gram: Tensor,
               grad_sq: Tensor | None, max_keep: float = 1.0) -> list[tuple[int, float, Tensor]]:
    """``(parameters, damage, kept query heads)`` for every narrower attention the budget may
    choose (:func:`drop_rungs`; parameters of the unit's members ``layers``, by name, at most
    ``max_keep`` of theirs), priced as :func:`~.slim.damage_scale` prices a slim MLP."""
    q, o = layers[unit.q], layers[unit.o]
    d = unit.head_dim
    per_head = d * (q.in_features + o.out_features + (q.bias is not None))
    per_kv_head = sum(d * (layers[n].in_features + (layers[n].bias is not None))
                      for n in (unit.k, unit.v) if n is not None)
    fixed = o.out_features if o.bias is not None else 0

    def params(keep: Tensor) -> int:
        return per_head * len(keep) + per_kv_head * len(HeadChoice(unit, keep).groups) + fixed

    dense = params(torch.arange(unit.heads))
    weighted, scale = damage_scale(o.weight, grad_sq, gram)
    return [(params(keep), scale * damage, keep)
            for keep, damage in drop_rungs(unit, gram, weighted)
            if params(keep) <= max_keep * dense]


@torch.no_grad()
def build_heads(choice: HeadChoice, attn: nn.Module, gram: Tensor, cross: Tensor | None = None
                ) -> tuple[tuple[nn.Linear, ...], list[LayerReport]]:
    """The projections ``choice`` asks for, in the order of ``choice.members``, from
    ``attn`` and o_proj's input second moment ``gram`` on the calibration data, as the
    compressed earlier blocks produce it (with ``cross``, o_proj is refitted to the dense
    model's outputs, as ``match_dense`` does for every layer), and a report row for each. The
    caller sets ``attn.num_key_value_groups`` to ``choice.width``."""
    t0 = time.perf_counter()
    unit, o = choice.unit, attn.o_proj
    gram = gram.to(device=o.weight.device, dtype=torch.float64)
    feats = unit.features(choice.keep.to(gram.device).sort().values)
    target = o.weight.detach()
    if cross is not None:
        target = corrected_target(target, gram, cross.to(gram)).to(target.dtype)
    refit = refit_down(target, gram, feats)
    layers = _slimmed(attn, unit, choice.keep.sort().values, refit.to(o.weight))
    parts = [n.rpartition(".")[2] for n in choice.members]
    new = tuple(layers[p] for p in parts)
    seconds = (time.perf_counter() - t0) / len(parts)
    errors = output_errors(target, gram, feats, refit)
    kv = unit.features(choice.groups)
    reports = [slim_reports((name,), (getattr(attn, p),), (layer,), (int(p == "o_proj"),),
                            kv if p in ("k_proj", "v_proj") else feats, choice.width, seconds,
                            errors)[0]
               for name, p, layer in zip(choice.members, parts, new)]
    return new, reports
