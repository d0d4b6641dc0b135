"""Check the perplexity protocol against the reference figure in ``tensornet_llm/helpers/texts/README.md``.

    python benchmarks/check_reference_perplexity.py

Dense SmolLM2-135M-Instruct, 20,480 tokens of Pride and Prejudice from character 20,000,
non-overlapping 512-token windows with token 0 prepended: the reference is 30.70.
"""

import argparse

from tensornet_llm.helpers.data import tokenize_text
from tensornet_llm.helpers.evaluate import perplexity
from tensornet_llm.helpers.models import load_smollm2

REFERENCE = 30.70


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    model, tokenizer = load_smollm2()
    ids = tokenize_text(tokenizer, "austen_prideprejudice.txt", 20_480)
    ppl = perplexity(model, ids, tokenizer=tokenizer)
    print(f"perplexity {ppl:.3f} on {ids.numel()} tokens of Pride and Prejudice; "
          f"reference {REFERENCE}; {'match' if round(ppl, 2) == REFERENCE else 'MISMATCH'}")


if __name__ == "__main__":
    main()
