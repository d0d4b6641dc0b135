"""Healing: a short fine-tune of a compactified model, optionally distilled from the dense one.

The loss of one micro-batch is::

    ce_weight * CE(student)                               next-token cross-entropy
  + distill_weight * T^2 * KL(teacher_T || student_T)     on logits at temperature T
  + hidden_weight * mean_l ||h_l^s - h_l^t||^2 / ||h_l^t||^2   hidden states of every block

averaged over the tokens that count (``attention_mask`` and ``labels == -100`` respected).
Training runs through :class:`accelerate.Accelerator`: device placement, gradient
accumulation, mixed precision (bf16 where the GPU or CPU supports it) and checkpoints of the
whole training state, so an interrupted run resumes where it stopped with the same data order.

Launched on ``N`` processes (``torchrun --nproc_per_node N`` or ``accelerate launch``, on GPUs
or on CPUs with gloo), every process runs :func:`heal` on the same ``batches`` and trains on its
share of them data-parallel: the batches are taken in groups of ``N`` consecutive ones (the
groups reshuffled every pass), batch ``i`` of a group going to rank ``i mod N``, and gradients
are averaged across ranks. One step on ``N`` processes is therefore one step on the ``N``
batches of a group together, as one process would take it on their concatenation.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError, ArgumentTypeError, HealingCheckWarning
from ..helpers.evaluate import next_token_targets, summed_nll
from ..helpers.files import atomic_directory, check_output
from ..layers.base import TensorNetworkLinear
from ..layers.layout import COMPRESSED
from ..compress.calibrate import as_batches, check_token_ids
from .qat import rounded_weights, rounding_plan
from .quantize_selection import QuantizeConfig, as_quantize_config
from .token_loss import token_loss

__all__ = ["HealConfig", "HealResult", "auto_precision", "heal", "trainable_parameters"]

Train = Literal["all", "blocks", "cores"]
PROGRESS_FILE = "progress.json"
_now = time.perf_counter  # the clock of result.seconds and max_minutes (a test may replace it)


@dataclass
class HealConfig:
    """Settings of :func:`heal` (every field can also be passed to it as a keyword).

    Attributes:
        steps: optimiser steps (at most; see ``max_minutes``).
        max_minutes: a wall-clock budget: training ends after the step that reaches it, and
            the cosine decay follows whichever of steps and time runs out first (so the rate
            has decayed by the deadline). The last step may end a little after the budget;
            the final check (if any) comes on top. ``None``: steps alone decide.
        lr: peak learning rate of AdamW. The default, 3e-4 with 20 warm-up steps, is the
            recipe measured on held-out domains (docs/comparison.md): on SmolLM2 at keep 50%,
            5e-4 and 1e-3 did worse in the same 30 minutes.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps, then cosine decay to 10% of ``lr``
            (``schedule="constant"``: warm-up then constant).
        schedule: after the warm-up, ``"cosine"`` decay or a ``"constant"`` rate.
        gradient_accumulation_steps: micro-batches per optimiser step.
        max_grad_norm: gradient clipping (``None``: off).
        mixed_precision: ``"no"``, ``"fp16"``, ``"bf16"`` or ``"auto"`` (bf16 on a GPU that
            supports it and on a CPU with AMX, otherwise full precision; see
            :func:`auto_precision`). Weights, gradients and optimiser state stay float32.
        ce_weight, distill_weight, hidden_weight, temperature: the loss terms (module docs);
            ``distill_weight=None`` means 1.0 when a teacher is given, else 0.
        train: what the steps update: ``"all"`` parameters; ``"blocks"``: all but the token
            embeddings and the LM head (often one tied table, the largest matrix of a small
            model: compression leaves it as it was, and its gradient and optimiser step cost
            the most per parameter); or only the tensor-network ``"cores"``. ``None``
            (default): ``"blocks"``, or ``"all"`` with ``quantize`` (which rounds the table
            too, so it trains through its own rounding) and for a model without
            ``get_input_embeddings`` (not a transformers model); see :meth:`trained`. On
            SmolLM2 at keep 50%, 30 minutes of healing with ``"blocks"`` ended at 1.58x dense
            perplexity (geometric mean over held-out domains, worst 2.44x) against 1.61x
            (worst 2.60x) with ``"all"`` (docs/comparison.md).
        checkpoint_dir: where to keep the latest training state; an existing one is resumed.
        checkpoint_every: optimiser steps between checkpoints (and one at the end).
        check_every: optimiser steps between checks of the ``check`` text given to
            :func:`heal` (also one before the first step and one after the last).
        check_patience: checks in a row whose perplexity is above the best so far by more
            than ``check_tolerance`` (relative) before ``on_rise`` acts.
        check_tolerance: how far (relative) above the best a check may be without counting as
            a rise.
        on_rise: ``"stop"``: end training and restore the weights of the best check;
            ``"warn"``: warn (:class:`~tensornet_llm.errors.HealingCheckWarning`) and go on.
        quantize: quantization-aware healing for the rounding that
            :func:`~tensornet_llm.train.quantize.quantize` will apply after it: 8 or 4 (bits),
            or a :class:`~tensornet_llm.train.quantize_selection.QuantizeConfig`. Every forward and
            backward pass of the model and every check computes with the rounded weights, and
            the float weights take the updates (the straight-through estimate), so
            ``quantize(model, <the same>)`` afterwards gives the model the checks measured.
            ``None``: train the float model.
        seed: data order and RNG.
        cpu: train on the CPU even when a GPU is present (a multi-process launch on a machine
            without a GPU trains on the CPUs without it).
        progress: show a progress bar with the loss.
    """

    steps: int = 100
    max_minutes: float | None = None
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    ce_weight: float = 1.0
    distill_weight: float | None = None
    hidden_weight: float = 0.0
    temperature: float = 1.0
    train: Train | None = None
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 50
    check_every: int = 50
    check_patience: int = 2
    check_tolerance: float = 0.02
    on_rise: Literal["stop", "warn"] = "stop"
    quantize: int | QuantizeConfig | None = None
    seed: int = 0
    cpu: bool = False
    progress: bool = True

    def trained(self, model: nn.Module | None = None) -> Train:
        """What :attr:`train` stands for: itself, or for ``None`` the default: ``"blocks"``,
        ``"all"`` for quantization-aware healing and for a ``model`` without embedding
        getters (not a transformers model; ``None``: assume it has them)."""
        if self.train is not None:
            return self.train
        if self.quantize is not None or (model is not None and not _tables(model)):
            return "all"
        return "blocks"

    def validate(self, has_teacher: bool) -> None:
        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ArgumentError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check("steps", is_int(self.steps) and self.steps >= 1, "an integer >= 1")
        check("max_minutes", self.max_minutes is None or (is_num(self.max_minutes)
              and self.max_minutes > 0), "None or a positive number")
        check("lr", is_num(self.lr) and self.lr > 0, "a positive number")
        check("weight_decay", is_num(self.weight_decay) and self.weight_decay >= 0, "a number >= 0")
        check("warmup_steps", is_int(self.warmup_steps) and self.warmup_steps >= 0, "an integer >= 0")
        check("schedule", self.schedule in ("cosine", "constant"), "'cosine' or 'constant'")
        check("gradient_accumulation_steps",
              is_int(self.gradient_accumulation_steps) and self.gradient_accumulation_steps >= 1,
              "an integer >= 1")
        check("max_grad_norm", self.max_grad_norm is None or (is_num(self.max_grad_norm)
              and self.max_grad_norm > 0), "None or a positive number")
        check("mixed_precision", self.mixed_precision in ("auto", "no", "fp16", "bf16"),
              "'auto', 'no', 'fp16' or 'bf16'")
        for name in ("ce_weight", "hidden_weight"):
            check(name, is_num(getattr(self, name)) and getattr(self, name) >= 0, "a number >= 0")
        check("distill_weight", self.distill_weight is None or (is_num(self.distill_weight)
              and self.distill_weight >= 0), "None or a number >= 0")
        check("temperature", is_num(self.temperature) and self.temperature > 0, "a positive number")
        check("train", self.train in (None, "all", "blocks", "cores"),
              "None, 'all', 'blocks' or 'cores'")
        for name in ("checkpoint_every", "check_every", "check_patience"):
            check(name, is_int(getattr(self, name)) and getattr(self, name) >= 1,
                  "an integer >= 1")
        check("check_tolerance", is_num(self.check_tolerance) and self.check_tolerance >= 0,
              "a number >= 0")
        check("on_rise", self.on_rise in ("stop", "warn"), "'stop' or 'warn'")
        if self.quantize is not None:
            check("quantize", isinstance(self.quantize, QuantizeConfig) or (
                is_int(self.quantize) and self.quantize in (8, 4)),
                "None, 8, 4 or a QuantizeConfig")
            try:
                as_quantize_config(self.quantize)
            except ArgumentError as err:
                raise ArgumentError(f"quantize: {err}") from None
        if not has_teacher and ((self.distill_weight or 0) > 0 or self.hidden_weight > 0):
            raise ArgumentError("distill_weight and hidden_weight need a teacher= model")
        if self.ce_weight == 0 and not has_teacher:
            raise ArgumentError("ce_weight=0 leaves no loss without a teacher= model")


@dataclass
class HealResult:
    """Per optimiser step: the total loss and its terms (each averaged over the micro-batches)."""

    losses: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    distill: list[float] = field(default_factory=list)
    hidden: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0  # steps already done by an earlier run (read from the checkpoint)
    mixed_precision: str = "no"  # what was used ("auto" resolved)
    train: str = "all"  # what the steps updated (HealConfig.train resolved)
    lr: float = HealConfig.lr  # the peak learning rate used
    checks: list[tuple[int, float]] = field(default_factory=list)  # (step, check perplexity)
    best_step: int | None = None  # the step of the lowest check perplexity
    stopped_early: bool = False  # on_rise="stop" acted: the weights are the best check's
    out_of_time: bool = False  # max_minutes ended training before ``steps``

    @property
    def steps(self) -> int:
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def trainable_parameters(model: nn.Module, train: Train = "all") -> list[nn.Parameter]:
    """The parameters :func:`heal` updates: all; all but the token embeddings and LM head
    (``"blocks"``); or only the cores of tensor-network layers (and the factor weights of
    low-rank layers)."""
    if train == "all":
        return [p for p in model.parameters()]
    if train == "blocks":
        tables = _tables(model)
        if not tables:
            raise ArgumentError("train='blocks' needs a model with get_input_embeddings() "
                                "(a transformers model)")
        skip = {id(p) for m in tables for p in m.parameters()}
        return [p for p in model.parameters() if id(p) not in skip]
    cores = {id(c): c for m in model.modules() if isinstance(m, COMPRESSED)
             for c in (m.cores if isinstance(m, TensorNetworkLinear) else
                       [p for p in m.parameters() if p.dim() == 2])}
    if not cores:
        raise ArgumentError("train='cores' but the model has no tensor-network layers (compactify it first)")
    return list(cores.values())


def _tables(model: nn.Module) -> list[nn.Module]:
    """The token embeddings and LM head of a transformers model (one module when tied)."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            module = get() if callable(get) else None
        except NotImplementedError:  # transformers' default where a model has none
            module = None
        if module is not None and module not in found:
            found.append(module)
    return found


