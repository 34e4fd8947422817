"""A miniature, offline model-merging benchmark built from data the install already has.

Tasks are small image-classification problems with different input domains and label spaces:
scikit-learn's real 8x8 handwritten digits, plus procedurally generated shapes, grating
orientations, dot counts, rendered letters and textures, each drawn in its own colour palette (as
the benchmark's domains differ in colour statistics, not only in content). A small ViT is
"pretrained" CLIP-style: its features are aligned with one embedding per class of every task (the
stand-in for CLIP's text embeddings; all of them in a narrow cone, like CLIP's) on slightly noised
images, so its features separate every task's classes. Its frozen "zero-shot" heads are those class
embeddings moved off by a random direction (``head_shift``), times a logit scale: the base is
mediocre zero-shot because its heads are misaligned with good features, as CLIP is on MNIST or
EuroSAT, where a linear probe on the same features does far better. One expert per task fine-tunes
the whole encoder with its head frozen at a small learning rate, like the task-vectors recipe.

Everything is deterministic given the spec, and the trained weights are cached on disk under a
hash of the full spec (not its name).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from .pinned import build_pinned, cpu_capability
from ..io.cache import default_cache_dir
from ..io.checkpoints import load_state_dict, save_state_dict
from ..data.datamodule import DatasetSource
from ..errors import unknown_name
from ..models.pool import LoadedPool, ModelPool, check_unseen, linear_heads_from_state, merged_parameter_names
from ..engine.task_vectors import TaskVectors

# bump when generators or training change: it is part of the cache key. 5: build 4's computation,
# run with the CPU kernels pinned to AVX2 (adamerge.suites.pinned), the same weights on every x86 CPU
SUITE_VERSION = 5
# (4: pretraining runs the encoder once per step on all tasks' images, not once per task: the same
# computation with another floating-point summation order, so other weights and figures)


# ----------------------------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x))))


class TinyViT(nn.Module):
    """A small vision transformer returning L2-normalised features (like CLIP's image tower)."""

    def __init__(self, image_size: int = 16, patch: int = 4, channels: int = 1, dim: int = 64,
                 depth: int = 4, heads: int = 4, out_dim: int = 64) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.ln_post = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return F.normalize(self.proj(self.ln_post(x[:, 0])), dim=-1)


# ------------------------------------------------------------------------------- tasks
def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1) * 2 - 1


def _finish(rng: np.random.Generator, img: np.ndarray, noise: float = 0.08) -> np.ndarray:
    img = img * rng.uniform(0.6, 1.0) + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def gen_digits(rng: np.random.Generator, n: int, s: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's real 8x8 handwritten digits, upsampled (n is capped at the 1,797 images)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    order = rng.permutation(len(d.target))[:n]
    imgs = torch.tensor(d.images[order] / 16.0, dtype=torch.float32)[:, None]
    imgs = F.interpolate(imgs, size=(s, s), mode="bilinear", align_corners=False)[:, 0].numpy()
    return np.clip(imgs, 0, 1), d.target[order], [str(i) for i in range(10)]


SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond"]


def gen_shapes(rng, n, s):
    y, x = _grid(s)
    imgs, labels = np.zeros((n, s, s), np.float32), rng.integers(0, len(SHAPES), n)
    for i, c in enumerate(labels):
        cx, cy, r = rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.25), rng.uniform(0.5, 0.75)
        u, v = (x - cx) / r, (y - cy) / r
        m = {0: u**2 + v**2 < 1, 1: (abs(u) < 0.8) & (abs(v) < 0.8),
             2: (v > -0.7) & (v < 0.8) & (abs(u) < (v + 0.7) * 0.6),
             3: ((abs(u) < 0.25) | (abs(v) < 0.25)) & (abs(u) < 1) & (abs(v) < 1),
             4: (u**2 + v**2 < 1) & (u**2 + v**2 > 0.4), 5: abs(u) + abs(v) < 1}[int(c)]
        imgs[i] = _finish(rng, m.astype(np.float32))
    return imgs, labels, SHAPES


