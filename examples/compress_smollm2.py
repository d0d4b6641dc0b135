"""Compress the bundled SmolLM2-135M-Instruct and compare it with the dense model.

    python examples/compress_smollm2.py [--ratio 0.8 | --chi 64] [--calibration-tokens 4096]
                                        [--fit-steps 30] [--method mpo|ttns|low-rank]
                                        [--tokens 4096] [--out DIR]

Prints parameters, size in MB, compression time, decode speed (dense and compressed timed in
interleaved rounds; the ratio is the median over rounds, with its range) and held-out
perplexity on each bundled domain (fiction, encyclopedia, technical prose, code: text never used for calibration)
before and after. By default (``make demo``) it keeps 80% of the attention/MLP parameters,
choosing chi per layer and fitting every layer to 16,384 tokens of the bundled mixture of all
four domains (about 6 minutes on 2 CPU cores, plus the evaluations). ``--chi 64 --calibration-tokens 0`` shows the
crudest setting, a uniform cut of the weights alone (seconds, but perplexity in the millions).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from tensornet_llm import compactify, save_compactified
from tensornet_llm.helpers.data import calibration_mix
from tensornet_llm.helpers.evaluate import compare_to_dense, model_size_bytes, perplexity_table
from tensornet_llm.helpers.models import load_smollm2
from tensornet_llm.helpers.speed import ratios, time_generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=float, help="fraction of parameters to keep (default 0.8)")
    size.add_argument("--chi", type=int, help="one bond dimension for every layer instead")
    parser.add_argument("--calibration-tokens", type=int, default=16384,
                        help="tokens of the bundled mixture to fit the layers to (0: weights alone)")
    parser.add_argument("--fit-steps", type=int, default=30,
                        help="optimiser steps per layer when fitting (default 30)")
    parser.add_argument("--method", choices=["mpo", "ttns", "low-rank"], default="mpo")
    parser.add_argument("--n-sites", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096,
                        help="held-out tokens scored per domain (default 4096)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of the decode timing (default 5)")
    parser.add_argument("--out", help="save the compactified model here")
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s")
    prompt = calibration_mix(tokenizer, 64, seq_len=64, domains=["fiction"])[0]
    params0, size0 = sum(p.numel() for p in model.parameters()), model_size_bytes(model)
    ppl0 = perplexity_table(model, tokenizer, args.tokens, progress=True)
    dense = copy.deepcopy(model)  # timed beside the compressed model, round by round

    calibration = None
    if args.calibration_tokens:
        calibration = calibration_mix(tokenizer, args.calibration_tokens, seq_len=512)
    ratio = args.ratio if args.ratio is not None or args.chi is not None else 0.8
    report = compactify(model, chi=args.chi, ratio=ratio, method=args.method,
                        n_sites=args.n_sites, calibration=calibration,
                        fit_steps=args.fit_steps)
    params1, size1 = sum(p.numel() for p in model.parameters()), model_size_bytes(model)
    ppl1 = perplexity_table(model, tokenizer, args.tokens, progress=True)
    ppl_ratio = compare_to_dense(ppl1, ppl0)
    print(f"timing decode: {args.rounds} rounds, dense and compactified interleaved ...")
    times = time_generate({"dense": dense, "compactified": model}, prompt, rounds=args.rounds)
    decode = ratios(times["compactified"], times["dense"])["decode"]
    speed0, speed1 = (1 / min(times[name].decode) for name in ("dense", "compactified"))

    print(report.summary())
    print(f"\n{'':28}{'dense':>14}{'compactified':>16}")
    print(f"{'parameters':28}{params0:>14,}{params1:>16,}")
    print(f"{'size (MB, fp32)':28}{size0 / 1e6:>14.1f}{size1 / 1e6:>16.1f}")
    print(f"{'compactify time (s)':28}{'':>14}{report.seconds:>16.1f}")
    print(f"{'decode (tokens/s, batch 1)':28}{speed0:>14.1f}{speed1:>16.1f}"
          f"   ({decode}; tokens/s of the fastest rounds)")
    for name in ppl0:
        print(f"{'perplexity, ' + name:28}{ppl0[name]:>14.2f}{ppl1[name]:>16.2f}"
              f"   ({ppl_ratio[name]:.2f}x)")
    print(f"{'geometric mean of ratios':28}{'':>14}{ppl_ratio['geomean']:>15.2f}x"
          f"   (held-out text, {args.tokens} tokens per domain, 512-token windows)")
    if args.out:
        save_compactified(model, args.out, tokenizer=tokenizer)
        print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
