"""Loading checkpoints and building task vectors; bad input gives errors that name the problem."""

import pytest
import torch
from torch import nn

from adamerge.io.checkpoints import CheckpointError, load_state_dict, save_state_dict
from adamerge.models.pool import CheckpointPool
from adamerge.suites.synthetic import TinyViT
from adamerge.engine.task_vectors import TaskVectors, fingerprint_difference, select_names
from conftest import perturbed


def tiny():
    torch.manual_seed(0)
    return TinyViT(image_size=8, patch=4, dim=16, depth=1, heads=2, out_dim=16)


def write_pool(tmp_path, tasks=("a", "b"), classes=4):
    enc = tiny()
    save_state_dict(enc.state_dict(), tmp_path / "base.safetensors")
    experts = {}
    for i, t in enumerate(tasks):
        path = tmp_path / f"{t}.pt"
        torch.save(perturbed(enc, 0.1, i), path)
        experts[t] = str(path)
    save_state_dict({f"{t}.weight": torch.randn(classes, 16) for t in tasks}, tmp_path / "heads.safetensors")
    return experts


def test_task_vectors_are_differences_stacked_per_parameter():
    enc = tiny()
    base = enc.state_dict()
    experts = {"a": perturbed(enc, 0.1, 1), "b": perturbed(enc, 0.1, 2)}
    tv = TaskVectors.from_state_dicts(base, experts)
    assert tv.task_names == ["a", "b"]
    for name, t in zip(tv.names, tv.tensors):
        assert t.shape == (2, *base[name].shape)
        torch.testing.assert_close(t[1], experts["b"][name] - base[name])
    assert tv.to(dtype=torch.bfloat16).nbytes() * 2 == tv.nbytes()


def test_selection_globs():
    names = ["blocks.0.qkv.weight", "blocks.0.qkv.bias", "proj.weight", "pos"]
    assert select_names(names, include=["blocks.*"]) == names[:2]
    assert select_names(names, exclude=["*.bias", "pos"]) == ["blocks.0.qkv.weight", "proj.weight"]


def test_checkpoint_pool_loads_files(tmp_path):
    experts = write_pool(tmp_path)
    pool = CheckpointPool(tiny(), str(tmp_path / "base.safetensors"), experts,
                          str(tmp_path / "heads.safetensors"), exclude=["*.bias"])
    loaded = pool.load()
    assert loaded.task_vectors.task_names == ["a", "b"]
    assert not any(n.endswith(".bias") for n in loaded.task_vectors.names)
    assert list(loaded.heads) == ["a", "b"] and loaded.heads["a"].out_features == 4


def test_shape_mismatch_is_named(tmp_path):
    enc = tiny()
    base = enc.state_dict()
    bad = perturbed(enc, 0.1, 1)
    bad["proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"proj\.weight: shape \(3, 3\), expected \(16, 16\)"):
        TaskVectors.from_state_dicts(base, {"a": bad})


def test_missing_and_extra_keys_are_named():
    enc = tiny()
    base = enc.state_dict()
    bad = perturbed(enc, 0.1, 1)
    del bad["cls"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"fine-tuned model 'a'.*missing keys \[cls\].*unexpected keys \[extra\.weight\]"):
        TaskVectors.from_state_dicts(base, {"a": bad})


def test_dtype_mismatch_is_named():
    enc = tiny()
    bad = {k: v.double() for k, v in perturbed(enc, 0.1, 1).items()}
    with pytest.raises(CheckpointError, match="dtype torch.float64, expected torch.float32"):
        TaskVectors.from_state_dicts(enc.state_dict(), {"a": bad})


def test_wrong_number_of_heads(tmp_path):
    experts = write_pool(tmp_path, tasks=("a", "b"))
    save_state_dict({"a.weight": torch.randn(4, 16)}, tmp_path / "heads.safetensors")
    pool = CheckpointPool(tiny(), str(tmp_path / "base.safetensors"), experts, str(tmp_path / "heads.safetensors"))
    with pytest.raises(CheckpointError, match="no head for task 'b'"):
        pool.load()


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.safetensors: cannot read"):
        load_state_dict(tmp_path / "bad.safetensors")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt: cannot read"):
        load_state_dict(tmp_path / "bad.pt")


def test_pickled_module_refused_without_opt_in(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_state_dict(tmp_path / "module.pt")
    assert set(load_state_dict(tmp_path / "module.pt", allow_pickle=True)) == {"weight", "bias"}


def test_fingerprint_names_differences():
    enc = tiny()
    base = enc.state_dict()
    tv = TaskVectors.from_state_dicts(base, {"a": perturbed(enc, 0.1, 1), "b": perturbed(enc, 0.1, 2)})
    same = TaskVectors.from_state_dicts(base, {"a": perturbed(enc, 0.1, 1), "b": perturbed(enc, 0.1, 2)})
    assert fingerprint_difference(tv.fingerprint(), same.fingerprint()) is None
    swapped = TaskVectors.from_state_dicts(base, {"b": perturbed(enc, 0.1, 2), "a": perturbed(enc, 0.1, 1)})
    assert "tasks" in fingerprint_difference(tv.fingerprint(), swapped.fingerprint())
    other = TaskVectors.from_state_dicts(base, {"a": perturbed(enc, 0.1, 1), "b": perturbed(enc, 0.2, 9)})
    assert "for tasks ['b']" in fingerprint_difference(tv.fingerprint(), other.fingerprint())