def gen_gratings(rng, n, s, k: int = 8):
    y, x = _grid(s)
    labels = rng.integers(0, k, n)
    imgs = np.zeros((n, s, s), np.float32)
    for i, c in enumerate(labels):
        th = math.pi * (c + rng.uniform(-0.25, 0.25)) / k
        f = rng.uniform(2.0, 4.0)
        imgs[i] = _finish(rng, 0.5 + 0.5 * np.sin(f * math.pi * (x * math.cos(th) + y * math.sin(th))
                                                  + rng.uniform(0, 2 * math.pi)), 0.2)
    return imgs, labels, [f"{180 * c // k} degrees" for c in range(k)]


def gen_dots(rng, n, s, k: int = 4):
    y, x = _grid(s)
    labels = rng.integers(0, k, n)
    imgs = np.zeros((n, s, s), np.float32)
    for i, c in enumerate(labels):
        img, centers = np.zeros((s, s), np.float32), []
        while len(centers) < c + 1:  # dots never touch, so the count is unambiguous
            p = rng.uniform(-0.8, 0.8, 2)
            if all(np.hypot(*(p - q)) > 0.6 for q in centers):
                centers.append(p)
        for cx, cy in centers:
            img = np.maximum(img, (((x - cx) ** 2 + (y - cy) ** 2) < 0.05).astype(np.float32))
        imgs[i] = _finish(rng, img)
    return imgs, labels, [str(c + 1) for c in range(k)]


LETTERS = list("AEHKMNRSXZ")


def gen_letters(rng, n, s):
    from PIL import Image, ImageDraw, ImageFont
    fonts = [ImageFont.load_default(size=sz) for sz in (12, 14)]
    labels = rng.integers(0, len(LETTERS), n)
    imgs = np.zeros((n, s, s), np.float32)
    for i, c in enumerate(labels):
        im = Image.new("L", (s, s))
        ImageDraw.Draw(im).text((rng.integers(1, 5), rng.integers(-2, 2)), LETTERS[c], fill=255,
                                font=fonts[rng.integers(0, len(fonts))])
        imgs[i] = _finish(rng, np.asarray(im, np.float32) / 255.0)
    return imgs, labels, LETTERS


TEXTURES = ["checker", "blobs", "speckle", "grid", "rings", "zigzag"]


def gen_textures(rng, n, s):
    y, x = _grid(s)
    labels = rng.integers(0, len(TEXTURES), n)
    imgs = np.zeros((n, s, s), np.float32)
    for i, c in enumerate(labels):
        f, ph = rng.uniform(2.5, 4.5), rng.uniform(0, 2 * math.pi, 2)
        if c == 0:
            img = (np.sign(np.sin(f * math.pi * x + ph[0]) * np.sin(f * math.pi * y + ph[1])) + 1) / 2
        elif c == 1:
            z = torch.tensor(rng.normal(size=(1, 1, 4, 4)), dtype=torch.float32)
            img = F.interpolate(z, size=(s, s), mode="bicubic", align_corners=False)[0, 0].numpy()
            img = (img > 0).astype(np.float32)
        elif c == 2:
            img = (rng.uniform(size=(s, s)) < 0.25).astype(np.float32)
        elif c == 3:
            img = ((np.abs(np.sin(f * math.pi * x + ph[0])) < 0.3) | (np.abs(np.sin(f * math.pi * y + ph[1])) < 0.3))
        elif c == 4:
            img = 0.5 + 0.5 * np.sin(f * 2 * math.pi * np.sqrt((x - ph[0] / 10) ** 2 + y ** 2))
        else:
            img = 0.5 + 0.5 * np.sign(np.sin(f * math.pi * (y + 0.3 * np.abs(((x * f) % 2) - 1)) + ph[0]))
        imgs[i] = _finish(rng, np.asarray(img, np.float32))
    return imgs, labels, TEXTURES


