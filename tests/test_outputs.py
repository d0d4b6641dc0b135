"""Nothing is lost: outputs are written all or nothing, never over someone else's files, and the
library's own errors are one line while bugs keep their traceback."""

import json
import os
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from models import build, char_tokenizer, inputs
from tensornet_llm import compactify, load_compactified, save_compactified
from tensornet_llm.cli import main
from tensornet_llm.compress.calibrate import collect_output_gradients
from tensornet_llm.errors import (
    EstimateFallbackWarning, OutputExistsError, OutputNotWritableError, TensornetError,
)
from tensornet_llm.helpers.files import MARKER, atomic_directory


def tree(path):
    """Every file below ``path`` with its bytes (directories as themselves)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(path.rglob("*"))}


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture
def saved(tmp_path):
    model = build("llama")
    compactify(model, chi=3, progress=False)
    out = tmp_path / "saved"
    save_compactified(model, out)
    return model, out


def test_saving_onto_an_unrelated_directory_refuses_and_leaves_it_intact(tmp_path):
    model = build("llama")
    mine = tmp_path / "my-project"
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "notes.txt").write_text("years of work")
    before = tree(mine)
    with pytest.raises(OutputExistsError, match="my-project.*overwrite=True"):
        save_compactified(model, mine)
    assert tree(mine) == before and not leftovers(tmp_path)
    save_compactified(model, mine, overwrite=True)  # said explicitly: replaced
    assert not (mine / "src").exists() and (mine / "tensornet.json").is_file()


def test_saving_onto_a_file_or_under_a_file_is_refused_before_work(tmp_path):
    model = build("llama")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"123")
    with pytest.raises(OutputExistsError, match="not a directory"):
        save_compactified(model, a_file)
    with pytest.raises(OutputNotWritableError, match="weights.bin is not a directory"):
        save_compactified(model, a_file / "inside")
    assert a_file.read_bytes() == b"123"


def test_a_previous_output_and_an_empty_directory_are_replaced(saved, tmp_path):
    model, out = saved
    assert (out / MARKER).is_file()
    save_compactified(model, out, files={"note.txt": "second"})  # no overwrite=True needed
    assert (out / "note.txt").read_text() == "second"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_compactified(model, empty)
    assert (empty / "tensornet.json").is_file()


def test_outputs_of_versions_without_a_marker_are_recognised(saved):
    model, out = saved
    (out / MARKER).unlink()  # as written before the marker existed
    save_compactified(model, out)
    assert (out / MARKER).is_file()


@pytest.mark.parametrize("stage", ["weights", "structure", "swap"])
def test_an_interrupted_overwrite_leaves_the_old_output_whole(saved, monkeypatch, stage):
    model, out = saved
    before = tree(out)
    with torch.no_grad():  # the new save would differ from the old one
        next(model.parameters()).add_(1.0)
    if stage == "weights":
        import safetensors.torch

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    elif stage == "structure":
        from pathlib import Path

        real = Path.write_text

        def write_text(self, *args, **kwargs):
            if self.name == "tensornet.json":
                raise KeyboardInterrupt
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    else:  # the old output has been moved aside; moving the new one in fails
        from pathlib import Path

        real = Path.rename

        def rename(self, target):
            if ".tmp-" in self.name:
                raise KeyboardInterrupt
            return real(self, target)

        monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_compactified(model, out)
    monkeypatch.undo()
    assert tree(out) == before
    assert not leftovers(out.parent), "temporary or backup directories left behind"
    load_compactified(out)


def test_files_are_part_of_the_same_write_and_names_are_checked(saved):
    model, out = saved
    save_compactified(model, out, files={"report.json": "{}", "raw.bin": b"\x00\x01"})
    assert (out / "raw.bin").read_bytes() == b"\x00\x01"
    for bad in ("../escape.txt", "tensornet.json", "", "a/b"):
        with pytest.raises(ValueError, match="files"):
            save_compactified(model, out, files={bad: "x"})


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and not leftovers(tmp_path)


# ----- the command line -------------------------------------------------------------------------
@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    build("llama").save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_cli_output_holds_every_file_or_none(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    import tensornet_llm.compress.report as report_module

    def broken(self, **kwargs):
        raise RuntimeError("report failed")

    monkeypatch.setattr(report_module.CompactifyReport, "to_json", broken)
    with pytest.raises(RuntimeError, match="report failed"):  # a bug: traceback, not one line
        main(["compress", str(tiny_dir), "--chi", "3", "--out", str(out), "--quiet"])
    assert not out.exists() and not leftovers(tmp_path)
    monkeypatch.undo()
    assert main(["compress", str(tiny_dir), "--chi", "3", "--out", str(out), "--quiet"]) == 0
    assert {"report.json", "tensornet.json", "model.safetensors", MARKER} <= set(os.listdir(out))


def test_cli_refuses_existing_and_unwritable_out_before_loading(tiny_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    assert main(["compress", str(tiny_dir), "--chi", "3", "--out", str(mine)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compress", "no-such-model", "--chi", "3", "--out", str(blocker / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and err.count("\n") == 1  # checked before the model
    assert (mine / "keep.txt").read_text() == "x"


def test_library_errors_are_tensornet_errors_and_builtin_kinds():
    model = build("llama")
    with pytest.raises(TensornetError) as info:
        compactify(model, chi=0)
    assert isinstance(info.value, ValueError) and "chi" in str(info.value)


# ----- estimates that fall back are said and recorded --------------------------------------------
class _RejectsLabels(torch.nn.Module):
    """A causal LM whose forward raises when given labels (as a classification head does)."""

    def __init__(self):
        super().__init__()
        self.inner = build("llama")
        self.config = self.inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, labels=None, **kwargs):
        if labels is not None:
            raise ValueError("Expected input batch_size to match target batch_size")
        return self.inner(input_ids=input_ids, **kwargs)


def test_a_forward_that_raises_in_gradient_collection_warns_and_is_recorded():
    model = _RejectsLabels()
    batches = [inputs("llama", seed=s)["input_ids"] for s in range(2)]
    with pytest.warns(EstimateFallbackWarning, match="rejected labels.*batch_size"):
        assert collect_output_gradients(model, [{"input_ids": b} for b in batches],
                                        {"q": model.inner.model.layers[0].self_attn.q_proj}) is None
    with pytest.warns(EstimateFallbackWarning, match="output error, not the loss"):
        report = compactify(model, ratio=0.6, calibration=batches, fit_steps=1, progress=False)
    assert report.estimate == "output"
    assert any("rejected labels" in n for n in report.notes)
    assert report.to_dict()["notes"] == report.notes and "note: budget damage" in str(report)


def test_cross_layer_budget_without_a_loss_warns_and_is_recorded():
    """The cross-layer budget falls back like the per-layer one (it used to raise NameError)."""
    model = _RejectsLabels()
    batches = [inputs("llama", seed=s)["input_ids"] for s in range(2)]
    with pytest.warns(EstimateFallbackWarning, match="output error, not the loss"):
        report = compactify(model, ratio=0.6, calibration=batches, cross_layer=2, fit_steps=1,
                            progress=False)
    assert report.estimate == "output"
    assert any("rejected labels" in n for n in report.notes)


def test_other_errors_in_gradient_collection_propagate():
    model = _RejectsLabels()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    model.forward = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        collect_output_gradients(model, [inputs("llama")], {"q": model.inner.model.layers[0]})


def test_a_causal_lm_uses_the_loss_estimate_without_warning():
    model = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", EstimateFallbackWarning)
        report = compactify(model, ratio=0.6, calibration=[inputs("llama")["input_ids"]],
                            fit_steps=1, progress=False)
    assert report.estimate == "fisher"  # and the only note is the fit's weighting
    assert len(report.notes) == 1 and "Gauss-Newton loss estimate" in report.notes[0]
    assert sum(sum(c.values()) for c in report.choices().values()) == 14  # 7 per block, 2 blocks


# ----- what tol promises --------------------------------------------------------------------------
@given(tol=st.floats(0.02, 0.6), chi=st.sampled_from([2, 3, 5, 8, 1000]),
       n_sites=st.integers(2, 3), method=st.sampled_from(["mpo", "ttns"]))
@settings(max_examples=25, deadline=None)
def test_tol_bounds_the_weight_error_where_chi_does_not_bind(tol, chi, n_sites, method):
    """Without calibration: every bond discards at most its share of ``tol^2 ||W||^2`` unless it
    keeps all ``chi`` values, so a layer whose bonds all stay below ``chi`` is within ``tol``."""
    model, dense = build("llama"), dict(build("llama").named_modules())
    report = compactify(model, chi=chi, tol=tol, n_sites=n_sites, method=method, progress=False)
    unbound = [r for r in report.layers if all(b < chi for b in r.bond_dims)]
    assert all(r.rel_error <= tol * (1 + 1e-5) + 1e-6 for r in unbound)
    for row in report.layers:
        layer = model.get_submodule(row.name)
        discarded = sum(float(s.discarded.double().pow(2).sum()) for s in layer.spectra)
        norm_sq = float(dense[row.name].weight.detach().double().pow(2).sum())
        # the general bound (TT-SVD and HT-SVD): error^2 <= discarded weight, here relative
        assert row.rel_error**2 <= discarded / norm_sq * (1 + 1e-4) + 1e-10
    if chi == 1000:
        assert unbound, "with chi out of reach, tol alone sets every bond"


def test_with_calibration_tol_sets_the_bonds_and_the_fit_reports_the_weight_error():
    """What the README states: the bonds are those tol chooses on the weight; the fit then
    minimises the output error, and ``rel_error`` reports the weight error it ends at."""
    plain, fitted = build("llama"), build("llama")
    a = compactify(plain, chi=8, tol=0.3, progress=False)
    b = compactify(fitted, chi=8, tol=0.3, calibration=[inputs("llama")["input_ids"]],
                   fit_steps=5, progress=False)
    assert [r.bond_dims for r in a.layers] == [r.bond_dims for r in b.layers]
    for row, layer in zip(b.layers, [fitted.get_submodule(r.name) for r in b.layers]):
        weight = dict(build("llama").named_modules())[row.name].weight
        with torch.no_grad():
            err = float((layer.to_dense() - weight).norm() / weight.norm())
        assert abs(err - row.rel_error) < 1e-5


def test_float64_weights_are_whitened_and_fitted_in_float64():
    from tensornet_llm.compress.fit import kronecker_whitened, whitened_svd
    from tensornet_llm.layers import Layout

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 36, generator=g, dtype=torch.float64)
    x = torch.randn(200, 36, generator=g, dtype=torch.float64) @ torch.randn(
        36, 36, generator=g, dtype=torch.float64)
    cov = x.T @ x / 200
    layer = Layout.low_rank(36, 24).factor_form().decompose(weight, None, 5)
    start = kronecker_whitened(layer, weight, cov)
    assert start.cores[0].dtype == torch.float64
    best = whitened_svd(weight, cov, 5)
    assert torch.allclose(start.to_dense(), best, atol=1e-10, rtol=0)
    json.dumps(start.layout())  # still an ordinary layer


def test_shrinkage_is_validated_and_pulls_the_covariance_to_its_diagonal():
    from tensornet_llm import CompactifyConfig
    from tensornet_llm.compress.config import shrunk

    with pytest.raises(ValueError, match="shrinkage"):
        compactify(build("llama"), chi=2, config=CompactifyConfig(shrinkage=1.5))
    cov = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    assert torch.equal(shrunk(cov, 0.0), cov)
    assert torch.allclose(shrunk(cov, 0.25), torch.tensor([[2.0, 0.75], [0.75, 4.0]]))


def test_ridge_is_validated_and_bounds_what_whitening_amplifies():
    from tensornet_llm import CompactifyConfig
    from tensornet_llm.compress.config import shrunk
    from tensornet_llm.compress.fit import whitened_svd

    for bad in (-0.1, float("inf"), True):
        with pytest.raises(ValueError, match="ridge must be"):
            compactify(build("llama"), chi=2, config=CompactifyConfig(ridge=bad))
    cov = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    assert torch.equal(shrunk(cov, 0.0, 0.0), cov)
    assert torch.allclose(shrunk(cov, 0.25, 0.5), torch.tensor([[3.5, 0.75], [0.75, 5.5]]))
    # The ridge moves the fit from the data's whitened optimum toward the plain truncated SVD
    # (which treats every input direction alike), monotonically in the output error on the data.
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 12, generator=g, dtype=torch.float64)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 12,
                                                                                 dtype=torch.float64)
    cov = x.T @ x / 400
    u, s_, vh = torch.linalg.svd(weight)
    plain = (u[:, :4] * s_[:4]) @ vh[:4]
    assert torch.allclose(whitened_svd(weight, shrunk(cov, 0, 1e8), 4), plain, atol=1e-6)

    def data_error(approx):
        e = weight - approx
        return float(torch.trace(e @ cov @ e.T))

    errors = [data_error(whitened_svd(weight, shrunk(cov, 0, r), 4)) for r in (0, 1e-3, 1e-1, 10)]
    assert errors == sorted(errors) and errors[0] < errors[-1] / 2
