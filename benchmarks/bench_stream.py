"""Streaming compression: peak memory and time against the checkpoint's size.

    python benchmarks/bench_stream.py                  # SmolLM2-135M and a random 1.1B LLaMA
    python benchmarks/bench_stream.py --models smollm2 --work /tmp/stream

For each model a Hugging Face checkpoint directory is written first (sharded safetensors,
float32; the 1.2B model is a randomly initialised LLaMA of TinyLlama's shape with SmolLM2's vocabulary, since streaming
does not depend on the values of the weights). Then each setting runs
``compactify_pretrained(source, out, ...)`` in a fresh child process, and the child's peak
resident memory (``VmHWM``) is read back, beside the memory of a child that only imports
the library (the Python, torch and transformers baseline). For SmolLM2 the output's logits are
checked against in-memory ``compactify`` of the whole model with the same settings. Writes
``docs/results/bench_stream.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import RESULTS, machine, write_results

CHILD = r"""
import json, re, sys, time, torch
torch.set_num_threads({threads})

def peak_kb():  # VmHWM: this process's peak (ru_maxrss would count the parent, kept over exec)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))

from tensornet_llm.compress.stream import compactify_pretrained
from tensornet_llm.helpers.data import calibration_mix
base = peak_kb()
options = json.loads(sys.argv[1])
calibration = None
if options.pop("calibration_tokens", None):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(sys.argv[2])
    calibration = calibration_mix(tok, {tokens}, seq_len=512)
t0 = time.perf_counter()
report = compactify_pretrained(sys.argv[2], sys.argv[3], calibration=calibration,
                               overwrite=True, progress=False, **options)
print(json.dumps({{"seconds": time.perf_counter() - t0, "import_rss_kb": base,
                  "peak_rss_kb": peak_kb(),
                  "params_before": report.model_params_before,
                  "params_after": report.model_params_after}}))
"""


def make_source(name: str, work: Path) -> Path:
    """A float32 sharded safetensors checkpoint of ``name`` under ``work`` (made once)."""
    import torch

    source = work / name
    if (source / "config.json").is_file():
        return source
    if name == "smollm2":
        from tensornet_llm.helpers.models import load_smollm2

        model, tok = load_smollm2()
        tok.save_pretrained(source)
    else:
        import transformers as tf

        config = tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                num_attention_heads=32, num_key_value_heads=4, vocab_size=49152)
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = tf.LlamaForCausalLM(config)
        # A tokenizer is only needed to calibrate; SmolLM2's is saved beside the random model.
        from tensornet_llm.helpers.models import load_smollm2

        load_smollm2()[1].save_pretrained(source)
    model.to(torch.float32).save_pretrained(source, max_shard_size="1GB")
    return source


def child(source: Path, out: Path, options: dict, threads: int, tokens: int) -> dict:
    code = CHILD.format(threads=threads, tokens=tokens)
    done = subprocess.run([sys.executable, "-c", code, json.dumps(options), str(source), str(out)],
                          capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"the compressing process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkpoint_bytes(source: Path) -> int:
    return sum(p.stat().st_size for p in source.glob("*.safetensors"))


def check_logits(source: Path, out: Path, options: dict) -> float:
    """Largest |logit| difference between the streamed output and in-memory compactify."""
    import torch
    from transformers import AutoModelForCausalLM

    from tensornet_llm import compactify, load_compactified

    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    compactify(dense, progress=False, **options)
    streamed = load_compactified(out)
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((dense(ids).logits - streamed(ids).logits).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama-1b"])
    ap.add_argument("--work", default="/tmp/tensornet_stream")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens (default 2048)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    settings = {"chi 32 (3-site MPO)": {"chi": 32},
                "chi 32, calibrated": {"chi": 32, "calibration_tokens": args.tokens,
                                       "fit_steps": 0},
                "keep 50%, calibrated": {"ratio": 0.5, "calibration_tokens": args.tokens,
                                         "fit_steps": 0}}
    # The budget pass of a ratio takes long on the 1.1B model; its memory is the calibrated one's.
    skip = {("llama-1b", "keep 50%, calibrated")}
    done_file = work / "rows.jsonl"  # rows measured so far: a rerun skips them
    rows = [json.loads(line) for line in done_file.read_text().splitlines()] \
        if done_file.is_file() else []
    baseline = child_import_rss()
    for name in args.models:
        source = make_source(name, work)
        size = checkpoint_bytes(source)
        for label, options in settings.items():
            if (name, label) in skip or any(
                    (r["model"], r["setting"]) == (name, label) for r in rows):
                continue
            out = work / f"{name}-out"
            row = child(source, out, dict(options), args.threads, args.tokens)
            row.update(model=name, setting=label, checkpoint_bytes=size)
            if name == "smollm2" and "calibration_tokens" not in options:
                row["max_logit_diff_vs_in_memory"] = check_logits(source, out, options)
            rows.append(row)
            with done_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    write(rows, baseline, args.out, args)


def child_import_rss() -> int:
    code = ("import re, tensornet_llm.compress.stream, transformers, torch; print(re.search("
            "r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True)
    return int(done.stdout.strip())


def write(rows: list[dict], baseline_kb: int, out: Path, args) -> None:
    meta = machine(calibration_tokens=args.tokens, import_only_rss_kb=baseline_kb,
                   date=time.strftime("%Y-%m-%d"), child_threads=args.threads)
    lines = [
        "# Streaming compression: peak memory against checkpoint size",
        "",
        f"`python benchmarks/bench_stream.py` ({meta['date']}, {args.threads} threads). Peak "
        "RSS of a child process that runs `compactify_pretrained` on a float32 sharded "
        f"checkpoint; a child that only imports the library peaks at "
        f"{baseline_kb / 2**20:.2f} GiB.",
        "",
        "| model | setting | checkpoint (fp32) | peak RSS | peak / checkpoint | time | "
        "params after / before |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r["peak_rss_kb"] * 1024
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['checkpoint_bytes'] / 2**30:.2f} GiB | "
            f"{peak / 2**30:.2f} GiB | {peak / r['checkpoint_bytes']:.1%} | "
            f"{r['seconds']:.0f} s | {r['params_after'] / r['params_before']:.1%} |")
    diffs = [r for r in rows if "max_logit_diff_vs_in_memory" in r]
    if diffs:
        lines += ["", "Largest logit difference between the streamed output and in-memory "
                  "`compactify` with the same settings: " + ", ".join(
                      f"{r['model']} {r['setting']}: {r['max_logit_diff_vs_in_memory']:.2e}"
                      for r in diffs) + "."]
    write_results(out, "bench_stream", meta, rows, lines)


if __name__ == "__main__":
    main()
