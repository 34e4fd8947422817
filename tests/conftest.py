"""Shared fixtures: small random models and pools built in memory, and a per-session cache dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from adamerge.models.pool import LoadedPool, ModelPool
from adamerge.suites.synthetic import TinyViT
from adamerge.engine.task_vectors import TaskVectors


if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on 2 cores: one thread per worker (and per process it starts); two workers of
    # two OpenMP threads each on two cores spin against each other and run several times slower
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory) -> Path:
    """Suites built by tests go to a temp cache, never the user's."""
    path = tmp_path_factory.mktemp("adamerge-cache")
    os.environ["ADAMERGE_CACHE"] = str(path)
    return path


def perturbed(module: nn.Module, scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
            for k, v in module.state_dict().items()}


class RandomPool(ModelPool):
    """A random TinyViT and K randomly perturbed "experts" with random linear heads."""

    def __init__(self, tasks: tuple[str, ...] = ("a", "b", "c"), classes: int = 5, seed: int = 0,
                 scale: float = 0.05) -> None:
        self.tasks, self.classes, self.seed, self.scale = list(tasks), classes, seed, scale

    def load(self) -> LoadedPool:
        torch.manual_seed(self.seed)
        enc = TinyViT(image_size=8, patch=4, dim=16, depth=1, heads=2, out_dim=16)
        base = {k: v.clone() for k, v in enc.state_dict().items()}
        experts = {t: perturbed(enc, self.scale, self.seed + i + 1) for i, t in enumerate(self.tasks)}
        names = [n for n, _ in enc.named_parameters()]
        tv = TaskVectors.from_state_dicts(base, experts, names=names)
        heads = {t: nn.Linear(16, self.classes) for t in self.tasks}
        for h in heads.values():
            h.weight.data *= 10
        return LoadedPool(enc, tv, heads, {t: (lambda sd=sd: sd) for t, sd in experts.items()})


@pytest.fixture
def random_pool() -> RandomPool:
    return RandomPool()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# A tiny open_clip architecture (2-layer ViT on 32-px images, small text tower) for tests that
# build real open_clip models without any download.
TINY_CLIP_CFG = {"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def tiny_clip(root: Path, name: str) -> tuple[nn.Module, Path]:
    """Register the open_clip config ``name`` (:data:`TINY_CLIP_CFG`, written under ``root/cfg``),
    build it with seed 0 and write its whole state dict to ``root/base.safetensors``:
    ``(model, that file)``."""
    import json

    import open_clip
    from safetensors.torch import save_file
    (root / "cfg").mkdir(exist_ok=True)
    (root / "cfg" / f"{name}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(root / "cfg")
    torch.manual_seed(0)
    clip = open_clip.create_model(name)
    base = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(base))
    return clip, base
