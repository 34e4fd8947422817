"""Image corruptions of the AdaMerging paper's robustness protocol, on tensors, deterministic.

The seven types of its robustness table (motion blur, impulse noise, Gaussian noise, pixelate,
spatter, contrast, JPEG compression) at severities 1-5, after Hendrycks & Dietterich (ImageNet-C,
ICLR 2019) whose per-severity constants are used where they carry over to any image size (noise
levels, contrast factors, JPEG qualities, pixelation factors); blur lengths scale with the image
size (ImageNet-C's are for 224 px). Spatter is a simplified version (dark, blurred liquid blobs
whose coverage grows with severity), not ImageNet-C's two-mode recipe. Every random draw comes
from a generator seeded by ``(seed, image index)``: an image is corrupted the same way in every
epoch, run and process.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# ImageNet-C constants per severity 1..5
GAUSSIAN_STD = (0.08, 0.12, 0.18, 0.26, 0.38)
IMPULSE_AMOUNT = (0.03, 0.06, 0.09, 0.17, 0.27)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
JPEG_QUALITY = (25, 18, 15, 10, 7)
MOTION_LENGTH_224 = (10, 15, 15, 15, 20)  # blur radius in pixels at 224 px (sigma grows too)
SPATTER_COVERAGE = (0.06, 0.12, 0.2, 0.3, 0.42)


def _gaussian_noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=g) * GAUSSIAN_STD[s - 1]


def _impulse_noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=g)
    amount = IMPULSE_AMOUNT[s - 1]
    out = x.clone()
    out[u < amount / 2] = 0.0
    out[u > 1 - amount / 2] = 1.0
    return out


def _contrast(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * CONTRAST[s - 1] + mean


def _pixelate(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = (max(1, int(h * PIXELATE[s - 1])), max(1, int(w * PIXELATE[s - 1])))
    down = F.interpolate(x[None], size=small, mode="area")
    return F.interpolate(down, size=(h, w), mode="nearest-exact")[0]


def _jpeg(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    from torchvision.io import decode_jpeg, encode_jpeg
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    grey = u8.shape[0] == 1
    data = encode_jpeg(u8, quality=JPEG_QUALITY[s - 1])
    out = decode_jpeg(data).float() / 255
    return out[:1] if grey else out


def _motion_blur(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    h = x.shape[-1]
    length = max(2, round(MOTION_LENGTH_224[s - 1] * h / 224 * (1 + 0.25 * (s - 1))))
    angle = float(torch.rand((), generator=g)) * math.pi
    size = 2 * length + 1
    kernel = torch.zeros(size, size)
    for t in torch.linspace(0, length, 4 * length + 1):  # a one-sided streak, as a moving camera
        r, c = length - t * math.sin(angle), length + t * math.cos(angle)
        kernel[int(round(float(r))), int(round(float(c)))] = 1.0
    kernel /= kernel.sum()
    weight = kernel.expand(x.shape[0], 1, size, size)
    padded = F.pad(x[None], (length,) * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=x.shape[0])[0]


def _spatter(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    noise = torch.randn(1, 1, h, w, generator=g)
    k = max(3, (min(h, w) // 8) | 1)
    blur = torch.ones(1, 1, k, k) / (k * k)
    field = F.conv2d(F.pad(noise, (k // 2,) * 4, mode="reflect"), blur)[0, 0]
    threshold = torch.quantile(field.flatten(), 1 - SPATTER_COVERAGE[s - 1])
    mask = ((field - threshold) * 8).sigmoid()  # soft-edged blobs covering the given fraction
    liquid = torch.tensor([0.25, 0.2, 0.15])[: x.shape[0], None, None] if x.shape[0] == 3 else \
        torch.full((x.shape[0], 1, 1), 0.2)
    return x * (1 - 0.8 * mask) + liquid * 0.8 * mask


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "motion_blur": _motion_blur, "impulse_noise": _impulse_noise, "gaussian_noise": _gaussian_noise,
    "pixelate": _pixelate, "spatter": _spatter, "contrast": _contrast, "jpeg_compression": _jpeg,
}


def corrupt(image: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """``image`` (``[C, H, W]``, values in [0, 1]) with corruption ``name`` at ``severity`` 1-5,
    clipped to [0, 1]; ``seed`` fixes every random draw (use the image's index)."""
    if name not in CORRUPTIONS:
        from ..errors import unknown_name
        raise ValueError(unknown_name("corruption", name, list(CORRUPTIONS)))
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be 1-5, got {severity}")
    if image.dim() != 3:
        raise ValueError(f"corrupt expects one [C, H, W] image, got shape {tuple(image.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    return CORRUPTIONS[name](image.float(), int(severity), g).clamp_(0.0, 1.0)


class CorruptedDataset(Dataset):
    """A dataset whose images are corrupted (deterministically per index); labels pass through.

    Images that a dataset normalises (``mean``/``std`` attributes, as adamerge's CLIP image
    caches have) are brought back to [0, 1] first and normalised again after.

    A corrupted image depends only on the clean one and its index, so the first ``cache_mb`` MiB
    of them are kept (the adaptation stream draws each test image many times: on the demo suite a
    step's 96 corruptions took 0.4 s, 5x the step). ``cache_mb=0`` recomputes every access (for a
    wrapped dataset whose images change between accesses, e.g. random augmentation).
    """

    def __init__(self, dataset: Dataset, name: str, severity: int, seed: int = 0,
                 cache_mb: float = 256.0) -> None:
        corrupt(torch.zeros(1, 8, 8), name, severity)  # validate the name and severity now
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.dataset, self.name, self.severity, self.seed = dataset, name, severity, seed
        self.mean, self.std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        self.classes = getattr(dataset, "classes", None)
        self.cache_bytes, self._cached_bytes = int(cache_mb * 2 ** 20), 0
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        out = self._cache.get(i)
        if out is None:
            x = item[0] if isinstance(item, (tuple, list)) else item
            normalized = isinstance(self.mean, torch.Tensor) and isinstance(self.std, torch.Tensor)
            clean = x * self.std + self.mean if normalized else x
            out = corrupt(clean, self.name, self.severity, seed=self.seed * 1_000_003 + i)
            if normalized:
                out = (out - self.mean) / self.std
            size = out.numel() * out.element_size()
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[i], self._cached_bytes = out, self._cached_bytes + size
        return (out, *item[1:]) if isinstance(item, (tuple, list)) else out
