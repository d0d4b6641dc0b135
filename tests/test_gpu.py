"""Every public entry point with the model on a CUDA GPU. Marked ``gpu``: skipped where no GPU
is present; run with ``pytest -m gpu`` on a machine that has one."""

import pytest
import torch

from models import build
from tensornet_llm import (
    compactify, compactify_pretrained, heal, load_compactified, profile_sensitivity, quantize,
    save_compactified,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
IDS = torch.randint(2, 90, (2, 16), generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.randint(2, 90, (1, 32), generator=torch.Generator().manual_seed(i))
               for i in range(4)]


def logits(model, device):
    with torch.no_grad():
        return model(IDS.to(device)).logits.float().cpu()


@pytest.mark.parametrize("options", [
    dict(chi=4), dict(chi=4, method="ttns"), dict(ratio=0.5),
    dict(chi=4, calibration=CALIBRATION, fit_steps=5),
    dict(ratio=0.5, calibration=CALIBRATION, fit_steps=5),
])
def test_compactify_on_the_gpu_matches_the_cpu(options):
    cpu, gpu = build("llama"), build("llama").cuda()
    compactify(cpu, progress=False, **options)
    compactify(gpu, progress=False, **options)
    assert all(p.is_cuda for p in gpu.parameters())
    torch.testing.assert_close(logits(gpu, "cuda"), logits(cpu, "cpu"), rtol=1e-3, atol=1e-3)


def test_heal_trains_on_the_gpu():
    model = build("llama").cuda()
    compactify(model, chi=4, progress=False)
    batches = [torch.randint(2, 90, (2, 24), generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    result = heal(model, batches, steps=20, lr=1e-2, progress=False, mixed_precision="bf16")
    assert result.losses[-1] < result.losses[0]
    assert all(p.is_cuda and p.dtype == torch.float32 for p in model.parameters())


def test_save_load_quantize_and_generate_on_the_gpu(tmp_path):
    pytest.importorskip("torchao")  # int8 goes through the torchao extra
    model = build("llama").cuda()
    compactify(model, chi=4, progress=False)
    save_compactified(model, tmp_path / "m")
    loaded = load_compactified(tmp_path / "m", device="cuda")
    torch.testing.assert_close(logits(loaded, "cuda"), logits(model, "cuda"))
    quantize(loaded, bits=8)
    out = loaded.generate(IDS[:1].cuda(), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20) and out.is_cuda


def test_sensitivity_profile_on_the_gpu():
    model = build("llama").cuda()
    profile = profile_sensitivity(model, CALIBRATION, keep=[0.5], cache_dir=False, progress=False)
    assert profile.rows and all(torch.isfinite(torch.tensor(r.delta_loss)) for r in profile.rows)


def test_streaming_compression_on_the_gpu(tmp_path):
    model = build("llama", layers=3)
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    compactify_pretrained(tmp_path / "src", tmp_path / "gpu", chi=4, calibration=CALIBRATION,
                          fit_steps=5, device="cuda", progress=False)
    compactify_pretrained(tmp_path / "src", tmp_path / "cpu", chi=4, calibration=CALIBRATION,
                          fit_steps=5, progress=False)
    torch.testing.assert_close(logits(load_compactified(tmp_path / "gpu"), "cpu"),
                               logits(load_compactified(tmp_path / "cpu"), "cpu"),
                               rtol=1e-3, atol=1e-3)
