"""Next-token cross-entropy plus distillation KL over a large vocabulary, a few rows at a time.

Written out with tensor ops, the healing loss makes a dozen passes over float32 copies of the
``(batch, seq, vocab)`` logits (the upcast, two log-softmaxes, the teacher's probabilities, the
products, and as many again in the backward pass), each a fresh tensor of hundreds of MB at a
vocabulary of tens of thousands. Here the loss and its gradient with respect to the student's
logits are computed together, on chunks of rows small enough to stay in cache, and the gradient
is kept in the logits' own dtype until the backward pass asks for it: memory traffic drops to a
few passes over the logits, and no vocabulary-sized float32 tensor of the whole batch exists.

For one scored position with student logits ``s``, teacher logits ``t``, target ``y``, weight
``w`` (its share of the mean), ``q_T = softmax(s / T)``, ``p_T = softmax(t / T)``::

    loss = w * (ce_weight * -log softmax(s)[y] + distill_weight * T^2 * KL(p_T || q_T))
    d loss / d s = w * (ce_weight * (softmax(s) - onehot(y)) + distill_weight * T * (q_T - p_T))
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ArgumentError

__all__ = ["token_loss"]

#: Elements per chunk (rows x vocabulary): 256 Ki float32 values, 1 MiB per temporary, so a
#: chunk's dozen passes run in cache (16 MiB chunks ran slower on a 2-core CPU).
CHUNK_ELEMENTS = 1 << 18


class _TokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, teacher: Tensor | None, targets: Tensor, weights: Tensor,
                ce_weight: float, distill_weight: float, temperature: float, chunk_rows: int
                ) -> tuple[Tensor, Tensor, Tensor]:
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # a view for the contiguous logits a model returns
        flat_t = None if teacher is None else teacher.reshape(-1, vocab)
        targets, weights = targets.reshape(-1), weights.reshape(-1).float()
        grad = torch.empty_like(flat) if logits.requires_grad else None
        ce = torch.zeros((), dtype=torch.float64, device=logits.device)
        kl = torch.zeros((), dtype=torch.float64, device=logits.device)
        t = float(temperature)
        for start in range(0, flat.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            s, w = flat[rows].float(), weights[rows]
            tgt = targets[rows].clamp_min(0).unsqueeze(1)
            log_q = torch.log_softmax(s, -1)
            ce += (log_q.gather(1, tgt).squeeze(1) * w).sum(dtype=torch.float64).neg()
            if flat_t is not None:
                log_q_t = log_q if t == 1 else torch.log_softmax(s / t, -1)
                teacher_rows = flat_t[rows].float()  # float32 logits: a view, never changed
                log_p_t = torch.log_softmax(teacher_rows if t == 1 else teacher_rows / t, -1)
                p_t = log_p_t.exp()
                kl_rows = (p_t * log_p_t.sub_(log_q_t)).sum(-1)
                kl += (kl_rows * w).sum(dtype=torch.float64) * (t * t)
            if grad is None:
                continue
            # g: the gradient per unit weight, ce_weight (softmax(s) - onehot(y)) + ...
            q = log_q.exp()
            g = q * ce_weight
            g.scatter_add_(1, tgt, torch.full_like(w, -ce_weight).unsqueeze(1))
            if flat_t is not None and distill_weight:
                q_t = q if t == 1 else log_q_t.exp_()
                g.add_(q_t.sub_(p_t), alpha=distill_weight * t)
            grad[rows] = g.mul_(w.unsqueeze(1))
        loss = (ce_weight * ce + distill_weight * kl).float()
        ce, kl = ce.float(), kl.float()
        if grad is not None:
            ctx.save_for_backward(grad.view_as(logits))
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _ce: Tensor, _kl: Tensor):
        grad, = ctx.saved_tensors
        if grad_loss.device.type == "cpu" and bool(grad_loss == 1):  # the usual loss.backward()
            return grad, None, None, None, None, None, None, None  # (no fresh logits-sized copy)
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


def token_loss(logits: Tensor, targets: Tensor, weights: Tensor, teacher: Tensor | None = None,
               ce_weight: float = 1.0, distill_weight: float = 0.0, temperature: float = 1.0
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The weighted sum over positions of ``ce_weight * CE + distill_weight * T^2 * KL``.

    Args:
        logits: the student's logits ``(..., vocab)``, any float dtype (bf16 under autocast);
            the gradient comes back in that dtype.
        targets: ``(...)`` token ids, ``-100`` (or any negative id) where nothing is scored.
        weights: ``(...)`` each position's weight (e.g. ``1 / n`` on the ``n`` scored ones, 0
            elsewhere: the mean over scored positions).
        teacher: the teacher's logits ``(..., vocab)`` for the KL term, or ``None``.
        ce_weight, distill_weight, temperature: as in :class:`~tensornet_llm.train.heal.HealConfig`.

    Returns:
        ``(loss, ce, kl)``: float32 scalars; ``ce`` and ``kl`` are the weighted sums of each term
        alone (``kl`` with its ``T^2``), without gradient; ``loss`` backpropagates to ``logits``.
    """
    if teacher is not None and teacher.shape != logits.shape:
        raise ArgumentError(f"teacher logits {tuple(teacher.shape)} and student logits "
                         f"{tuple(logits.shape)} differ in shape")
    if targets.shape != logits.shape[:-1] or weights.shape != targets.shape:
        raise ArgumentError(f"targets {tuple(targets.shape)} and weights {tuple(weights.shape)} must "
                         f"have the logits' leading shape {tuple(logits.shape[:-1])}")
    chunk_rows = max(1, CHUNK_ELEMENTS // max(logits.shape[-1], 1))
    return _TokenLoss.apply(logits, teacher, targets, weights, float(ce_weight),
                            float(distill_weight), float(temperature), chunk_rows)
