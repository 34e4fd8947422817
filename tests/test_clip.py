"""open_clip integration, offline: a tiny random CLIP config, perturbed "fine-tuned" image towers,
image datasets written by the tests, and the same config machinery users run."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from adamerge.commands.main import main
from conftest import tiny_clip
from adamerge.methods.registry import names as registry_names
from adamerge.data.hf import CachedImages, HFSource
from adamerge.data.tasks import get_task, load_registry, suites
from adamerge.data.transforms import clip_transform
from adamerge.io.checkpoints import CheckpointError
from adamerge.models.clip import OpenCLIPPool, ZeroShotHead, create_clip, head_cache_key, text_identity, zero_shot_heads
from adamerge.models.convert import hf_to_open_clip, load_visual, read_checkpoint, visual_state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = "adamerge-test-tiny-clip"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


# ----------------------------------------------------------------------------- fixtures
def perturbed(state: dict, scale: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def open_clip_to_hf(visual: dict, heads: int) -> dict:
    """The inverse of the converter, for building Hugging Face-layout files in tests."""
    out = {"vision_model.embeddings.class_embedding": visual["class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": visual["conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": visual["positional_embedding"],
           "vision_model.pre_layrnorm.weight": visual["ln_pre.weight"],
           "vision_model.pre_layrnorm.bias": visual["ln_pre.bias"],
           "vision_model.post_layernorm.weight": visual["ln_post.weight"],
           "vision_model.post_layernorm.bias": visual["ln_post.bias"],
           "vision_model.embeddings.position_ids": torch.arange(visual["positional_embedding"].shape[0])[None]}
    layers = {int(k.split(".")[2]) for k in visual if k.startswith("transformer.resblocks.")}
    for i in layers:
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = visual[f"{src}attn.in_proj_{kind}"].chunk(3)
            out.update({f"{dst}self_attn.q_proj.{kind}": q, f"{dst}self_attn.k_proj.{kind}": k,
                        f"{dst}self_attn.v_proj.{kind}": v,
                        f"{dst}self_attn.out_proj.{kind}": visual[f"{src}attn.out_proj.{kind}"],
                        f"{dst}layer_norm1.{kind}": visual[f"{src}ln_1.{kind}"],
                        f"{dst}layer_norm2.{kind}": visual[f"{src}ln_2.{kind}"],
                        f"{dst}mlp.fc1.{kind}": visual[f"{src}mlp.c_fc.{kind}"],
                        f"{dst}mlp.fc2.{kind}": visual[f"{src}mlp.c_proj.{kind}"]})
    return {k: v.clone().contiguous() for k, v in out.items()}


def color_image(rgb, seed: int):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (40, 36, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny CLIP base file, experts in three layouts, two datasets, a tasks file."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("clip")
    clip, base = tiny_clip(root, TINY)
    visual = {k: v.detach().clone() for k, v in clip.visual.state_dict().items()}

    experts = {"mnist": root / "mnist.safetensors", "colors": root / "colors_hf.safetensors"}
    save_file(perturbed(visual, 0.02, 1), str(experts["mnist"]))          # open_clip image tower
    hf = open_clip_to_hf(perturbed(visual, 0.02, 2), heads=2)             # HF CLIPVisionModel, no proj
    save_file(hf, str(experts["colors"]))

    # MNIST stand-in: scikit-learn's digits saved with datasets.save_to_disk (image/label columns)
    digits = load_digits()
    def to_img(a):
        return Image.fromarray((a * 16).clip(0, 255).astype(np.uint8)).resize((28, 28))
    dd = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"image": [to_img(a) for a in digits.images[sl]], "label": digits.target[sl].tolist()},
            features=datasets.Features({"image": datasets.Image(),
                                        "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}))
        for split, sl in (("train", slice(0, 40)), ("test", slice(40, 80)))})
    dd.save_to_disk(str(root / "digits"))

    # a user task from an image folder: colors/<split>/<class>/<image>.png
    for split, n in (("train", 8), ("test", 6)):
        for c, rgb in COLORS.items():
            d = root / "colors" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                color_image(rgb, hash((split, c, i)) % 1000).save(d / f"{i}.png")
    tasks_file = root / "tasks.yaml"
    tasks_file.write_text(yaml.safe_dump({"tasks": {"colors": {
        "path": "colors", "classnames": list(COLORS), "templates": ["a photo of the color {c}."]}}}))
    return {"root": root, "clip": clip, "base": base, "visual": visual, "experts": experts,
            "digits": root / "digits", "tasks_file": tasks_file}


def run_config(world, tmp_path, granularity: str = "layerwise") -> Path:
    cfg = {
        "seed_everything": 0,
        "model": {"pool": {"class_path": "adamerge.models.OpenCLIPPool", "init_args": {
            "model": TINY, "pretrained": str(world["base"]),
            "experts": {t: str(p) for t, p in world["experts"].items()},
            "tasks_file": str(world["tasks_file"]), "head_cache": str(tmp_path / "heads")}},
            "granularity": granularity, "prior": 0.3, "lr": 0.01},
        "data": {"source": {"class_path": "adamerge.data.HFSource", "init_args": {
            "tasks": ["mnist", "colors"], "model": TINY, "pretrained": str(world["base"]),
            "tasks_file": str(world["tasks_file"]), "paths": {"mnist": str(world["digits"])},
            "image_cache": "disk", "cache_dir": str(tmp_path / "images"), "decode_threads": 2}},
            "batch_size": 8, "eval_batch_size": 64},
        "trainer": {"max_steps": 4, "val_check_interval": 4, "check_val_every_n_epoch": None,
                    "accelerator": "cpu", "devices": 1, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "checkpoint": {"every_n_train_steps": 4, "save_last": True},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -------------------------------------------------------------------------------- tests
def test_clip_fit_test_export_through_config(world, tmp_path, capsys):
    cfg = run_config(world, tmp_path)
    common = ["--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "run")]
    assert main(["fit", *common]) == 0, capsys.readouterr().err
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert main(["test", *common, "--ckpt_path", str(last)]) == 0
    assert "test/acc_avg" in capsys.readouterr().out
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "images").glob("*.npy")) == ["colors", "mnist"]

    out = tmp_path / "export"
    assert main(["export", "--config", str(cfg), "--ckpt_path", str(last), "--out", str(out)]) == 0
    merged = load_file(str(out / "merged.safetensors"))
    table = json.loads((out / "coefficients.json").read_text())
    # loadable into open_clip's image tower, strictly
    fresh = create_clip(TINY, str(world["base"]))
    fresh.visual.load_state_dict(merged, strict=True)
    # and equal to base + sum_k lambda[p, k] tau_k computed here from the expert files
    base = world["visual"]
    ft = {"mnist": load_file(str(world["experts"]["mnist"])),
          "colors": {**hf_to_open_clip(load_file(str(world["experts"]["colors"]))), "proj": base["proj"]}}
    names = table["parameters"]
    assert len(names) == len(base)
    for row, name in enumerate(names):
        want = base[name] + sum(table["coefficients"][t][row] * (ft[t][name] - base[name]) for t in ft)
        torch.testing.assert_close(merged[name], want, rtol=1e-5, atol=1e-6)
    lam = torch.tensor([table["coefficients"][t] for t in ft])
    assert not torch.allclose(lam, torch.full_like(lam, 0.3)), "coefficients were not learned"
    heads = load_file(str(out / "heads.safetensors"))
    assert heads["mnist.weight"].shape == (10, 32) and heads["colors.weight"].shape == (3, 32)
    # the folder alone (no base, expert or head-cache file) rebuilds the model: same logits
    from adamerge.exported import ExportedModel
    exported = ExportedModel.from_folder(out)
    assert exported.manifest["encoder"] == {"kind": "open_clip", "model": TINY, "pretrained": str(world["base"])}
    pixels = torch.randn(2, 3, 32, 32)
    feats = F.normalize(fresh.visual(pixels), dim=-1)
    torch.testing.assert_close(exported(pixels, "colors"), feats @ heads["colors.weight"].T, rtol=1e-5, atol=1e-5)

    # a checkpoint from another pool is refused, naming the difference
    cfg_other = tmp_path / "other.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["model"]["pool"]["init_args"]["experts"]["mnist"] = str(world["experts"]["colors"])
    cfg_other.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["export", "--config", str(cfg_other), "--ckpt_path", str(last), "--out", str(out)]) == 1
    assert "different model pool" in capsys.readouterr().err

    # data are matched to heads by task name: tasks listed in another order still line up
    data = yaml.safe_load(cfg.read_text())
    data["data"]["source"]["init_args"]["tasks"] = ["colors", "mnist"]
    cfg_other.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["test", "--config", str(cfg_other), "--ckpt_path", str(last),
                 "--trainer.default_root_dir", str(tmp_path / "run_other")]) == 0
    out_other = capsys.readouterr().out
    header = next(line for line in out_other.splitlines() if "avg" in line and "norm" in line)
    assert "mnist" in header and "colors" in header  # the per-task table of adamerge test
    saved = json.loads(next((tmp_path / "run_other").rglob("results.json")).read_text())
    assert set(next(iter(saved["methods"].values()))["per_task"]) == {"mnist", "colors"}


def test_clip_export_is_generic_over_pools(tmp_path, capsys):
    """export works for any pool: here a CheckpointPool of a TinyViT with files and image folders."""
    from adamerge.commands.export import build_model
    from adamerge.suites.synthetic import TinyViT
    arch = {"image_size": 8, "patch": 4, "channels": 3, "dim": 16, "depth": 1, "heads": 2, "out_dim": 16}
    torch.manual_seed(0)
    enc = TinyViT(**arch)
    base = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    for i, t in enumerate(("a", "b")):
        save_file(perturbed(base, 0.05, i + 1), str(tmp_path / f"{t}.safetensors"))
    save_file({"a.weight": torch.randn(3, 16) * 5, "b.weight": torch.randn(3, 16) * 5,
               "b.bias": torch.zeros(3)}, str(tmp_path / "heads.safetensors"))
    for t in ("a", "b"):
        for c, rgb in enumerate(COLORS.values()):
            d = tmp_path / "data" / t / "test" / str(c)
            d.mkdir(parents=True)
            for i in range(4):
                color_image(rgb, i).save(d / f"{i}.png")
    cfg = {"seed_everything": 0,
           "model": {"pool": {"class_path": "adamerge.models.CheckpointPool", "init_args": {
               "model": {"class_path": "adamerge.suites.TinyViT", "init_args": arch},
               "base": str(tmp_path / "base.safetensors"),
               "experts": {t: str(tmp_path / f"{t}.safetensors") for t in ("a", "b")},
               "heads": str(tmp_path / "heads.safetensors")}}, "granularity": "taskwise", "lr": 0.05},
           "data": {"source": {"class_path": "adamerge.data.FolderSource", "init_args": {
               "root": str(tmp_path / "data"), "tasks": ["a", "b"], "image_size": 8}}, "batch_size": 4},
           "trainer": {"max_steps": 3, "val_check_interval": 3, "check_val_every_n_epoch": None,
                       "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                       "enable_model_summary": False}}
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["fit", "--config", str(path), "--trainer.default_root_dir", str(tmp_path / "run")]) == 0, \
        capsys.readouterr().err
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main(["export", "--config", str(path), "--ckpt_path", str(last), "--out", str(tmp_path / "ex")]) == 0
    model = build_model([str(path)])
    model.merged.coefficients.data.copy_(torch.load(last, weights_only=True)["state_dict"]["merged.coefficients"])
    fresh = TinyViT(**arch)
    fresh.load_state_dict(load_file(str(tmp_path / "ex" / "merged.safetensors")), strict=True)
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.merged(x), rtol=1e-5, atol=1e-6)
    heads = load_file(str(tmp_path / "ex" / "heads.safetensors"))
    assert set(heads) == {"a.weight", "b.weight", "b.bias"}
    lam = json.loads((tmp_path / "ex" / "coefficients.json").read_text())["coefficients"]
    assert lam["a"] != [0.3] and len(lam["a"]) == 1


def hf_reference_forward(hf: dict, pixels: torch.Tensor, heads: int, patch: int) -> torch.Tensor:
    """The Hugging Face CLIPVisionModel(+projection) computation, written with plain torch ops."""
    p = {k.removeprefix("vision_model."): v for k, v in hf.items()}
    x = F.conv2d(pixels, p["embeddings.patch_embedding.weight"], stride=patch).flatten(2).transpose(1, 2)
    b, _, w = x.shape
    x = torch.cat([p["embeddings.class_embedding"].expand(b, 1, w), x], 1) + p["embeddings.position_embedding.weight"]
    x = F.layer_norm(x, (w,), p["pre_layrnorm.weight"], p["pre_layrnorm.bias"])
    n_layers = len({k.split(".")[2] for k in p if k.startswith("encoder.layers.")})
    hd = w // heads
    for i in range(n_layers):
        q = lambda name: p[f"encoder.layers.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (w,), q("layer_norm1.weight"), q("layer_norm1.bias"))
        qs = (h @ q("self_attn.q_proj.weight").t() + q("self_attn.q_proj.bias")) * hd ** -0.5
        ks = h @ q("self_attn.k_proj.weight").t() + q("self_attn.k_proj.bias")
        vs = h @ q("self_attn.v_proj.weight").t() + q("self_attn.v_proj.bias")
        split = lambda t: t.view(b, -1, heads, hd).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(qs) @ split(ks).transpose(-1, -2), -1) @ split(vs)
        att = att.transpose(1, 2).reshape(b, -1, w)
        x = x + att @ q("self_attn.out_proj.weight").t() + q("self_attn.out_proj.bias")
        h = F.layer_norm(x, (w,), q("layer_norm2.weight"), q("layer_norm2.bias"))
        h = h @ q("mlp.fc1.weight").t() + q("mlp.fc1.bias")
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu, as in OpenAI CLIP
        x = x + h @ q("mlp.fc2.weight").t() + q("mlp.fc2.bias")
    pooled = F.layer_norm(x[:, 0], (w,), p["post_layernorm.weight"], p["post_layernorm.bias"])
    return pooled @ hf["visual_projection.weight"].t()


def test_clip_hf_converter_matches_hf_computation(world):
    visual = world["clip"].visual
    g = torch.Generator().manual_seed(3)
    # random HF-layout weights, including non-trivial layer norms
    hf = {k: torch.randn(v.shape, generator=g) * (0.2 if v.ndim > 1 else 0.5) + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
          for k, v in open_clip_to_hf(world["visual"], heads=2).items() if v.is_floating_point()}
    hf["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    hf["visual_projection.weight"] = torch.randn(32, 64, generator=g) * 0.2
    converted = visual_state_dict(hf)
    tower = copy.deepcopy(visual)
    tower.load_state_dict(converted, strict=True)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), hf_reference_forward(hf, pixels, heads=2, patch=8),
                                   rtol=1e-4, atol=1e-5)


def test_clip_pool_fills_missing_projection_and_rejects_bad_shapes(world, tmp_path):
    pool = OpenCLIPPool(model=TINY, pretrained=str(world["base"]),
                        experts={t: str(p) for t, p in world["experts"].items()},
                        tasks_file=str(world["tasks_file"]), head_cache=str(tmp_path / "h"))
    loaded = pool.load()
    tv = loaded.task_vectors
    assert tv.task_names == ["mnist", "colors"]
    proj = tv.tensors[tv.names.index("proj")]
    assert proj[1].abs().max() == 0 and proj[0].abs().max() > 0   # HF expert: proj from the base
    assert isinstance(loaded.heads["colors"], ZeroShotHead)
    # an unseen task: its zero-shot head is built, its expert is not merged
    part = OpenCLIPPool(model=TINY, pretrained=str(world["base"]), experts={"mnist": str(world["experts"]["mnist"])},
                        tasks_file=str(world["tasks_file"]), head_cache=str(tmp_path / "h"),
                        unseen_tasks=["colors"]).load()
    assert part.task_vectors.task_names == ["mnist"] and part.unseen_tasks == ["colors"]
    assert torch.equal(part.unseen_heads["colors"].linear.weight, loaded.heads["colors"].linear.weight)
    bad = dict(load_file(str(world["experts"]["mnist"])))
    bad["conv1.weight"] = bad["conv1.weight"][:, :, :4].contiguous()
    save_file(bad, str(tmp_path / "bad.safetensors"))
    pool = OpenCLIPPool(model=TINY, pretrained=str(world["base"]),
                        experts={"mnist": str(tmp_path / "bad.safetensors")},
                        head_cache=str(tmp_path / "h"))
    with pytest.raises(CheckpointError, match=r"conv1.weight: shape \(64, 3, 4, 8\)"):
        pool.load()
    with pytest.raises(KeyError, match="did you mean 'mnist'"):
        OpenCLIPPool(model=TINY, pretrained=str(world["base"]), experts={"mnsit": "x"})


def test_clip_head_cache_keys_and_hits(world, tmp_path, monkeypatch):
    import adamerge.models.clip as clip_mod
    clip = world["clip"]
    colors = get_task("colors", tasks_file=world["tasks_file"])
    heads = zero_shot_heads(clip, TINY, {"colors": colors}, tmp_path)
    files = list(tmp_path.glob("colors-*.safetensors"))
    assert len(files) == 1
    # the head is the normalised prompt embedding scaled by the logit scale
    w = heads["colors"].linear.weight
    torch.testing.assert_close(w.norm(dim=1), torch.full((3,), float(clip.logit_scale.exp())), rtol=1e-4, atol=1e-4)
    feats = torch.randn(5, 32)
    torch.testing.assert_close(heads["colors"](feats), F.normalize(feats, dim=-1) @ w.t())
    # second build: read from the cache, the text tower is not run
    monkeypatch.setattr(clip_mod, "text_head_weight", lambda *a, **k: pytest.fail("cache missed"))
    again = zero_shot_heads(clip, TINY, {"colors": colors}, tmp_path)
    torch.testing.assert_close(again["colors"].linear.weight, w)
    # the key changes with class names, templates, model weights and model name
    ident = text_identity(clip, TINY)
    key = head_cache_key(ident, colors.classnames, colors.templates)
    assert key != head_cache_key(ident, ["red", "green", "cyan"], colors.templates)
    assert key != head_cache_key(ident, colors.classnames, ["a {c} thing."])
    other = create_clip(TINY, str(world["base"]))
    with torch.no_grad():
        other.token_embedding.weight[0, 0] += 1.0
    assert key != head_cache_key(text_identity(other, TINY), colors.classnames, colors.templates)
    assert key != head_cache_key({**ident, "model": "ViT-B-32"}, colors.classnames, colors.templates)
    assert key == head_cache_key(text_identity(create_clip(TINY, str(world["base"])), TINY),
                                 colors.classnames, colors.templates)


def test_clip_pickled_image_encoder_needs_opt_in(world, tmp_path, monkeypatch, capsys):
    # A class the user's environment does not have, as in the task-vectors release (src.modeling).
    pkg = tmp_path / "pkgsrc"
    pkg.mkdir()
    (pkg / "fake_tv_modeling.py").write_text(
        "import torch\nclass ImageEncoder(torch.nn.Module):\n"
        "    def __init__(self, model):\n        super().__init__()\n        self.model = model\n")
    monkeypatch.syspath_prepend(str(pkg))
    import importlib
    mod = importlib.import_module("fake_tv_modeling")
    enc = mod.ImageEncoder(create_clip(TINY, str(world["base"])))
    del enc.model.transformer  # as the release does (keep_lang=False)
    path = tmp_path / "finetuned.pt"
    torch.save(enc, path)
    monkeypatch.delitem(sys.modules, "fake_tv_modeling")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(pkg)])

    with pytest.raises(CheckpointError, match="allow-pickle"):
        read_checkpoint(path)
    state = load_visual(path, allow_pickle=True)
    assert set(state) == set(world["visual"])
    for k, v in world["visual"].items():
        torch.testing.assert_close(state[k], v)
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(path), str(out)]) == 1
    assert "allow-pickle" in capsys.readouterr().err and not out.exists()
    assert main(["convert", str(path), str(out), "--allow-pickle"]) == 0
    assert set(load_file(str(out))) == set(world["visual"])
    # a HF file converts too, and with --model the missing projection is filled from the base
    out_hf = tmp_path / "hf.safetensors"
    assert main(["convert", str(world["experts"]["colors"]), str(out_hf), "--model", TINY,
                 "--pretrained", str(world["base"])]) == 0
    assert set(load_file(str(out_hf))) == set(world["visual"])


def test_clip_help_of_commands(capsys):
    for cmd in ("convert", "finetune", "export"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"adamerge {cmd}" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "finetune" in capsys.readouterr().out


def test_clip_finetune_makes_an_expert(world, tmp_path, capsys):
    out = tmp_path / "colors.safetensors"
    code = main(["finetune", "--model", TINY, "--pretrained", str(world["base"]), "--task", "colors",
                 "--tasks-file", str(world["tasks_file"]), "--steps", "3", "--batch-size", "8",
                 "--warmup", "1", "--lr", "1e-3", "--num-workers", "0", "--device", "cpu",
                 "--head-cache", str(tmp_path / "h"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    state = load_file(str(out))
    assert set(state) == set(world["visual"])
    assert any(not torch.equal(state[k], world["visual"][k]) for k in state)
    assert "step 3/3" in capsys.readouterr().err
    from adamerge.commands.finetune import cosine_lr
    assert cosine_lr(0, 1.0, 500, 2000) == pytest.approx(1 / 500)
    assert cosine_lr(499, 1.0, 500, 2000) == pytest.approx(1.0)
    assert cosine_lr(1250, 1.0, 500, 2000) == pytest.approx(0.5)
    assert cosine_lr(2000, 1.0, 500, 2000) == pytest.approx(0.0, abs=1e-12)


def test_clip_transform_and_image_cache(world, tmp_path, monkeypatch):
    import open_clip
    _, _, pre = open_clip.create_model_and_transforms(TINY)
    assert repr(clip_transform(TINY)) == repr(pre)
    tf = clip_transform("ViT-B-32", "openai")   # from configs only: nothing is downloaded
    assert "224" in repr(tf) and "bicubic" in repr(tf)

    src = HFSource(["mnist", "colors"], model=TINY, pretrained=str(world["base"]),
                   tasks_file=str(world["tasks_file"]), paths={"mnist": str(world["digits"])},
                   image_cache="disk", cache_dir=str(tmp_path), decode_threads=2)
    plain = HFSource(["mnist", "colors"], model=TINY, pretrained=str(world["base"]),
                     tasks_file=str(world["tasks_file"]), paths={"mnist": str(world["digits"])},
                     image_cache="none")
    for task in ("mnist", "colors"):
        cached, ref = src.dataset(task, "test"), plain.dataset(task, "test")
        assert len(cached) == len(ref) > 0
        for i in (0, len(ref) - 1):
            x, y = cached[i]
            xr, yr = ref[i]
            assert y == yr and x.shape == (3, 32, 32)
            torch.testing.assert_close(x, xr, atol=1e-6, rtol=0)
    assert {y for _, y in (src.dataset("colors", "test")[i] for i in range(18))} == {0, 1, 2}
    # second use of the same (dataset, transform): read from the cache file, nothing decoded
    def no_decode(self, i):
        raise RuntimeError("decoded again")
    monkeypatch.setattr(CachedImages, "_decode", no_decode)
    assert len(src.dataset("mnist", "test")) == 40
    mem = HFSource(["colors"], model=TINY, pretrained=None, tasks_file=str(world["tasks_file"]), image_cache="memory")
    with pytest.raises(RuntimeError, match="decoded again"):  # memory mode decodes per process
        mem.dataset("colors", "test")


def test_clip_task_registry():
    reg = load_registry()
    tall = suites()
    assert len(tall["tall8"]) == 8 and len(tall["tall14"]) == 14 and len(tall["tall20"]) == 20
    assert set(tall["tall20"]) <= set(reg)
    counts = {"sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10,
              "gtsrb": 43, "mnist": 10, "dtd": 47, "oxford_flowers102": 102, "pcam": 2, "fer2013": 7,
              "oxford_iiit_pet": 37, "stl10": 10, "cifar100": 100, "cifar10": 10, "food101": 101,
              "fashion_mnist": 10, "emnist_letters": 26, "kmnist": 10, "rendered_sst2": 2}
    assert {t: reg[t].num_classes for t in counts} == counts
    assert get_task("Cars").name == "stanford_cars" and get_task("EuroSAT").name == "eurosat"
    assert reg["mnist"].prompts("7") == ['a photo of the number: "7".']
    assert reg["food101"].split("test") == "validation"
    with pytest.raises(KeyError, match="did you mean 'gtsrb'"):
        get_task("gtrsb")


def test_clip_tasks_file_adds_and_overrides(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml.safe_dump({"tasks": {
        "mnist": {"templates": ["a digit {c}."]},
        "leaves": {"hf_path": "me/leaves", "classnames": ["oak", "elm"], "templates": ["a {c} leaf."]}}}))
    reg = load_registry(f)
    assert reg["mnist"].templates == ("a digit {c}.",) and reg["mnist"].num_classes == 10
    assert reg["leaves"].hf_path == "me/leaves"
    f.write_text(yaml.safe_dump({"tasks": {"x": {"hf_path": "a/b", "classnames": ["a"],
                                                 "templates": ["no placeholder"]}}}))
    with pytest.raises(ValueError, match="must contain '\\{c\\}'"):
        load_registry(f)


PROTOCOL_CONFIGS = sorted(p for p in (ROOT / "configs").glob("clip-*.yaml")
                          if not re.fullmatch(r"\d+tasks", p.name.split("_")[1]))
CLIP_CONFIGS = sorted(set((ROOT / "configs").glob("clip-*.yaml")) - set(PROTOCOL_CONFIGS))


def test_protocol_configs_name_their_splits():
    """The generalisation splits and the robustness tasks of the paper (docs: docs/clip.md, docs/fidelity.md)."""
    found = {p.name: yaml.safe_load(p.read_text()) for p in PROTOCOL_CONFIGS}
    want = {"clip-vit-b-32_unseen-mnist-eurosat_layerwise.yaml": ["mnist", "eurosat"],
            "clip-vit-b-32_unseen-resisc45-svhn_layerwise.yaml": ["resisc45", "svhn"],
            "clip-vit-b-32_corrupted-4tasks_layerwise.yaml": []}
    assert sorted(found) == sorted(want)
    for name, cfg in found.items():
        pool, data = cfg["model"]["pool"]["init_args"], cfg["data"]
        assert pool.get("unseen_tasks", []) == want[name], name
        assert data["source"]["init_args"]["tasks"] == list(pool["experts"]) + want[name], name
        assert len(pool["experts"]) == (4 if not want[name] else 6)
    assert found["clip-vit-b-32_corrupted-4tasks_layerwise.yaml"]["data"]["corruption"] == "motion_blur"


def test_clip_configs_are_consistent():
    assert len(CLIP_CONFIGS) >= 12
    names = {p.name for p in CLIP_CONFIGS}
    for model in ("vit-b-32", "vit-l-14"):
        for g in ("taskwise", "layerwise", "layerwise_pp"):
            assert f"clip-{model}_8tasks_{g}.yaml" in names
        assert f"clip-{model}_14tasks_layerwise.yaml" in names
        assert f"clip-{model}_20tasks_layerwise.yaml" in names
        for m in registry_names("learned"):  # every learned row has its 8-task config
            assert f"clip-{model}_8tasks_{m.removeprefix('adamerging_')}.yaml" in names
    import open_clip
    from adamerge.methods import registry
    reg = load_registry()
    for path in CLIP_CONFIGS:
        cfg = yaml.safe_load(path.read_text())
        suffix = path.name.split("_", 2)[2].removesuffix(".yaml")
        method = registry.get(f"adamerging_{suffix}" if f"adamerging_{suffix}" in registry.REGISTRY else suffix)
        model_args = cfg["model"].get("init_args", cfg["model"])
        assert cfg["model"].get("class_path", "adamerge.methods.AdaMerging") == \
            f"adamerge.methods.{method.build.__name__}", path.name
        for key, value in method.defaults().items():  # the registry's defaults, written out
            if key not in ("per_task_backward", "init_from"):
                assert model_args[key] == value, (path.name, key)
        if method.starts_from:
            assert model_args["init_from"].endswith("_8tasks_layerwise/checkpoints/last.ckpt"), path.name
        pool, src = model_args["pool"]["init_args"], cfg["data"]["source"]["init_args"]
        assert list(pool["experts"]) == src["tasks"], path.name
        assert all(t in reg for t in src["tasks"]), path.name
        assert open_clip.get_model_config(pool["model"]) is not None
        assert (pool["model"], pool["pretrained"]) == (src["model"], src["pretrained"])
        n = int(path.name.split("_")[1].removesuffix("tasks"))
        assert len(src["tasks"]) == n
        defaults = method.defaults()  # the recipe's values come from the registry row
        assert model_args.get("prior", model_args.get("scaling")) == defaults.get("prior", defaults.get("scaling"))
        assert model_args.get("lr") == defaults.get("lr")  # a training-free row (smile) has none
        assert set(model_args) - {"pool"} <= set(defaults), path.name  # only the builder's arguments
        assert cfg["data"]["batch_size"] == 16
        assert {k: cfg["data"][k] for k in method.data} == dict(method.data), path.name
        assert cfg["trainer"]["max_steps"] == method.steps, path.name
        assert model_args.get("trim") == (0.2 if "layerwise_pp" in path.name else None)


def test_paper_configs_follow_the_official_recipe():
    """configs/paper/: batches of 2 x 16 per task, the official-equivalent trim, defaults otherwise."""
    found = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "configs" / "paper").glob("*.yaml")
             if re.fullmatch(r"clip-vit-[bl]-\d+_8tasks_(taskwise|layerwise)(_pp)?\.yaml", p.name)}
    assert len(found) == 8
    for name, cfg in found.items():
        model = cfg["model"]
        assert cfg["data"]["batch_size"] == 32 and cfg["trainer"]["max_steps"] == 500, name
        assert (model["prior"], model["lr"], model["clamp"]) == (0.3, 0.001, True), name
        assert model["granularity"] == ("taskwise" if "taskwise" in name else "layerwise"), name
        trim = {"vit-b-32": 0.2583, "vit-l-14": 0.2254}[name.split("_")[0].removeprefix("clip-")]
        assert model["trim"] == (trim if name.endswith("_pp.yaml") else None), name


def test_recipe_configs_set_the_published_recipes():
    """configs/paper/ (the other learned rows' official code) and configs/fusionbench/ (issue 31)."""
    def load(name):
        cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
        return cfg, cfg["model"].get("init_args", cfg["model"])
    for key in ("vit-b-32", "vit-l-14"):
        cfg, model = load(f"paper/clip-{key}_8tasks_tinting.yaml")  # SyMerge: 500 epochs x a step per task
        assert (cfg["data"]["task_steps"], cfg["data"]["batch_size"], cfg["trainer"]["max_steps"]) == (True, 32, 4000)
        cfg, model = load(f"paper/clip-{key}_8tasks_adarank.yaml")
        assert cfg["data"]["batch_size"] == (4 if key == "vit-l-14" else 16) and cfg["trainer"]["max_steps"] == 10000
        assert model["clamp"] is False and model["initial_rank_ratio"] == 0.125
        cfg, model = load(f"paper/clip-{key}_8tasks_wemoe.yaml")
        assert cfg["trainer"]["val_check_interval"] == 500 and model["batch_reduce"] is False
        cfg, model = load(f"fusionbench/clip-{key}_8tasks_layerwise.yaml")
        assert (model["clamp"], model["split_qkv"], cfg["trainer"]["max_steps"]) == (False, True, 1000)
        assert model["pool"]["init_args"]["experts"]["mnist"] == f"experts/fusionbench/{model['pool']['init_args']['model']}/mnist.safetensors"
        cfg, model = load(f"fusionbench/clip-{key}_8tasks_layerwise_surgery.yaml")
        assert model["feature_norm"] == "fusionbench" and cfg["trainer"]["val_check_interval"] == 200
        for folder in ("paper", "fusionbench"):  # Surgery starts from the layer-wise run of its own folder
            _, model = load(f"{folder}/clip-{key}_8tasks_layerwise_surgery.yaml")
            stem = model["init_from"].removeprefix("runs/").removesuffix("/checkpoints/last.ckpt")
            assert (ROOT / "configs" / f"{stem}.yaml").is_file() and stem.startswith(f"{folder}/")
        cfg, model = load(f"fusionbench/clip-{key}_8tasks_wemoe.yaml")
        assert (model["batch_reduce"], model["lr"], model["lr_schedule"]) == (True, 0.0001, "constant")


@pytest.mark.parametrize("name", ["clip-vit-b-32_8tasks_layerwise.yaml", "clip-vit-l-14_20tasks_layerwise_pp.yaml",
                                  "paper/clip-vit-b-32_8tasks_taskwise_pp.yaml", "paper/clip-vit-l-14_8tasks_tinting.yaml",
                                  "paper/clip-vit-l-14_8tasks_adarank.yaml", "fusionbench/clip-vit-b-32_8tasks_layerwise.yaml",
                                  "fusionbench/clip-vit-b-32_8tasks_layerwise_surgery.yaml",
                                  "fusionbench/clip-vit-l-14_8tasks_wemoe.yaml",
                                  "clip-vit-b-32_8tasks_layerwise_surgery.yaml", "clip-vit-l-14_8tasks_tinting.yaml",
                                  "clip-vit-b-32_8tasks_wemoe.yaml", "clip-vit-l-14_8tasks_adarank.yaml",
                                  "clip-vit-b-32_8tasks_layerwise_fewshot.yaml",
                                  "clip-vit-b-32_unseen-mnist-eurosat_layerwise.yaml",
                                  "clip-vit-b-32_corrupted-4tasks_layerwise.yaml"])
def test_clip_config_validates_against_signatures(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / name), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"].get("init_args", printed["model"])  # subclass mode when class_path is named
    assert model["pool"]["class_path"] == "adamerge.models.OpenCLIPPool"