def _loss_terms(out, teacher_out, targets: Tensor, cfg: HealConfig, distill: float
                ) -> tuple[Tensor, dict[str, float]]:
    # Position i predicts targets[:, i]; the last position predicts nothing. Padding the targets
    # lets token_loss read the logits as the model returned them, without a sliced copy.
    full = F.pad(targets, (0, 1), value=-100)
    keep = full >= 0
    weights = keep / keep.sum().clamp_min(1)
    teacher_logits = teacher_out.logits if teacher_out is not None and distill > 0 else None
    loss, ce, kl = token_loss(out.logits, full, weights, teacher_logits, cfg.ce_weight, distill,
                              cfg.temperature)
    terms = {"ce": float(ce), "distill": float(kl), "hidden": 0.0}
    if teacher_out is not None and cfg.hidden_weight > 0:
        pairs = list(zip(out.hidden_states[1:], teacher_out.hidden_states[1:]))
        mse = sum(((s.float() - h.float()).pow(2).mean() / h.float().pow(2).mean().clamp_min(1e-12))
                  for s, h in pairs) / max(len(pairs), 1)
        loss = loss + cfg.hidden_weight * mse
        terms["hidden"] = float(mse.detach())
    return loss, terms


def _adamw(params: list[nn.Parameter], cfg: HealConfig) -> torch.optim.AdamW:
    """AdamW with its fused kernel (one pass over each parameter's state, faster than the
    per-tensor loop) where this torch has one for the parameters' device."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel here: the default loop
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _order(n_batches: int, position: int, seed: int) -> int:
    """Index of micro-batch ``position`` in a reshuffled-per-epoch stream (deterministic)."""
    epoch, k = divmod(position, n_batches)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n_batches, generator=g)[k])


def heal(
    model: nn.Module,
    batches: Iterable[Any],
    steps: int | None = None,
    lr: float | None = None,
    teacher: nn.Module | None = None,
    *,
    config: HealConfig | None = None,
    callback: Callable[[int, HealResult], None] | None = None,
    check: Iterable[Any] | None = None,
    **options: Any,
) -> HealResult:
    """Fine-tune ``model`` in place on next-token prediction (plus optional distillation).

    Args:
        model: a causal language model (compactified or not).
        batches: token-id tensors ``(batch, seq)`` or dicts with ``input_ids`` (and optionally
            ``attention_mask``, ``labels``); a DataLoader works. Reshuffled every pass.
        steps, lr: optimiser steps and peak learning rate (see :class:`HealConfig`).
        teacher: the dense model for distillation (kept frozen, moved to the training device).
        config: a :class:`HealConfig`; ``options`` are any of its fields and win over it.
        callback: called as ``callback(step, result)`` after every optimiser step (e.g. to
            evaluate), on every process of a multi-process launch; it may switch the model to
            eval mode, training mode is restored after.
        check: token windows (as ``batches``) of text the healing does not train on, other
            domains than the healing text's (e.g. :func:`tensornet_llm.helpers.data.check_mix`):
            their perplexity is measured every ``check_every`` steps, and when it rises
            ``check_patience`` times in a row, ``on_rise`` stops training (restoring the best
            check's weights) or warns. The history is in ``result.checks``.

    Returns:
        A :class:`HealResult` with the loss history (including steps a resumed checkpoint had).
    """
    cfg = _settings(config, steps, lr, teacher is not None, options)
    if teacher is model:
        raise ArgumentError("teacher must be a separate (dense) model, not the model being healed")
    if cfg.checkpoint_dir is not None:  # a directory that is not a checkpoint: refused now
        check_output(Path(cfg.checkpoint_dir), known=(PROGRESS_FILE,))
    data = as_batches(batches, min_tokens=2, argument="batches")
    check_token_ids(model, data, "batches")
    check_data = None if check is None else as_batches(check, min_tokens=2, argument="check")
    if check_data is not None:
        check_token_ids(model, check_data, "check")
    train = cfg.trained(model)
    params = trainable_parameters(model, train)
    if cfg.quantize is not None:  # every layer must be one whose rounding training can take
        rounding_plan(model, cfg.quantize)

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    run = _Training(cfg, model, params, teacher, data, train)
    try:
        run.resume()
        watch = None if check_data is None else _Watch(cfg, run.result, model, check_data,
                                                       run.accelerator, run.rounded)
        if watch is not None and not run.result.checks:
            watch.check()  # the start: what healing must not make worse
        run.wrapped.train()
        while run.result.steps < cfg.steps:
            run.step()
            last = run.result.steps == cfg.steps or run.result.out_of_time
            if run.checkpoint is not None and (run.result.steps % cfg.checkpoint_every == 0
                                               or last):
                run.save_checkpoint()
            if callback is not None:
                callback(run.result.steps, run.result)
                run.wrapped.train()
            if watch is not None and (run.result.steps % cfg.check_every == 0 or last):
                if watch.check():
                    break
                run.wrapped.train()
            if run.result.out_of_time:
                break
    finally:
        run.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return run.result


def _settings(config: HealConfig | None, steps: int | None, lr: float | None,
              has_teacher: bool, options: dict[str, Any]) -> HealConfig:
    """``config`` (or the defaults) with ``steps``, ``lr`` and ``options`` over it, validated."""
    cfg = HealConfig(**{f.name: getattr(config, f.name) for f in fields(HealConfig)}) if config \
        else HealConfig()
    unknown = set(options) - {f.name for f in fields(HealConfig)}
    if unknown:
        raise ArgumentTypeError(f"heal() got unknown options {sorted(unknown)}; allowed: "
                                f"{[f.name for f in fields(HealConfig)]}")
    for key, value in {"steps": steps, "lr": lr, **options}.items():
        if value is not None or key in options:
            setattr(cfg, key, value)
    cfg.validate(has_teacher)
    return cfg


class _Training:
    """One healing run: the accelerator and what it prepared, the data order, the learning-rate
    schedule, the checkpoint, and the :class:`HealResult` it fills step by step."""

    def __init__(self, cfg: HealConfig, model: nn.Module, params: list[nn.Parameter],
                 teacher: nn.Module | None, data: list[dict], train: str) -> None:
        from accelerate import Accelerator, DistributedType

        self.cfg, self.model, self.params, self.data = cfg, model, params, data
        self.distill = (1.0 if teacher is not None else 0.0) if cfg.distill_weight is None \
            else cfg.distill_weight
        # Under torchrun / accelerate launch without a GPU, accelerate runs data-parallel on
        # the CPUs (gloo) only when told cpu=True; otherwise every rank would train alone.
        cpu = cfg.cpu or (launched() and not torch.cuda.is_available())
        precision = auto_precision(cpu) if cfg.mixed_precision == "auto" else cfg.mixed_precision
        _allow_new_precision(precision)
        # The schedule counts optimiser steps of the whole group of processes, so the
        # scheduler is stepped by hand after each real optimiser step. Left to accelerate (the
        # default step_scheduler_with_optimizer=True), it would step it once per process on
        # every step, running warm-up and decay N times too fast under N processes.
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision=precision, cpu=cpu, step_scheduler_with_optimizer=False)
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        if cfg.quantize is not None and fsdp:
            raise ArgumentError("quantize: quantization-aware healing needs whole parameters "
                                "on every process; it does not run under FSDP")
        # What the model computes with: its float weights, or their rounding by quantize().
        self.rounded = nullcontext if cfg.quantize is None else (
            lambda: rounded_weights(model, cfg.quantize))
        self.ranks, self.rank = accelerator.num_processes, accelerator.process_index
        if len(data) < self.ranks:
            raise ArgumentError(f"batches: {len(data)} batch(es) cannot be shared by "
                                f"{self.ranks} processes; give at least one per process")
        torch.manual_seed(cfg.seed)
        chosen = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        self.budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
        self.clock = 0.0  # training seconds so far, the same on every process
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer := _adamw(params, cfg),
                                                      self.learning_rate)
        self.wrapped, self.optimizer, self.scheduler = accelerator.prepare(
            model, optimizer, scheduler)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if fsdp:  # sharded like the student, for teachers that do not fit one device either
                self.teacher = accelerator.prepare_model(teacher)
            else:
                teacher.to(accelerator.device)
        self.result = HealResult(mixed_precision=precision, train=train, lr=cfg.lr)
        self.checkpoint = None if cfg.checkpoint_dir is None else Path(cfg.checkpoint_dir)
        self.groups = len(data) // self.ranks  # a remainder of fewer than `ranks` is left out
        self.bar = None
        self.start = _now()

    def learning_rate(self, step: int) -> float:
        """The schedule's factor of ``lr`` at optimiser step ``step``: linear warm-up, then a
        cosine to 10% over the steps (or the time budget, whichever runs out first)."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        done = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        if self.budget is not None:
            done = max(done, self.clock / self.budget)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    def resume(self) -> None:
        """Continue from the checkpoint, if there is one: weights, optimiser, schedule, RNG
        and the history so far; then show the progress bar from there."""
        from tqdm.auto import tqdm

        result = self.result
        if self.checkpoint is not None and (self.checkpoint / PROGRESS_FILE).is_file():
            self.accelerator.load_state(str(self.checkpoint))
            saved = json.loads((self.checkpoint / PROGRESS_FILE).read_text())
            for key in ("losses", "ce", "distill", "hidden", "tokens", "seconds"):
                setattr(result, key, saved[key])
            result.resumed_from = len(result.losses)
        self.clock = result.seconds  # a resumed run's budget counts the earlier time
        self.start = _now() - result.seconds
        self.bar = tqdm(total=self.cfg.steps, initial=result.steps, desc="healing", unit="step",
                        disable=not self.cfg.progress or not self.accelerator.is_main_process)

    def step(self) -> None:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches on every
        process; its loss terms (averaged over the processes), tokens and time recorded."""
        cfg, accelerator, result = self.cfg, self.accelerator, self.result
        accum = cfg.gradient_accumulation_steps
        step_terms = {"loss": 0.0, "ce": 0.0, "distill": 0.0, "hidden": 0.0}
        for micro in range(accum):
            group = _order(self.groups, result.steps * accum + micro, cfg.seed)
            batch = self.data[group * self.ranks + self.rank]
            values = self._micro_step({k: v.to(accelerator.device) if isinstance(v, Tensor)
                                       else v for k, v in batch.items()})
            if self.ranks > 1:  # every rank records the terms averaged over the ranks
                values = accelerator.reduce(values, reduction="sum")
                values[:4] /= self.ranks
            for k, v in zip(("loss", "ce", "distill", "hidden"), values[:4].tolist()):
                step_terms[k] += v / accum
            result.tokens += int(values[4])
        result.losses.append(step_terms["loss"])
        for k in ("ce", "distill", "hidden"):
            getattr(result, k).append(step_terms[k])
        result.seconds = _now() - self.start
        if self.budget is not None:  # every process must see one clock (same rate, same stop)
            elapsed = torch.tensor([result.seconds], dtype=torch.float64, device=accelerator.device)
            if self.ranks > 1:
                elapsed = accelerator.reduce(elapsed, reduction="sum") / self.ranks
            self.clock = float(elapsed)
            result.out_of_time = self.clock >= self.budget and result.steps < cfg.steps
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{step_terms['loss']:.4f}")

    def _micro_step(self, batch: dict[str, Tensor]) -> Tensor:
        """Forward, backward and (on the accumulation's last micro-batch) the optimiser and
        schedule step; ``[loss, ce, distill, hidden, tokens]`` of this process."""
        cfg, accelerator = self.cfg, self.accelerator
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want_hidden = self.teacher is not None and cfg.hidden_weight > 0
        with accelerator.accumulate(self.wrapped):
            teacher_out = None
            if self.teacher is not None:
                with torch.no_grad(), accelerator.autocast():
                    teacher_out = self.teacher(**inputs, output_hidden_states=want_hidden)
            with self.rounded():  # the gradients are taken at the weights it computes with
                out = self.wrapped(**inputs, output_hidden_states=want_hidden)
                targets = next_token_targets(batch)
                loss, terms = _loss_terms(out, teacher_out, targets, cfg, self.distill)
                accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
            # Zeroed in place: the next backward accumulates into the same buffers instead of
            # allocating every gradient afresh (a large cost where fresh pages are slow to
            # fault in, as in many virtual machines).
            self.optimizer.zero_grad(set_to_none=False)
        return torch.tensor([float(loss.detach()), terms["ce"], terms["distill"], terms["hidden"],
                             float((targets != -100).sum())], dtype=torch.float64,
                            device=accelerator.device)

    def save_checkpoint(self) -> None:
        """The whole training state into the checkpoint directory, all or nothing. The main
        process owns the directory; every process writes its RNG state into it."""
        accelerator = self.accelerator
        main = accelerator.is_main_process
        with atomic_directory(self.checkpoint, known=(PROGRESS_FILE,)) if main \
                else nullcontext() as tmp:
            path = _broadcast(str(tmp) if main else None, accelerator)
            accelerator.save_state(path, safe_serialization=False)
            accelerator.wait_for_everyone()
            if main:
                (tmp / PROGRESS_FILE).write_text(json.dumps(self.result.to_dict()))
        accelerator.wait_for_everyone()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.accelerator.unwrap_model(self.wrapped, keep_fp32_wrapper=False)
        self.accelerator.free_memory()


class _Watch:
    """The checks during healing: perplexity of the ``check`` windows, the best so far (and,
    for ``on_rise="stop"``, a copy of its weights), and how many checks in a row rose."""

    def __init__(self, cfg: HealConfig, result: HealResult, model: nn.Module, data: list[dict],
                 accelerator, rounded: Callable[[], Any]) -> None:
        self.cfg, self.result, self.model, self.data = cfg, result, model, data
        self.accelerator, self.rounded = accelerator, rounded
        self.best_state: dict[str, Tensor] | None = None
        self.rises = 0

    def perplexity(self) -> float:
        self.model.eval()
        with self.rounded():
            total, count = summed_nll(self.model, self.data, self.accelerator.device,
                                      self.accelerator.autocast)
        return math.exp(total / max(count, 1))

    def check(self) -> bool:
        """Measure now; True when training must stop (the best weights are then restored)."""
        value, step = self.perplexity(), self.result.steps
        self.result.checks.append((step, value))
        best = min(v for _, v in self.result.checks)
        if value <= best:
            self.result.best_step, self.rises = step, 0
            if self.cfg.on_rise == "stop":
                self.best_state = {k: v.detach().clone()
                                   for k, v in self.model.state_dict().items()}
            return False
        if value <= best * (1 + self.cfg.check_tolerance):
            return False
        self.rises += 1
        if self.rises < self.cfg.check_patience:
            return False
        first = self.result.checks[0][1]
        if self.cfg.on_rise == "warn":
            warnings.warn(f"check perplexity rose to {value:.2f} at step {step} (best {best:.2f} "
                          f"at step {self.result.best_step}, {first:.2f} before healing): the "
                          "healing text is costing general quality", HealingCheckWarning,
                          stacklevel=3)
            return False
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.result.stopped_early = True
        return True


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` or ``accelerate launch``
    (which set ``WORLD_SIZE``; MPI launchers set their own)."""
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return any(int(os.environ.get(k, "1") or 1) > 1 for k in sizes)


def _broadcast(value: str | None, accelerator) -> str:
    """The main process's ``value``, on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def auto_precision(cpu: bool = False) -> Literal["bf16", "no"]:
    """What ``mixed_precision="auto"`` picks: bf16 on a CUDA GPU that supports it and on a CPU
    with bf16 matrix units (Intel AMX), where bf16 matmuls run natively and much faster; full
    precision elsewhere, where bf16 is emulated and slower."""
    if torch.cuda.is_available() and not cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up with care
    return "bf16" if amx is not None and amx() else "no"


def _allow_new_precision(precision: str) -> None:
    """accelerate keeps one process-wide state and refuses an ``Accelerator`` whose mixed
    precision differs from the first one's. A second ``heal`` call with another precision is
    legitimate in one process (a notebook, the tests): drop accelerate's training state
    (precision, plugins) and keep its process and distributed set-up."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()
