"""Block by block healing: does training each compressed block alone recover more per minute?

``heal`` trains the whole compressed model end to end: every step runs the dense teacher and
the student through all blocks and back. Here each decoder block of the compressed model is
trained alone instead, in order, to map its input to the dense model's output of that block:

* the input is the compressed model's own hidden state there (blocks already trained feed the
  next, so errors that earlier blocks left are corrected, not compounded);
* the target is the dense block's output for the dense model's input (the teacher's residual
  stream, recorded once by hooks);
* the loss is the squared error relative to what the dense block adds to its input
  (``|f(h) - t|^2 / |t - h_dense|^2``), so that every block weighs the same.

One step of one block costs about a thirtieth of a model step, so in the same minutes every
block gets many more updates, at the price of a local objective. Windows of ``healing_mix``
(never the held-out text), perplexity on the held-out part of every domain against dense,
before and after; the compressed model is the one ``bench_pareto.py`` caches (built and cached
here if missing). A diagnostic: no recipe of the library changes with it.

    python benchmarks/diag_block_heal.py --keep 0.5 --minutes 15
    python benchmarks/diag_block_heal.py --keep 0.5 --minutes 8 --then-heal-minutes 20
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from bench_pareto import cached, compress, compressed_path
from tensornet_llm import heal
from tensornet_llm.helpers.data import calibration_mix, check_mix, healing_mix
from tensornet_llm.helpers.evaluate import compare_to_dense, perplexity_table
from tensornet_llm.helpers.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]
PROBE_BATCHES = 8  # batches on which each block's relative error is reported


def compressed_model(dense: nn.Module, tokenizer, keep: float, calibration_tokens: int
                     ) -> nn.Module:
    """``bench_pareto.py``'s cached ``compactify(ratio=keep)`` on the calibration mixture (the
    same cache entry, built as there first if missing)."""
    return cached(compressed_path(keep, calibration_tokens), lambda: compress(
        dense, keep, calibration_mix(tokenizer, calibration_tokens)))[0]


@torch.no_grad()
def teacher_stream(dense: nn.Module, batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``stream[i][b]``: the dense model's hidden state entering block ``i`` for batch ``b``
    (``i = len(blocks)``: leaving the last block), in bfloat16 to halve the memory."""
    blocks = dense.model.layers
    stream: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    hooks = [block.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: stream[i].append(
            (args[0] if args else kwargs["hidden_states"]).to(torch.bfloat16)), with_kwargs=True)
        for i, block in enumerate(blocks)]
    hooks.append(blocks[-1].register_forward_hook(
        lambda m, args, out: stream[-1].append((out[0] if isinstance(out, tuple) else out)
                                               .to(torch.bfloat16))))
    try:
        for ids in batches:
            dense(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return stream


def train_blocks(student: nn.Module, stream, batches, seconds_per_block: float, lr: float,
                 ) -> list[dict]:
    """Train every block of ``student`` alone, in order (module docs); returns per block the
    steps and the relative error before and after, averaged over the first
    :data:`PROBE_BATCHES` batches."""
    inner = student.model
    hidden = [inner.embed_tokens(ids).detach() for ids in batches]  # the student's own stream
    length = batches[0].shape[1]
    cos_sin = inner.rotary_emb(hidden[0], torch.arange(length)[None])
    # causal, as an additive mask: every attention implementation takes it as it is
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    rows = []
    for i, block in enumerate(inner.layers):
        params = [p for p in block.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

        def error(b: int, grad: bool) -> torch.Tensor:
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
                out = block(hidden[b], attention_mask=mask, position_embeddings=cos_sin)
                out = out[0] if isinstance(out, tuple) else out
            target = stream[i + 1][b].float()
            update = target - stream[i][b].float()
            return (out.float() - target).square().mean() / update.square().mean()

        probe = range(min(len(batches), PROBE_BATCHES))
        with torch.no_grad():
            before = sum(float(error(b, False)) for b in probe) / len(probe)
        block.train()
        start, steps = time.perf_counter(), 0
        while time.perf_counter() - start < seconds_per_block:
            b = steps % len(batches)
            loss = error(b, True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            steps += 1
        block.eval()
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            after = sum(float(error(b, False)) for b in probe) / len(probe)
            for b in range(len(batches)):  # the next block's input: this block's output
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = block(hidden[b], attention_mask=mask, position_embeddings=cos_sin)
                hidden[b] = (out[0] if isinstance(out, tuple) else out).float()
        rows.append({"block": i, "steps": steps, "error_before": before, "error_after": after})
        print(f"block {i}: {steps} steps, relative error {before:.4f} -> {after:.4f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=32768,
                        help="healing_mix tokens the blocks train on (default 32768)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    parser.add_argument("--minutes", type=float, default=15.0,
                        help="training time for all blocks together (default 15)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--then-heal-minutes", type=float, default=0.0,
                        help="then heal end to end by the default recipe (distilled from dense, "
                             "healing_mix, checked on check_mix) for this long (default 0: not)")
    parser.add_argument("--heal-tokens", type=int, default=1048576,
                        help="healing_mix tokens of that end-to-end healing (default 1048576)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "diag_block_heal")
    args = parser.parse_args()
    if not (0 < args.keep < 1) or args.minutes <= 0 or args.lr <= 0 or args.tokens < args.seq:
        parser.error("--keep must lie in (0, 1); --minutes and --lr must be positive; "
                     "--tokens at least --seq")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tokenizer = load_smollm2()
    dense.eval()
    student = compressed_model(dense, tokenizer, args.keep, args.calibration_tokens).eval()
    for p in student.parameters():
        p.requires_grad_(False)
    batches = [b[:, :-1] for b in healing_mix(tokenizer, args.tokens, seq_len=args.seq,
                                               batch_size=args.batch)]
    dense_ppl = perplexity_table(dense, tokenizer, args.eval_tokens)
    before = compare_to_dense(perplexity_table(student, tokenizer, args.eval_tokens), dense_ppl)
    print("before:", {k: round(v, 3) for k, v in before.items()}, flush=True)
    start = time.perf_counter()
    stream = teacher_stream(dense, batches)
    blocks = train_blocks(student, stream, batches, args.minutes * 60 / len(dense.model.layers),
                          args.lr)
    block_seconds = time.perf_counter() - start
    del stream
    after = compare_to_dense(perplexity_table(student, tokenizer, args.eval_tokens), dense_ppl)
    print("after:", {k: round(v, 3) for k, v in after.items()}, flush=True)
    healed, heal_info = None, {}
    if args.then_heal_minutes > 0:
        result = heal(student.train(), healing_mix(tokenizer, args.heal_tokens), steps=100_000,
                      teacher=dense, check=check_mix(tokenizer, 2048), check_every=50,
                      max_minutes=args.then_heal_minutes, progress=False)
        student.eval()
        heal_info = {"heal_seconds": result.seconds, "heal_steps": result.steps,
                     "check_perplexity": [round(v, 2) for _, v in result.checks],
                     "stopped_early": result.stopped_early}
        healed = compare_to_dense(perplexity_table(student, tokenizer, args.eval_tokens), dense_ppl)
        print("then healed:", {k: round(v, 3) for k, v in healed.items()}, heal_info, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "diag_block_heal.json").write_text(json.dumps(
        {"meta": meta, "block_seconds": block_seconds, "dense": dense_ppl, "before": before,
         "after": after, "healed": healed, **heal_info, "blocks": blocks}, indent=1) + "\n")
    domains = [k for k in before if k not in ("geomean", "worst")]
    lines = [
        f"# Block by block healing at keep {args.keep:.0%} (SmolLM2-135M)", "",
        f"Each block trained alone for {args.minutes * 60 / len(blocks):.0f} s on "
        f"{args.tokens} tokens of `healing_mix` ({args.batch} x {args.seq} per step, AdamW lr "
        f"{args.lr:g}, bfloat16 autocast, {args.threads} CPU threads), {block_seconds:.0f} s in "
        "all with the teacher's pass"
        + (f"; then healed end to end by the default recipe for {heal_info['heal_seconds']:.0f} s "
           f"({heal_info['heal_steps']} steps, check perplexity {heal_info['check_perplexity']})"
           if heal_info else "")
        + f"; perplexity on {args.eval_tokens} held-out tokens of each domain, ratio to dense. "
        "Written by `benchmarks/diag_block_heal.py`.", "",
        "| model | " + " | ".join(domains) + " | geomean | worst |",
        "|---|" + "---|" * (len(domains) + 2),
    ]
    results = [("compressed", before), ("block by block healed", after)]
    results += [("block by block, then healed end to end", healed)] if healed else []
    for name, row in results:
        lines.append(f"| {name} | " + " | ".join(f"{row[d]:.2f}x" for d in domains)
                     + f" | {row['geomean']:.2f}x | {row['worst']:.2f}x |")
    lines += ["", "| block | steps | relative error before | after |", "|---|---|---|---|"]
    lines += [f"| {r['block']} | {r['steps']} | {r['error_before']:.4f} | {r['error_after']:.4f} |"
              for r in blocks]
    (args.out / "diag_block_heal.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'diag_block_heal.md'}")
    if not math.isfinite((healed or after)["geomean"]):
        raise SystemExit("perplexity after healing is not finite")


if __name__ == "__main__":
    main()
