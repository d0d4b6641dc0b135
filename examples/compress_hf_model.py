"""Compress any Hugging Face causal LM directory and save it next to the original.

    python examples/compress_hf_model.py [MODEL_DIR] [--ratio 0.8 | --chi 48] [--calibration FILE]

MODEL_DIR is any directory ``AutoModelForCausalLM.from_pretrained`` reads (config.json plus
weights, and a tokenizer for calibration and generation). Without an argument the converted
SmolLM2 cache directory is used, so the script runs as written. The compactified model is saved
to ``MODEL_DIR-tn`` (or ``--out``), reloaded, and asked to continue a prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from tensornet_llm import compactify, load_compactified, save_compactified
from tensornet_llm.helpers.data import text_batches
from tensornet_llm.helpers.models import default_cache_dir, load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", type=Path)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, help="fraction of attention/MLP parameters to keep")
    size.add_argument("--chi", type=int, help="bond dimension of every layer")
    parser.add_argument("--calibration", help="text file to fit the layers to (optional)")
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--method", choices=["mpo", "ttns"], default="mpo")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    if args.model_dir is None:
        load_smollm2()  # makes sure the converted cache exists
        args.model_dir = next(default_cache_dir().glob("SmolLM2-135M-Instruct*"))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    calibration = None
    if args.calibration:
        calibration = text_batches(tokenizer, args.calibration, args.calibration_tokens,
                                   seq_len=512)
    chi = args.chi if args.chi is not None or args.ratio is not None else 48
    report = compactify(model, chi=chi, ratio=args.ratio, method=args.method,
                        calibration=calibration)
    print(report)
    out = args.out or args.model_dir.with_name(args.model_dir.name + "-tn")
    save_compactified(model, out, tokenizer=tokenizer)
    reloaded = load_compactified(out)
    prompt = tokenizer("The weather today is", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=10, do_sample=False)
    print(f"saved to {out}; sample: {tokenizer.decode(generated[0])!r}")


if __name__ == "__main__":
    main()
