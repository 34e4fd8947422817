"""``adamerge finetune``: make an expert by fine-tuning CLIP's image tower on one task.

The task-vectors recipe: the image tower is trained with cross-entropy through the task's frozen
zero-shot head (so the head, and the text tower, stay those of the pretrained model); AdamW
(lr 1e-5, weight decay 0.1), batch 128, cosine schedule with 500 linear warm-up steps, gradient
norm clipped to 1.0, about 2,000 steps. The result is the image tower's state dict as safetensors
(open_clip ``model.visual`` keys), ready to be an expert of ``OpenCLIPPool``.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

from ..io.checkpoints import save_state_dict

log = logging.getLogger(__name__)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * base_lr


def _forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adamerge finetune",
        description="Fine-tune the image tower of an open_clip model on one task through its frozen "
                    "zero-shot head (task-vectors recipe) and save it as safetensors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--pretrained", default="openai", help="pretrained tag or whole-model checkpoint file")
    p.add_argument("--task", required=True, help="task name from the registry (or --tasks-file)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--tasks-file", default=None, help="YAML file of extra / overriding tasks")
    p.add_argument("--data", default=None,
                   help="local dataset of the task (save_to_disk folder or image folder "
                        "<data>/<split>/<class>/<image>) instead of its Hugging Face id")
    p.add_argument("--split", default="train", help="split to train on")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-5, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=500, help="linear warm-up steps (cosine after)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--no-augment", action="store_true",
                   help="train on the eval transform instead of open_clip's train transform")
    p.add_argument("--num-workers", type=int, default=4, help="data-loading processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast the forward pass to bfloat16 (weights stay float32)")
    p.add_argument("--head-cache", default=None, help="zero-shot head cache folder")
    p.add_argument("--cache-dir", default=None, help="open_clip download cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps")
    return p


def finetune(args: argparse.Namespace) -> Path:
    """Run the recipe described by ``args`` (see :func:`build_parser`); returns the output file."""
    from ..data.transforms import clip_transform
    from ..models.clip import create_clip, zero_shot_heads
    from ..data.hf import HFSource, TransformedImages
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output must be a .safetensors file")
    if args.steps < 1 or args.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {args.steps}, {args.batch_size}")
    torch.manual_seed(args.seed)
    source = HFSource([args.task], model=args.model, pretrained=args.pretrained,
                      tasks_file=args.tasks_file, paths={args.task: args.data} if args.data else None,
                      image_cache="none")
    spec = source.specs[args.task]
    clip = create_clip(args.model, args.pretrained, cache_dir=args.cache_dir)
    head = zero_shot_heads(clip, args.model, {args.task: spec}, args.head_cache)[args.task]
    visual = clip.visual
    del clip
    device = torch.device(args.device)
    visual.to(device).train().requires_grad_(True)
    head.to(device)

    raw = source.raw(args.task, args.split)
    data = TransformedImages(raw, clip_transform(args.model, args.pretrained, train=not args.no_augment))
    if len(data) == 0:
        raise ValueError(f"task {args.task!r}: split {args.split!r} is empty")
    g = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=RandomSampler(data, generator=g),
                        num_workers=args.num_workers, drop_last=len(data) >= args.batch_size,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    opt = torch.optim.AdamW([p for p in visual.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=args.weight_decay)
    batches = _forever(loader)
    start = time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, args.lr, args.warmup, args.steps)
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = head(visual(x))
        loss = F.cross_entropy(logits.float(), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(visual.parameters(), args.grad_clip)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            acc = (logits.argmax(-1) == y).float().mean().item() * 100
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} batch acc {acc:.1f}% "
                  f"lr {opt.param_groups[0]['lr']:.2e} ({time.time() - start:.0f}s)", file=sys.stderr)
    state = {k: v.detach().cpu() for k, v in visual.state_dict().items()}
    save_state_dict(state, out, metadata={"format": "open_clip.visual", "model": args.model,
                                          "pretrained": str(args.pretrained), "task": args.task,
                                          "steps": str(args.steps)})
    print(f"wrote {out}", file=sys.stderr)
    return out


def finetune_main(argv: Sequence[str]) -> None:
    finetune(build_parser().parse_args(list(argv)))
