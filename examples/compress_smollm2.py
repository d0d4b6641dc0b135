"""Compress the bundled SmolLM2-135M-Instruct and compare it with the dense model.

    python examples/compress_smollm2.py [--chi 64] [--method mpo|ttns] [--tokens 8192] [--out DIR]

Prints parameters, size in MB, compression time and held-out perplexity (Persuasion, which is
never used for calibration) before and after. Without healing a large perplexity increase is
expected: tensorizing every attention and MLP layer uniformly from the weights alone is the
crudest setting; see the docs for budgeted chi, data-aware fitting and healing.
"""

from __future__ import annotations

import argparse
import time

import torch

from tensornet_llm import compactify, save_compactified
from tensornet_llm.data import HELD_OUT_TEXT, tokenize_text
from tensornet_llm.evaluate import model_size_bytes, perplexity
from tensornet_llm.models import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chi", type=int, default=64, help="bond dimension (default 64)")
    parser.add_argument("--method", choices=["mpo", "ttns"], default="mpo")
    parser.add_argument("--n-sites", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score")
    parser.add_argument("--text", default=HELD_OUT_TEXT, help="held-out text file")
    parser.add_argument("--out", help="save the compactified model here")
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s")
    ids = tokenize_text(tokenizer, args.text, args.tokens)
    params0, size0 = sum(p.numel() for p in model.parameters()), model_size_bytes(model)
    ppl0 = perplexity(model, ids, progress=True)

    report = compactify(model, chi=args.chi, method=args.method, n_sites=args.n_sites)
    params1, size1 = sum(p.numel() for p in model.parameters()), model_size_bytes(model)
    ppl1 = perplexity(model, ids, progress=True)

    print(report.summary())
    print(f"\n{'':24}{'dense':>14}{'compactified':>16}")
    print(f"{'parameters':24}{params0:>14,}{params1:>16,}")
    print(f"{'size (MB, fp32)':24}{size0 / 1e6:>14.1f}{size1 / 1e6:>16.1f}")
    print(f"{'compactify time (s)':24}{'':>14}{report.seconds:>16.1f}")
    print(f"{'perplexity':24}{ppl0:>14.2f}{ppl1:>16.2f}"
          f"   ({ids.numel()} tokens of {args.text}, 512-token windows)")
    if args.out:
        save_compactified(model, args.out)
        tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