# Each task's own colours (background, foreground RGB), so the tasks' input domains differ the way
# the benchmark's do (white-on-black digits, satellite colours, street-sign colours...), not only
# in what is drawn.
PALETTES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "digits": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), "shapes": ((0.1, 0.2, 0.6), (1.0, 0.85, 0.2)),
    "gratings": ((0.2, 0.6, 0.2), (0.9, 0.3, 0.8)), "dots": ((0.95, 0.95, 0.9), (0.8, 0.1, 0.1)),
    "letters": ((0.9, 0.8, 0.6), (0.1, 0.1, 0.3)), "textures": ((0.5, 0.15, 0.1), (0.3, 0.9, 0.9)),
}


def colourise(rng: np.random.Generator, task: str, imgs: np.ndarray, jitter: float = 0.05) -> np.ndarray:
    """``[n, S, S]`` intensities in [0, 1] -> ``[n, 3, S, S]`` in the task's palette, colours jittered per image."""
    bg, fg = (np.asarray(c, np.float32) for c in PALETTES[task])
    n = len(imgs)
    bg = np.clip(bg + rng.normal(0, jitter, (n, 3)), 0, 1)[:, :, None, None]
    fg = np.clip(fg + rng.normal(0, jitter, (n, 3)), 0, 1)[:, :, None, None]
    a = imgs[:, None]
    return (bg * (1 - a) + fg * a).astype(np.float32)


GENERATORS: dict[str, Callable] = {"digits": gen_digits, "shapes": gen_shapes, "gratings": gen_gratings,
                                   "dots": gen_dots, "letters": gen_letters, "textures": gen_textures}


# ------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class SuiteSpec:
    """Everything that determines a suite's data and weights (its hash is the cache key)."""

    tasks: tuple[str, ...] = ("digits", "shapes", "gratings", "dots", "letters", "textures")
    image_size: int = 16
    dim: int = 64
    depth: int = 4
    heads: int = 4
    n_train: int = 1000
    n_val: int = 200
    n_test: int = 500
    pretrain_steps: int = 1200
    pretrain_noise: float = 0.15
    expert_steps: int = 300
    expert_lr: float = 1e-4
    batch_size: int = 64
    head_spread: float = 0.6
    head_shift: float = 0.7  # zero-shot heads: class embeddings + a random direction of this norm
    colour: bool = True  # each task in its own palette (3 channels); False: grayscale, 1 channel
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"version": SUITE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


SUITES: dict[str, SuiteSpec] = {
    "tiny": SuiteSpec(tasks=("digits", "shapes", "gratings"), dim=32, depth=2, heads=2, n_train=400,
                      n_val=100, n_test=200, pretrain_steps=150, pretrain_noise=0.15,
                      expert_steps=150, expert_lr=2e-3, colour=False, head_shift=0.0),
    "demo": SuiteSpec(),
}


def get_spec(suite: str | SuiteSpec, **overrides) -> SuiteSpec:
    """A preset by name (``tiny``, ``demo``) or a spec, with field overrides."""
    if "tasks" in overrides:
        for t in overrides["tasks"]:
            if t not in GENERATORS:
                raise ValueError(unknown_name("task", t, sorted(GENERATORS), where=" in the suites"))
    return spec_with(suite, SUITES, "suite", overrides)


