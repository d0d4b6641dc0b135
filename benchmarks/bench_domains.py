"""Held-out perplexity on every bundled domain after compression, by calibration text.

    python benchmarks/bench_domains.py [--keep 0.8] [--calibrations mixture emma]
                                       [--calibration-tokens 4096] [--shrinkage 0] [--ridge 0]
                                       [--match-dense] [--no-weigh-outputs]
                                       [--output-metric diagonal] [--tokens 8192]

For each keep fraction and calibration text, ``compactify(model, ratio=keep, calibration=...)``
(default layouts, ``--fit-steps`` per layer, ``--shrinkage`` of every input covariance toward
its diagonal, ``--ridge`` added to it times its mean diagonal, ``--match-dense``: each layer
fitted to the dense model's outputs, ``--no-weigh-outputs``: every output feature weighted
alike instead of by the loss gradient, ``--output-metric full``: weighted by the gradient's whole
second moment, K-FAC) on SmolLM2-135M, then perplexity on the held-out
part of each domain (fiction, encyclopedia, technical prose, code; ``--tokens`` each), its ratio
to dense, the geometric mean and the worst ratio. Calibrations:

* ``mixture``: ``calibration_mix``, an equal share of every domain's fit part (the default of
  the CLI and the examples);
* ``emma``: the single novel earlier versions calibrated on;
* ``generated``: ``generated_text``, windows sampled from the dense model itself (no data);
* ``mixture+generated``: half of the tokens from each of the two above.

``--heal-steps N`` heals every compressed model before it is scored: ``heal``'s default recipe
(next-token loss plus distillation from the dense model, batches of 4 x 256 tokens of
``healing_mix``, checked every 50 steps on ``check_mix``), for ``N`` steps (not minutes, so
that rows compare at equal training whatever else the machine runs; the checks may stop it
earlier, keeping the best weights: the row records the steps run).

Rows are appended to ``docs/results/bench_domains.json`` as they finish (a rerun skips rows it
has; ``--fresh`` starts over) and rendered to ``bench_domains.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tensornet_llm import CompactifyConfig, compactify, heal
from tensornet_llm.helpers.data import (DOMAINS, calibration_mix, check_mix, generated_text,
                                        healing_mix, text_batches)
from tensornet_llm.helpers.evaluate import perplexity_table
from tensornet_llm.helpers.models import load_smollm2

from harness import (RESULTS, domain_table, held_out_row, ratio_leaving_dense, resume,
                     write_results)
from modegpt import modegpt_mlps



def calibration(model, tokenizer, name: str, n_tokens: int) -> list:
    if name == "mixture":
        return calibration_mix(tokenizer, n_tokens, seq_len=512)
    if name == "emma":
        return text_batches(tokenizer, "austen_emma.txt", n_tokens, seq_len=512)
    if name == "generated":
        return generated_text(model, tokenizer, n_tokens, seq_len=512)
    if name == "mixture+generated":
        return (calibration_mix(tokenizer, n_tokens // 2, seq_len=512)
                + generated_text(model, tokenizer, n_tokens // 2, seq_len=512))
    raise SystemExit(f"unknown calibration {name!r}")


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    lines = ["# Held-out perplexity on every domain (SmolLM2-135M)", "",
             f"`compactify(model, ratio=keep, calibration=...)` with the default layouts, "
             f"{meta['fit_steps']} fit steps per layer; perplexity on {meta['tokens']} held-out "
             f"tokens of each domain (512-token "
             f"windows), text neither calibration nor healing draws from. A healed row was then "
             "healed that many steps by `heal`'s default recipe (distilled from the dense model "
             "on `healing_mix`, batches of 4 x 256 tokens; the compress time leaves healing out). "
             f"{meta['threads']} CPU threads. Written by `benchmarks/bench_domains.py`.", ""]
    columns = {
        "calibration": lambda r: r["calibration"],
        "tokens": lambda r: str(r["calibration_tokens"]),
        "shrinkage": lambda r: str(r["shrinkage"]), "ridge": lambda r: str(r.get("ridge", 0.0)),
        "match dense": lambda r: "yes" if r.get("match_dense") else "",
        # rows measured before the option existed were fitted unweighted
        "weighted outputs": lambda r: r.get("output_metric", "diagonal") if r.get(
            "weigh_outputs") else "",
        # rows measured before kept-rows storage existed stored two factors
        "low-rank storage": lambda r: "kept rows" if r.get("interpolative") else "factors",
        "min saving": lambda r: f"{r['min_saving']:.0%}" if r.get("min_saving") else "",
        "call cost": lambda r: f"{r['call_cost']:,.0f}" if r.get("call_cost") else "",
        # rows measured before the slim layout existed had none
        "slim MLP": lambda r: "offered" if r.get("slim_mlp") else "",
        "fewer heads": lambda r: "offered" if r.get("slim_attention") else "",
        "left dense": lambda r: " ".join(r.get("exclude", [])),
        "instead": lambda r: "MoDeGPT's MLP rule" if r.get("anchor") == "modegpt" else "",
        "healed": lambda r: f"{r['heal_steps']} steps" if r.get("heal_steps") else "",
        "keep": lambda r: f"{r['keep']:.0%}"}
    # an anchor row uses none of compactify's settings
    lines += domain_table(meta["dense"], rows, {
        name: cell if name in ("calibration", "tokens", "instead", "healed", "keep") else
        (lambda r, cell=cell: "" if r.get("anchor") else cell(r))
        for name, cell in columns.items()})
    write_results(out, "bench_domains", meta, rows, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.8])
    parser.add_argument("--calibrations", nargs="+", default=["mixture", "emma"],
                        choices=["mixture", "emma", "generated", "mixture+generated"])
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--shrinkage", type=float, default=0.0)
    parser.add_argument("--ridge", type=float, default=0.0)
    parser.add_argument("--match-dense", action="store_true",
                        help="fit each layer to the dense model's outputs (CompactifyConfig)")
    parser.add_argument("--no-weigh-outputs", action="store_true",
                        help="fit every output feature alike (CompactifyConfig.weigh_outputs)")
    parser.add_argument("--output-metric", choices=["diagonal", "full"], default="diagonal",
                        help="how outputs are weighted (CompactifyConfig.output_metric)")
    parser.add_argument("--low-rank-factors", action="store_true",
                        help="store low-rank layers as two factors, not kept rows "
                        "(CompactifyConfig.interpolative=False)")
    parser.add_argument("--min-saving", type=float, default=0.0,
                        help="every compressed module saves at least this fraction "
                        "(CompactifyConfig.min_saving)")
    parser.add_argument("--call-cost", type=float, default=0.0, metavar="PARAMS",
                        help="price each layout's calls too (CompactifyConfig.call_cost)")
    parser.add_argument("--no-slim-mlp", action="store_true",
                        help="offer gated MLPs no slim layout (CompactifyConfig.slim_mlp=False)")
    parser.add_argument("--no-slim-attention", action="store_true",
                        help="offer attention no fewer query heads "
                        "(CompactifyConfig.slim_attention=False)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN",
                        help="leave these modules dense and compress the rest further, to the "
                        "same parameters in all (CompactifyConfig.exclude)")
    parser.add_argument("--modegpt", action="store_true",
                        help="instead of compactify, MoDeGPT's rule for MLPs at the same "
                        "parameters (benchmarks/modegpt.py: every gated MLP at one width, "
                        "attention dense)")
    parser.add_argument("--heal-steps", type=int, default=0,
                        help="heal every compressed model this many steps before scoring it "
                        "(heal's default recipe, distilled from the dense model)")
    parser.add_argument("--fit-steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    meta = {"tokens": args.tokens, "fit_steps": args.fit_steps, "threads": torch.get_num_threads(),
            "domains": {n: d.description for n, d in DOMAINS.items()}}
    meta, rows = resume(args.out / "bench_domains.json", meta, args.fresh, parser)
    if "dense" not in meta:
        meta["dense"] = perplexity_table(model, tokenizer, args.tokens)
        print("dense", json.dumps(meta["dense"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for keep in args.keep:
        for name in args.calibrations:
            weigh = not args.no_weigh_outputs
            metric = args.output_metric if weigh else None
            rows_kept = not args.low_rank_factors
            slim = not args.no_slim_mlp
            heads = not args.no_slim_attention
            anchor = "modegpt" if args.modegpt else None
            key = (name, keep, args.calibration_tokens, args.shrinkage, args.ridge,
                   args.match_dense, weigh, metric, rows_kept, args.min_saving, args.exclude, slim,
                   heads, anchor, args.call_cost, args.heal_steps)
            if any((r["calibration"], r["keep"], r["calibration_tokens"], r["shrinkage"],
                    r.get("ridge", 0.0), r.get("match_dense", False),
                    r.get("weigh_outputs", False),
                    r.get("output_metric", "diagonal" if r.get("weigh_outputs") else None),
                    r.get("interpolative", False), r.get("min_saving", 0.0),
                    r.get("exclude", []), r.get("slim_mlp", False),
                    r.get("slim_attention", False), r.get("anchor"), r.get("call_cost", 0.0),
                    r.get("heal_steps", 0)) == key
                   for r in rows):
                continue
            data = calibration(model, tokenizer, name, args.calibration_tokens)  # not timed
            config = CompactifyConfig(shrinkage=args.shrinkage, ridge=args.ridge,
                                      match_dense=args.match_dense, weigh_outputs=weigh,
                                      output_metric=args.output_metric,
                                      interpolative=rows_kept, min_saving=args.min_saving,
                                      exclude=list(args.exclude), slim_mlp=slim,
                                      slim_attention=heads, call_cost=args.call_cost)
            ratio = ratio_leaving_dense(model, keep, args.exclude) if args.exclude else keep
            healed = {}

            def compress(student):
                if anchor:
                    report = modegpt_mlps(student, data, keep)
                else:
                    report = compactify(student, ratio=ratio, calibration=data,
                                        fit_steps=args.fit_steps, progress=False, config=config)
                if args.heal_steps:
                    result = heal(student, healing_mix(tokenizer, args.heal_steps * 4 * 256),
                                  steps=args.heal_steps, teacher=model,
                                  check=check_mix(tokenizer), progress=False)
                    healed.update(heal_steps_run=result.steps, heal_seconds=result.seconds)
                    student.eval()
                return report
            row = held_out_row(compress, tokenizer, args.tokens, meta["dense"])
            row["seconds"] -= healed.get("heal_seconds", 0.0)  # compression alone
            rows.append({"calibration": name, "keep": keep,
                         "calibration_tokens": args.calibration_tokens,
                         "shrinkage": args.shrinkage, "ridge": args.ridge,
                         "match_dense": args.match_dense, "weigh_outputs": weigh,
                         "output_metric": metric, "interpolative": rows_kept,
                         "min_saving": args.min_saving, "slim_mlp": slim,
                         "slim_attention": heads,
                         **({"call_cost": args.call_cost} if args.call_cost else {}),
                         **({"heal_steps": args.heal_steps, **healed} if args.heal_steps else {}),
                         **({"exclude": args.exclude} if args.exclude else {}),
                         **({"anchor": anchor} if anchor else {}), **row})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "choices"}), flush=True)
            write(args.out, meta, rows)
    write(args.out, meta, rows)


if __name__ == "__main__":
    main()
