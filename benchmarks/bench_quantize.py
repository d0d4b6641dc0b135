"""Size and perplexity of SmolLM2-135M: dense, compactified, and each quantized (the size table
of CompactifAI, measured).

    python benchmarks/bench_quantize.py [--compressed DIR] [--ratio 0.8] [--tokens 8192]

Rows: dense fp32, dense fp16, dense int8 / int4 (every linear and the embedding table),
compactified fp32 (``compactify(ratio=..., calibration=Emma)``, the default method, which
``bench_quality.py`` caches as ``smollm2-ratio{ratio}-lr-fitw``; or the model in ``--compressed``,
e.g. a healed one), compactified + int8, compactified + int4. Bytes in memory count parameters
and buffers once (tied tables once); bytes on disk are the saved ``model.safetensors``.
Perplexity on held-out Persuasion. Writes ``docs/results/bench_quantize.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from tensornet_llm import compactify, load_compactified, quantize, save_compactified
from tensornet_llm.helpers.data import HELD_OUT_TEXT, text_batches, tokenize_text
from tensornet_llm.helpers.evaluate import model_size_bytes, perplexity
from tensornet_llm.helpers.models import default_cache_dir, load_smollm2
from tensornet_llm.saving.serialization import WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[1]


def disk_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        save_compactified(model, Path(tmp) / "m")
        return (Path(tmp) / "m" / WEIGHTS_FILE).stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compressed", type=Path, help="a compactified model directory")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    dense, tokenizer = load_smollm2()
    held_out = tokenize_text(tokenizer, HELD_OUT_TEXT, args.tokens)
    source = args.compressed
    if source is None:
        source = default_cache_dir() / "bench" / f"smollm2-ratio{args.ratio}-lr-fitw"
        if not (source / "tensornet.json").is_file():
            model = copy.deepcopy(dense)
            calib = text_batches(tokenizer, "austen_emma.txt", 4096, seq_len=512)
            compactify(model, ratio=args.ratio, calibration=calib, fit_steps=30, progress=False)
            save_compactified(model, source)
    compressed = load_compactified(source)

    variants = {
        "dense fp32": lambda: dense,
        "dense fp16": lambda: copy.deepcopy(dense).half(),
        "dense int8": lambda: _quantized(dense, 8),
        "dense int4": lambda: _quantized(dense, 4),
        "compactified fp32": lambda: compressed,
        "compactified + int8": lambda: _quantized(compressed, 8),
        "compactified + int4": lambda: _quantized(compressed, 4),
    }
    rows = []
    for name, make in variants.items():
        model = make()
        # fp16 matmuls on CPU are slow and imprecise: score the fp16 weights in fp32.
        scored = copy.deepcopy(model).float() if name.endswith("fp16") else model
        rows.append({"model": name, "memory_bytes": model_size_bytes(model),
                     "disk_bytes": disk_bytes(model), "perplexity": perplexity(scored, held_out, tokenizer=tokenizer)})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"compressed": str(source), "held_out": f"{HELD_OUT_TEXT}, {held_out.numel()} tokens",
            "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_quantize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    base = rows[0]
    lines = ["# Size and perplexity: compactify and quantization (SmolLM2-135M)", "",
             f"Compactified model: `{source.name}`; perplexity on {meta['held_out']}. Quantized "
             "weights: int8 one scale per channel, int4 groups of 64 (fp16 scales). Written by "
             "`benchmarks/bench_quantize.py`.", "",
             "| model | memory (MB) | disk (MB) | of dense fp32 | perplexity |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['memory_bytes'] / 1e6:.1f} | {r['disk_bytes'] / 1e6:.1f} | "
              f"{r['disk_bytes'] / base['disk_bytes']:.1%} | {r['perplexity']:.4g} |" for r in rows]
    (args.out / "bench_quantize.md").write_text("\n".join(lines) + "\n")


def _quantized(model, bits: int):
    twin = copy.deepcopy(model)
    quantize(twin, bits)
    return twin


if __name__ == "__main__":
    main()