def spec_with(suite: Any, presets: Mapping[str, Any], kind: str, overrides: dict[str, Any]) -> Any:
    """A preset (by name) or spec dataclass with some fields replaced, each override checked
    against the field's default type (e.g. ``--set head_shift=abc`` would otherwise fail deep in
    training); ``tasks`` becomes a tuple and a float field gets a float (1 and 1.0 are one spec,
    with one cache key)."""
    if isinstance(suite, str):
        if suite not in presets:
            raise ValueError(unknown_name(kind, suite, sorted(presets)))
        suite = presets[suite]
    unknown = set(overrides) - set(asdict(suite))
    if unknown:
        raise ValueError(f"unknown {kind} fields {sorted(unknown)}; known: {sorted(asdict(suite))}")
    overrides = dict(overrides)
    for name, value in overrides.items():
        default = getattr(suite, name)
        if not _fits(value, default):
            raise ValueError(f"{kind} field {name!r} expects a {type(default).__name__}, got {value!r}")
        if isinstance(default, float):
            overrides[name] = float(value)
    if "tasks" in overrides:
        overrides["tasks"] = tuple(overrides["tasks"])
    return replace(suite, **overrides)


def _fits(value: Any, default: Any) -> bool:
    """Whether ``value`` may replace a spec field whose default is ``default``."""
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(value, bool) or isinstance(default, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    return isinstance(value, (int, float) if isinstance(default, float) else int)


# -------------------------------------------------------------------------------- data
def task_data(spec: SuiteSpec, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (images [n,C,S,S], labels [n])}`` for train/val/test, deterministic in the spec
    (C = 3 in the task's palette when ``spec.colour``, else 1)."""
    if task not in GENERATORS:
        raise ValueError(unknown_name("task", task, sorted(GENERATORS), where=" in the suites"))
    rng = np.random.default_rng([spec.seed, sorted(GENERATORS).index(task)])
    total = spec.n_train + spec.n_val + spec.n_test
    imgs, labels, _ = GENERATORS[task](rng, total, spec.image_size)
    n = len(labels)  # digits has fewer images than asked: shrink the splits in proportion
    n_val, n_test = spec.n_val * n // total, spec.n_test * n // total
    imgs = colourise(rng, task, imgs) if spec.colour else imgs[:, None]
    x = torch.from_numpy(np.ascontiguousarray(imgs, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    cut = [n - n_val - n_test, n - n_test]
    return {"train": (x[:cut[0]], y[:cut[0]]), "val": (x[cut[0]:cut[1]], y[cut[0]:cut[1]]),
            "test": (x[cut[1]:], y[cut[1]:])}


def class_names(task: str) -> list[str]:
    return GENERATORS[task](np.random.default_rng(0), 1, 8)[2]


class SuiteSource(DatasetSource):
    """Datasets of a built-in suite; splits ``train``, ``val`` (labeled, for tuning) and ``test``.

    Args:
        suite: preset name (``tiny``, ``demo``).
        tasks: a subset / order of the preset's tasks (default: all of them).
        seed: data seed (part of the spec).
        overrides: other spec fields to change, e.g. ``{"pretrain_noise": 0.3}`` (see ``SuiteSpec``).
    """

    def __init__(self, suite: str = "tiny", tasks: list[str] | None = None, seed: int = 0,
                 overrides: dict[str, Any] | None = None) -> None:
        over = {**(overrides or {}), "seed": seed, **({"tasks": tasks} if tasks else {})}
        self.spec = get_spec(suite, **over)
        self._data: dict[str, dict] = {}

    def task_names(self) -> list[str]:
        return list(self.spec.tasks)

    @property
    def image_size(self) -> int:
        """The suite's square image size (``adamerge predict --images`` resizes to it)."""
        return self.spec.image_size

    def dataset(self, task: str, split: str) -> Dataset:
        if task not in self.spec.tasks:
            raise ValueError(unknown_name("task", task, self.spec.tasks, where=" in this suite"))
        if task not in self._data:
            self._data[task] = task_data(self.spec, task)
        if split not in self._data[task]:
            raise KeyError(f"suite task {task!r} has splits train/val/test, not {split!r}")
        return TensorDataset(*self._data[task][split])


# ----------------------------------------------------------------------------- weights
def _batches(x: torch.Tensor, y: torch.Tensor, bs: int, steps: int, g: torch.Generator):
    for _ in range(steps):
        idx = torch.randint(0, len(y), (bs,), generator=g)
        yield x[idx], y[idx]


def _fit(params, loss_fn: Callable, x, y, steps: int, lr: float, bs: int, g: torch.Generator,
         progress: Callable[[str], None] | None = None, label: str = "") -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for i, (xb, yb) in enumerate(_batches(x, y, bs, steps, g)):
        loss = loss_fn(xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (i + 1) % max(steps // 4, 1) == 0:
            progress(f"{label} step {i + 1}/{steps} loss {loss.item():.3f}")


LOGIT_SCALE = 30.0  # heads act on normalised features, like CLIP's zero-shot heads


def build_suite(spec: SuiteSpec, out: Path, progress: Callable[[str], None] | None = print) -> None:
    """Pretrain the base, fit the heads and fine-tune one expert per task; write safetensors to ``out``."""
    say = progress or (lambda s: None)
    torch.manual_seed(spec.seed)
    g = torch.Generator().manual_seed(spec.seed)
    data = {t: task_data(spec, t) for t in spec.tasks}
    model = make_encoder(spec)
    # "Pretraining", CLIP-like: image features are aligned with one unit-norm class embedding per
    # class of every task (the stand-in for CLIP's text embeddings), on noised, lower-contrast
    # copies of the training images. Like CLIP's text embeddings, all class embeddings lie in a
    # narrow cone: a shared direction plus a learned class part of norm `head_spread`, so a
    # feature that matches one task's class is not a confident answer for another task.
    shared = F.normalize(torch.randn(spec.dim, generator=g), dim=0)
    parts = nn.ParameterList(nn.Parameter(torch.randn(len(class_names(t)), spec.dim, generator=g))
                             for t in spec.tasks)
    embed = lambda i: F.normalize(shared + spec.head_spread * F.normalize(parts[i], dim=-1), dim=-1)
    gen = torch.Generator().manual_seed(spec.seed + 1)

    def pre_loss(_xb, _yb):
        batches, labels = [], []
        for t in spec.tasks:
            x, y = data[t]["train"]
            idx = torch.randint(0, len(y), (spec.batch_size // 2,), generator=gen)
            batches.append(x[idx] * 0.8 + spec.pretrain_noise * torch.randn(x[idx].shape, generator=gen))
            labels.append(y[idx])
        # one encoder call for all tasks (the images are independent; 0.7x the time of one per task)
        feats = model(torch.cat(batches)).split([len(b) for b in batches])
        loss = 0.0
        for i, (f, y) in enumerate(zip(feats, labels)):
            loss = loss + F.cross_entropy(f @ embed(i).t() * LOGIT_SCALE, y)
        return loss

    dummy = torch.zeros(1)
    _fit(list(model.parameters()) + list(parts), pre_loss, dummy, dummy, spec.pretrain_steps, 1e-3,
         1, g, say, "pretrain")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # The frozen "zero-shot" heads: the class embeddings moved off by a random direction of norm
    # `head_shift`, times a logit scale. The features stay good and the heads misaligned, which
    # is why CLIP is weak zero-shot on some tasks; small task vectors then realign them.
    with torch.no_grad():
        hg = torch.Generator().manual_seed(spec.seed + 2)
        heads = {t: F.normalize(embed(i) + spec.head_shift * F.normalize(
                     torch.randn(embed(i).shape, generator=hg), dim=-1), dim=-1) * LOGIT_SCALE
                 for i, t in enumerate(spec.tasks)}
    save_state_dict(base_state, out / "base.safetensors")
    save_state_dict({f"{t}.weight": w for t, w in heads.items()}, out / "heads.safetensors")
    # Experts: fine-tune the whole encoder on one task with its head frozen.
    for t in spec.tasks:
        model.load_state_dict(base_state)
        model.train()
        x, y = data[t]["train"]
        w = heads[t]
        _fit(model.parameters(), lambda xb, yb: F.cross_entropy(model(xb) @ w.t(), yb), x, y,
             spec.expert_steps, spec.expert_lr, spec.batch_size, g, say, f"expert {t}")
        save_state_dict(model.state_dict(), out / f"expert_{t}.safetensors")
    (out / "spec.json").write_text(json.dumps({"version": SUITE_VERSION, **asdict(spec),
                                               "cpu_capability": cpu_capability()}, indent=1))


def make_encoder(spec: SuiteSpec) -> TinyViT:
    return TinyViT(image_size=spec.image_size, channels=3 if spec.colour else 1, dim=spec.dim,
                   depth=spec.depth, heads=spec.heads, out_dim=spec.dim)


def ensure_suite(spec: SuiteSpec, cache_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = print) -> Path:
    """The folder with the suite's weights, building it on first use."""
    folder = Path(cache_dir or default_cache_dir()) / "suites" / spec.key()
    if not (folder / "spec.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        if progress:
            progress(f"building suite {spec.key()} ({len(spec.tasks)} experts) in {folder}")
        build_pinned("vision", asdict(spec), folder, lambda: build_suite(spec, folder, progress), progress)
    return folder


class SuitePool(ModelPool):
    """The base, experts and heads of a built-in suite (trained on first use, then cached).

    Args:
        suite: preset name (``tiny``, ``demo``).
        tasks: a subset / order of the preset's tasks (default: all of them).
        seed: suite seed (data and weights).
        cache_dir: where trained weights are cached (default ``$ADAMERGE_CACHE`` or
            ``~/.cache/adamerge``).
        include: globs of parameter names to merge (default: all).
        exclude: globs of parameter names to keep at the base value.
        overrides: other spec fields to change, e.g. ``{"pretrain_noise": 0.3}`` (see ``SuiteSpec``).
        unseen_tasks: tasks of the suite evaluated with their heads but left out of the merge
            (default: none; ``tasks`` then defaults to the suite's other tasks).
    """

    def __init__(self, suite: str = "tiny", tasks: list[str] | None = None, seed: int = 0,
                 cache_dir: str | None = None, include: list[str] | None = None,
                 exclude: list[str] | None = None, overrides: dict[str, Any] | None = None,
                 unseen_tasks: list[str] | None = None) -> None:
        self.spec = get_spec(suite, **{**(overrides or {}), "seed": seed})
        unseen = list(unseen_tasks or [])
        self.tasks = list(tasks or [t for t in self.spec.tasks if t not in unseen])
        self.unseen_tasks = check_unseen(unseen, self.tasks, self.spec.tasks, where=f" in suite {suite!r}")
        for t in self.tasks:
            if t not in self.spec.tasks:
                raise ValueError(unknown_name("task", t, self.spec.tasks, where=f" in suite {suite!r}"))
        self.cache_dir, self.include, self.exclude = cache_dir, include, exclude

    def load(self) -> LoadedPool:
        folder = ensure_suite(self.spec, self.cache_dir)
        encoder = make_encoder(self.spec)
        base = load_state_dict(folder / "base.safetensors")
        encoder.load_state_dict(base)
        names = merged_parameter_names(encoder, self.include, self.exclude)
        experts = {t: load_state_dict(folder / f"expert_{t}.safetensors") for t in self.tasks}
        tv = TaskVectors.from_state_dicts(base, experts, names=names)
        head_state = load_state_dict(folder / "heads.safetensors")
        heads = linear_heads_from_state(head_state, self.tasks, source=str(folder / "heads.safetensors"))
        unseen = linear_heads_from_state(head_state, self.unseen_tasks, source=str(folder / "heads.safetensors"))
        loaders = {t: (lambda t=t: load_state_dict(folder / f"expert_{t}.safetensors")) for t in self.tasks}
        recipe = {"kind": "suite", "spec": {**asdict(self.spec), "tasks": list(self.spec.tasks)}}
        return LoadedPool(encoder, tv, heads, loaders, unseen_heads=unseen, encoder_recipe=recipe)
