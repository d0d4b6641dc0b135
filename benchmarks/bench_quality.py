"""Perplexity versus parameters kept on SmolLM2-135M, for six ways of compressing it.

    python benchmarks/bench_quality.py [--keep 0.9 0.8 0.7 0.6 0.5] [--methods ...]
                                       [--tokens 8192] [--calibration-tokens 4096]

At each keep fraction of the targeted (attention and MLP) parameters:

* ``svd``          truncated SVD of every weight, the same rank fraction everywhere;
* ``wsvd``         activation-whitened SVD (SVD-LLM: Cholesky factor ``L`` of the input
                   covariance, SVD of ``W L``), same ranks, covariances from the dense model;
* ``mpo``, ``ttns``  TT-SVD / hierarchical SVD of every weight, each layer's chi the largest
                   that keeps the fraction (no data);
* ``mpo+fit``, ``ttns+fit``  ``compactify(ratio=keep, calibration=..., low_rank=False)``: chi
                   per module under the budget from the Gauss-Newton loss estimate, then every
                   layer fitted to its activations block by block;
* ``mpo+lr+fit``   the same with ``compactify``'s default ``low_rank=True``: the budget also
                   offers every module the low-rank layout (a 2-site MPO that is the rank-chi
                   factorisation) and keeps, per module, the layout predicting less damage.

Calibration on Emma; perplexity on two held-out texts (512-token windows), 8192 tokens each by
default: Persuasion (a novel never calibrated on; the headline figure) and the second half of
the Wikipedia sample (another domain). The SVD baselines
are written back as dense matrices (only their perplexity and parameter count matter). Rows are
appended to ``docs/results/bench_quality.json`` as they finish and a rerun skips the rows it
has, so an interrupted run continues; ``--fresh`` starts over. Also writes ``bench_quality.md``
and ``bench_quality.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _plot import perplexity_panels

from tensornet_llm import (
    CompactifyConfig, MPOLinear, TTNSLinear, compactify, save_compactified,
)
from tensornet_llm.compress.budget import chi_for_params
from tensornet_llm.compress.calibrate import as_batches, collect_covariances
from tensornet_llm.compress.fit import whitened_svd
from tensornet_llm.compress.report import module_type
from tensornet_llm.compress.targets import find_targets
from tensornet_llm.helpers.data import HELD_OUT_TEXT, read_text, text_batches, tokenize_text
from tensornet_llm.helpers.evaluate import perplexity
from tensornet_llm.helpers.models import default_cache_dir, load_smollm2

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_TEXT = "austen_emma.txt"
WIKI_TEXT = "enwiki_gensim.txt"  # held out from its middle on: the second half
METHODS = ("svd", "wsvd", "mpo", "ttns", "mpo+fit", "ttns+fit", "mpo+lr+fit")
N_SITES = 3


def low_rank(model, keep: float, covs=None) -> int:
    """Replace each target by its rank-r (whitened) SVD approximation in place; returns the
    parameters the factors would hold."""
    kept = 0
    for name, linear in find_targets(model)[0]:
        out_f, in_f = linear.weight.shape
        rank = max(1, int(keep * in_f * out_f / (in_f + out_f)))
        kept += rank * (in_f + out_f)
        w = linear.weight.detach().double()
        if covs is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
        else:
            approx = whitened_svd(w, covs.covariance(name), rank)
        with torch.no_grad():
            linear.weight.copy_(approx.to(linear.weight.dtype))
    return kept


def uniform_chis(model, keep: float, cls) -> dict[str, int]:
    """Per target the largest chi keeping at most ``keep`` of its weight (exact-name patterns)."""
    return {f"re:{name.replace('.', '[.]')}": chi_for_params(
        cls, m.in_features, m.out_features, N_SITES, int(keep * m.in_features * m.out_features))
        for name, m in find_targets(model)[0]}


def held_out_perplexities(model, held_out: dict, tokenizer) -> dict[str, float]:
    """``{"perplexity": Persuasion, "perplexity_wiki": second half of Wikipedia}``."""
    return {"perplexity": perplexity(model, held_out["persuasion"], tokenizer=tokenizer),
            "perplexity_wiki": perplexity(model, held_out["wiki"], tokenizer=tokenizer)}


def run(method: str, keep: float, calib, covs, held_out: dict, fit_steps: int, tokenizer) -> dict:
    model, _ = load_smollm2()
    targets = sum(m.weight.numel() for _, m in find_targets(model)[0])
    t0 = time.perf_counter()
    if method in ("svd", "wsvd"):
        kept = low_rank(model, keep, covs if method == "wsvd" else None) / targets
        extra = {}
    else:
        cls_name = method.split("+")[0]
        if method.endswith("+fit"):
            config = CompactifyConfig(ratio=keep, method=cls_name, n_sites=N_SITES,
                                      fit_steps=fit_steps, low_rank="+lr" in method)
            report = compactify(model, config=config, calibration=calib, progress=False)
        else:
            cls = MPOLinear if cls_name == "mpo" else TTNSLinear
            report = compactify(model, chi=uniform_chis(model, keep, cls), method=cls_name,
                                n_sites=N_SITES, progress=False)
        kept = report.kept_fraction
        if method in ("mpo+fit", "mpo+lr+fit"):  # bench_quantize.py and bench_heal.py reuse them
            tag = "-lr" if "+lr" in method else ""
            save_compactified(model, default_cache_dir() / "bench" / f"smollm2-ratio{keep}{tag}-fitw")
        extra = {"left_dense": sum("left dense" in why for _, why in report.skipped),
                 "low_rank": sum(r.method == "low-rank" for r in report.layers),
                 "chi": {r.name: r.chi for r in report.layers},
                 "layout": {r.name: r.method for r in report.layers}}
    seconds = time.perf_counter() - t0
    return {"method": method, "keep": keep, "kept": kept, "seconds": seconds,
            **held_out_perplexities(model, held_out, tokenizer), **extra}


def choices_table(rows: list[dict], kinds: list[str]) -> list[str]:
    """What the budget chose per module type at each keep (the default method's rows): how many
    modules of the type got each layout, the rest of the blocks left dense."""
    if not rows:
        return []
    blocks = {name.split(".")[2] for r in rows for name in r["layout"]}
    kinds = sorted(set(kinds) | {module_type(n) for r in rows for n in r["layout"]})
    lines = ["", f"What the budget chose for the default (`mpo+lr+fit`), per module type: "
             f"compressed modules by layout, of {len(blocks)} blocks (the rest left dense). From "
             "the report's layouts (`CompactifyReport.choices()`):", "",
             "| module type | " + " | ".join(f"keep {r['keep']:.0%}" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for kind in kinds:
        cells = []
        for r in rows:
            counts: dict[str, int] = {}
            for name, method in r["layout"].items():
                if module_type(name) == kind:
                    counts[method] = counts.get(method, 0) + 1
            dense = len(blocks) - sum(counts.values())
            cells.append(", ".join(f"{n} {m}" for m, n in sorted(counts.items()))
                         + (", " if counts else "") + f"{dense} dense")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    (out / "bench_quality.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    dense = meta["dense_perplexity"]
    lines = ["# Quality at equal parameters (SmolLM2-135M, no fine-tuning)", "",
             f"Calibration: {meta['calibration']}; perplexity on {meta['held_out']} and on "
             f"{meta['held_out_wiki']} (512-token windows, neither calibrated on); dense "
             f"perplexity **{dense:.2f}** and **{meta['dense_perplexity_wiki']:.2f}**; "
             f"{meta['threads']} CPU threads. "
             "Written by `benchmarks/bench_quality.py`; plot `bench_quality.png`.", "",
             "Perplexity on Persuasion (time to compress in seconds; parameters kept, of the "
             "targeted attention/MLP weights):", ""]
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines += ["| method | " + " | ".join(f"keep {k:.0%}" for k in keeps) + " |",
              "|---|" + "---|" * len(keeps)]
    for m in methods:
        cells = []
        for k in keeps:
            r = next((r for r in rows if r["method"] == m and r["keep"] == k), None)
            cells.append("" if r is None else
                         f"{r['perplexity']:.4g} ({r['seconds']:.0f} s; {r['kept']:.1%})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for key, text, base in [("perplexity", "Persuasion", dense),
                            ("perplexity_wiki", "the Wikipedia half", meta["dense_perplexity_wiki"])]:
        lines += ["", f"Ratio to dense perplexity, {text}:", "",
                  "| method | " + " | ".join(f"keep {k:.0%}" for k in keeps) + " |",
                  "|---|" + "---|" * len(keeps)]
        for m in methods:
            cells = [next((f"{r[key] / base:.3g}x" for r in rows
                           if r["method"] == m and r["keep"] == k), "") for k in keeps]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    fits = [r for r in rows if "left_dense" in r and r["method"].endswith("+fit")]
    if fits:
        lines += ["", "Modules the budget left dense (of 210): " + ", ".join(
            f"{r['method']} keep {r['keep']:.0%}: {r['left_dense']}" for r in fits) + "."]
    earlier = sorted({f"{r['method']} keep {r['keep']:.0%}" for r in fits if "layout" not in r})
    if earlier:
        lines += ["", "Measured before the budget estimated damage from the fit's starting point "
                  "(it then cut the whitened weight `W L` itself, which favours many-site "
                  "networks): " + ", ".join(earlier) + "."]
    mixed = [r for r in fits if "low_rank" in r and r["method"] == "mpo+lr+fit"]
    if mixed:
        lines += ["", "Compressed modules given the low-rank layout (the rest are 3-site MPOs): "
                  + ", ".join(f"keep {r['keep']:.0%}: {r['low_rank']} of {len(r['chi'])}"
                              for r in mixed) + "."]
    lines += choices_table([r for r in fits if r["method"] == "mpo+lr+fit" and "layout" in r],
                           meta.get("module_types", []))
    (out / "bench_quality.md").write_text("\n".join(lines) + "\n")
    panels = {f"SmolLM2-135M, no fine-tuning: {text}": (
        {m: [(r["kept"], r[key]) for r in rows if r["method"] == m and key in r] for m in methods},
        meta[f"dense_{key}"]) for text, key in (("Persuasion", "perplexity"),
                                                ("Wikipedia half", "perplexity_wiki"))}
    perplexity_panels(out / "bench_quality.png", panels, "fraction of attention/MLP parameters kept",
                      invert_x=True, extra_ratios={"1.5 x dense": 1.5}, max_ratio=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--fit-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already measured")
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    wiki_half = len(read_text(WIKI_TEXT, start_char=0)) // 2
    held_out = {"persuasion": tokenize_text(tokenizer, HELD_OUT_TEXT, args.tokens),
                "wiki": tokenize_text(tokenizer, WIKI_TEXT, args.tokens, start_char=wiki_half)}
    calib = text_batches(tokenizer, CALIBRATION_TEXT, args.calibration_tokens, seq_len=512)
    meta = {"calibration": f"{CALIBRATION_TEXT}, {args.calibration_tokens} tokens",
            "held_out": f"{HELD_OUT_TEXT}, {held_out['persuasion'].numel()} tokens",
            "held_out_wiki": f"{WIKI_TEXT} from character {wiki_half:,} (its second half), "
                             f"{held_out['wiki'].numel()} tokens",
            "fit_steps": args.fit_steps, "threads": torch.get_num_threads(),
            "weigh_outputs": True,
            "module_types": sorted({module_type(n) for n, _ in find_targets(model)[0]})}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    previous = args.out / "bench_quality.json"
    if previous.is_file() and not args.fresh:
        saved = json.loads(previous.read_text())
        differ = {k: saved["meta"].get(k) for k, v in meta.items() if saved["meta"].get(k) != v}
        if differ:
            parser.error(f"{previous} was measured with {differ}: rerun with those settings, "
                         "or --fresh to start over")
        rows, meta = saved["rows"], saved["meta"]
    if "dense_perplexity" not in meta:
        meta.update({f"dense_{k}": v for k, v in held_out_perplexities(model, held_out, tokenizer).items()})
    print(f"dense perplexity {meta['dense_perplexity']:.2f}, Wikipedia half "
          f"{meta['dense_perplexity_wiki']:.2f}", flush=True)
    covs = None
    if "wsvd" in args.methods:
        covs = collect_covariances(model, as_batches(calib), dict(find_targets(model)[0]))
    del model
    for method in args.methods:  # cheap methods first: a partial run has complete baselines
        for keep in args.keep:
            if any(r["method"] == method and r["keep"] == keep for r in rows):
                continue
            rows.append(run(method, keep, calib, covs, held_out, args.fit_steps, tokenizer))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "chi"}), flush=True)
            write(args.out, meta, rows)
    write(args.out, meta, rows)


if __name__ == "__main__":
    main()
