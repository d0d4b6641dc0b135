"""peft LoRA adapters on tensor-network layers: targeted like any module, only the adapters train,
peft saves and loads them; merges are refused for whole-layer adapters and exact on nn.Linear factors."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from models import build, inputs  # noqa: E402
from tensornet_llm import (  # noqa: E402
    MPOLinear, TTNSLinear, compactify, load_compactified, load_lora_config, lora_config, quantize,
    save_compactified,
)
from tensornet_llm.layers.low_rank import FactoredLinear  # noqa: E402
from tensornet_llm.train.lora import MergeNotExactError, TensorNetworkLoraLinear  # noqa: E402


def compressed(kind: str):
    model = build("llama")
    compactify(model, chi=4, method=kind, n_sites=3 if kind == "mpo" else 4, progress=False)
    return model


def trained(model, steps: int = 3):
    """A few AdamW steps on the adapters; returns the loss before and after."""
    batch = inputs("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("kind", ["mpo", "ttns", "low-rank"])
def test_adapters_go_on_every_layer_kind_and_only_they_train(kind):
    model = compressed(kind)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = peft.get_peft_model(model, lora_config(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    wrapped = [m for m in peft_model.modules() if isinstance(m, TensorNetworkLoraLinear)]
    assert len(wrapped) == 4  # q and v of both blocks
    assert all(isinstance(m.get_base_layer(), (MPOLinear, TTNSLinear, FactoredLinear))
               for m in wrapped)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trained(peft_model)
    for name, p in peft_model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base[key]), name  # the compressed model is untouched


def test_adapters_save_and_load_with_peft(tmp_path):
    model = compressed("mpo")
    save_compactified(model, tmp_path / "model")
    peft_model = peft.get_peft_model(model, lora_config(r=4, target_modules=["q_proj", "o_proj"],
                                                        init_lora_weights=False))
    trained(peft_model, steps=2)
    batch = inputs("llama")
    expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapters")
    again = peft.PeftModel.from_pretrained(load_compactified(tmp_path / "model"),
                                           tmp_path / "adapters",
                                           config=load_lora_config(tmp_path / "adapters"))
    torch.testing.assert_close(again(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_adapters_on_the_factors_of_a_low_rank_model_merge_exactly():
    """A low-rank layer is two nn.Linear: peft's own adapters on them merge exactly, and a
    whole-layer adapter refuses to merge, naming that way."""
    model = compressed("low-rank")
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=3, target_modules=["q_proj.kept", "q_proj.others"], init_lora_weights=False))
    batch = inputs("llama")
    with torch.no_grad():
        expected = peft_model(**batch).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    whole = peft.get_peft_model(model, lora_config(r=2, target_modules=["q_proj"],
                                                   init_lora_weights=False))
    with pytest.raises(MergeNotExactError, match="all-linear"):
        whole.merge_and_unload()


@pytest.mark.parametrize("kind", ["mpo", "ttns", "quantized"])
def test_merging_that_cannot_be_exact_is_refused(kind):
    model = compressed("mpo" if kind == "quantized" else kind)
    if kind == "quantized":
        pytest.importorskip("torchao")  # int8 goes through the torchao extra
        quantize(model, bits=8)
    peft_model = peft.get_peft_model(model, lora_config(r=2, target_modules=["q_proj"],
                                                        init_lora_weights=False))
    batch = inputs("llama")
    with torch.no_grad():
        before = peft_model(**batch).logits
    with pytest.raises(MergeNotExactError, match="cannot be merged exactly"):
        peft_model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, before)  # nothing half-merged


def test_a_quantized_compressed_model_trains_adapters():
    pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model = compressed("mpo")
    quantize(model, bits=8)
    peft_model = peft.get_peft_model(model, lora_config(r=4, target_modules=["q_proj", "v_proj"]))
    losses = trained(peft_model, steps=4)
    assert losses[-1] < losses[0]


def _dense_twin(model):
    """A copy of ``model`` whose tensor-network layers are ``nn.Linear`` with the same weight."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, (MPOLinear, TTNSLinear, FactoredLinear)):
            linear = module.to_linear()
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


@pytest.mark.parametrize("kind", ["mpo", "ttns", "low-rank"])
def test_dora_on_a_tensor_network_is_dora_on_its_weight(kind, tmp_path):
    model = compressed(kind)
    save_compactified(model, tmp_path / "model")  # the base, as a user keeps it
    twin = _dense_twin(model)
    settings = dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True)
    ours = peft.get_peft_model(model, lora_config(**settings))
    theirs = peft.get_peft_model(twin, peft.LoraConfig(**settings))
    with torch.no_grad():  # the same adapters (B nonzero, so DoRA's rescaling matters)
        twins = {n: q for n, q in theirs.named_parameters() if "lora_" in n}
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
            if "lora_" in name:
                twins.pop(name).copy_(p)
        assert not twins  # every adapter tensor has its twin
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable)
    assert all("lora_" in n for n in trainable)
    batch = inputs("llama")
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4)
    ours_losses, theirs_losses = trained(ours), trained(theirs)
    assert ours_losses == pytest.approx(theirs_losses, rel=1e-4) and ours_losses[-1] < ours_losses[0]
    ours.eval()
    with torch.no_grad():
        expected = ours(**batch).logits
    ours.save_pretrained(tmp_path / "adapters")
    with pytest.raises(ValueError, match="model has peft adapters"):  # it would not load
        save_compactified(ours.get_base_model(), tmp_path / "with-adapters")
    assert not (tmp_path / "with-adapters").exists()
    again = peft.PeftModel.from_pretrained(load_compactified(tmp_path / "model"),
                                           tmp_path / "adapters",
                                           config=load_lora_config(tmp_path / "adapters"))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_merging_dora_where_it_cannot_be_exact_is_refused():
    peft_model = peft.get_peft_model(compressed("mpo"), lora_config(
        r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(MergeNotExactError, match="cannot be merged exactly"):
        peft_model.merge_and_unload()
