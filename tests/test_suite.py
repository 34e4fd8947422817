"""The built-in suites: spec overrides, per-task colour domains, shifted zero-shot heads."""

import pytest
import torch

from adamerge.options import parse_overrides
from adamerge.suites import synthetic as S
from adamerge.io.checkpoints import load_state_dict


def test_overrides_change_the_spec_and_its_cache_key():
    pool = S.SuitePool("tiny", overrides={"head_shift": 0.5})
    source = S.SuiteSource("tiny", overrides={"head_shift": 0.5})
    assert pool.spec.head_shift == source.spec.head_shift == 0.5
    assert pool.spec.key() == source.spec.key() != S.SuitePool("tiny").spec.key()
    with pytest.raises(ValueError, match="unknown suite fields \\['head_shfit'\\]"):
        S.SuitePool("tiny", overrides={"head_shfit": 0.5})
    with pytest.raises(ValueError, match="'head_shift' expects a float, got 'abc'"):
        S.SuiteSource("tiny", overrides={"head_shift": "abc"})
    with pytest.raises(ValueError, match="'colour' expects a bool, got 1"):
        S.get_spec("tiny", colour=1)
    assert S.get_spec("tiny", head_shift=1).head_shift == 1  # an int is a fine float


def test_demo_set_parses_json_values():
    assert parse_overrides(["head_shift=0.4", "colour=false", "tasks=[\"dots\"]"]) == {
        "head_shift": 0.4, "colour": False, "tasks": ["dots"]}
    with pytest.raises(ValueError, match="FIELD=VALUE, got 'head_shift'"):
        parse_overrides(["head_shift"])


def test_colour_gives_each_task_its_own_palette():
    spec = S.get_spec("tiny", colour=True, n_train=40, n_val=10, n_test=10)
    means = {}
    for task in spec.tasks:
        x, y = S.task_data(spec, task)["train"]
        assert x.shape[1:] == (3, spec.image_size, spec.image_size) and x.min() >= 0 and x.max() <= 1
        means[task] = x.mean(dim=(0, 2, 3))
    # digits are white on black (grey), shapes yellow on blue: their mean colours differ
    assert (means["digits"] - means["shapes"]).abs().max() > 0.1
    assert S.make_encoder(spec).patch_embed.in_channels == 3
    gray = S.get_spec("tiny", n_train=40, n_val=10, n_test=10)
    assert S.task_data(gray, "digits")["train"][0].shape[1] == 1
    assert S.make_encoder(gray).patch_embed.in_channels == 1


def test_head_shift_moves_only_the_zero_shot_heads(tmp_path):
    """Same pretraining, same base weights; the heads are the class embeddings moved off."""
    small = dict(n_train=32, n_val=8, n_test=8, pretrain_steps=2, expert_steps=1)
    S.build_suite(S.get_spec("tiny", **small), tmp_path / "a", progress=None)
    S.build_suite(S.get_spec("tiny", head_shift=0.5, **small), tmp_path / "b", progress=None)
    base_a, base_b = (load_state_dict(tmp_path / d / "base.safetensors") for d in "ab")
    assert all(torch.equal(base_a[k], base_b[k]) for k in base_a)
    heads_a, heads_b = (load_state_dict(tmp_path / d / "heads.safetensors") for d in "ab")
    for k in heads_a:
        cos = torch.nn.functional.cosine_similarity(heads_a[k], heads_b[k], dim=-1)
        assert cos.max() < 0.999 and cos.min() > 0.5, k
        assert torch.allclose(heads_b[k].norm(dim=-1), torch.full((len(cos),), S.LOGIT_SCALE))


def test_suites_are_built_with_kernels_capped_at_avx2():
    """The build runs in a child process whose PyTorch / MKL / oneDNN kernels are capped at AVX2
    (adamerge.suites.pinned): AVX-512 kernels build other weights, and three demo rows moved by
    one image between an AVX-512 and an AVX2 machine (2026-12-06)."""
    import json
    folder = S.ensure_suite(S.get_spec("tiny"), progress=None)  # the session's cache (conftest)
    built = json.loads((folder / "spec.json").read_text())["cpu_capability"]
    assert built != "AVX512", built
