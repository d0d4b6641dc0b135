"""lm-eval on a compressed folder: ``HFLM(pretrained=<folder>)`` (what ``lm_eval --model hf
--model_args pretrained=<folder>`` builds) loads it through ``from_pretrained`` after
``import tensornet_llm`` and scores requests exactly as the model loaded by
``load_compactified`` does; without the import it stops with an error."""

import pytest
import torch

from models import char_tokenizer
from test_from_pretrained import compressed, plain_transformers
from tensornet_llm import load_compactified, save_compactified

pytest.importorskip("lm_eval")

#: Loglikelihood requests (context, continuation) in the tiny vocabulary.
REQUESTS = [("the cat sat on", " the mat."), ("Numbers: 1, 2, 3,", " 4, 5"), ("(a", "b)")]


def loglikelihoods(lm) -> list[tuple[float, bool]]:
    from lm_eval.api.instance import Instance

    return lm.loglikelihood([Instance("loglikelihood", {}, pair, i)
                             for i, pair in enumerate(REQUESTS)], disable_tqdm=True)


@pytest.mark.parametrize("kind", ["kept rows", "mpo", "int8"])
def test_hflm_scores_a_compressed_folder_by_its_name(kind, tmp_path):
    from lm_eval.models.huggingface import HFLM

    folder = tmp_path / "m"
    save_compactified(compressed(kind), folder, tokenizer=char_tokenizer())
    by_name = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=1)
    assert type(by_name.model).__name__ == "LlamaForCausalLM"
    loaded = load_compactified(folder)
    by_object = HFLM(pretrained=loaded, tokenizer=char_tokenizer(), device="cpu", batch_size=1)
    scores = loglikelihoods(by_name)
    assert all(torch.isfinite(torch.tensor(s)) for s, _ in scores)
    assert scores == loglikelihoods(by_object)  # the same model, to the bit


def test_hflm_without_the_import_stops_with_an_error(tmp_path):
    save_compactified(compressed("kept rows"), tmp_path / "m", tokenizer=char_tokenizer())
    run = plain_transformers("import sys\nfrom lm_eval.models.huggingface import HFLM\n"
                             "HFLM(pretrained=sys.argv[1], device='cpu', dtype='float32')\n",
                             tmp_path / "m")
    assert run.returncode != 0  # lm-eval reads the config itself: an unknown method
    assert "Unknown quantization type, got tensornet" in run.stderr
