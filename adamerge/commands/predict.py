"""``adamerge predict``: answer one task's images with a learned merge, as ``predictions.csv``.

The config builds the run's module (pool, heads, method) exactly as ``fit`` did; the checkpoint's
learned tensors are loaded with the same checks as a resume (method, pool fingerprint, shapes).
Images come from a split of the config's data source (``--split``) or from a folder of image
files (``--images``, prepared as the data source prepares its images). One merge, then batches of
forward passes; the CSV is written atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.datamodule import IMAGE_EXTENSIONS, image_of, label_of
from ..errors import unknown_name
from ..io.checkpoints import atomic_write

COLUMNS = ("index", "file", "prediction", "class_name", "probability", "label")


class ImageFiles(Dataset):
    """Every image file under ``folder`` (recursively, sorted): ``transform(PIL image)`` when a
    transform is given (open_clip's preprocessing for CLIP configs), else ``[C, S, S]`` floats in
    [0, 1] (``channels`` 3: RGB, 1: grey), as the folder and built-in sources load images."""

    def __init__(self, folder: str | Path, image_size: int | None, channels: int = 3,
                 transform=None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: --images must be a folder of image files")
        self.files = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise ValueError(f"{self.folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        if transform is None and image_size is None:
            raise ValueError("--images: give --image-size (the data source has no image_size)")
        self.image_size, self.channels, self.transform = image_size, channels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor
        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB")
                if self.transform is not None:
                    return self.transform(im)
                im = im.convert("L" if self.channels == 1 else "RGB")
                im = im.resize((self.image_size, self.image_size), Image.BILINEAR)
        except Exception as exc:  # PIL raises many types for broken files
            raise ValueError(f"{self.files[i]}: cannot decode image ({exc})") from exc
        return pil_to_tensor(im).float().div_(255)



@torch.no_grad()
def predict(model, dataset: Dataset, task: str, batch_size: int = 128,
            class_names: Sequence[str] | None = None, files: Sequence[str] | None = None,
            progress: bool = True) -> list[dict]:
    """One row per image: index, file, predicted class, its name, its probability, the label.

    ``model`` is a learned module (:class:`adamerge.methods.AdaMerging` or a subclass) with its
    learned tensors set: the merge is done once and every batch goes through ``task_logits`` (so
    per-task modules, tinted heads and WEMoE's routing apply as in training and evaluation); or
    an :class:`adamerge.exported.ExportedModel` (an export folder, no pool needed).
    """
    from ..exported import ExportedModel
    exported = isinstance(model, ExportedModel)
    tasks = model.tasks if exported else model.eval_tasks
    if task not in tasks:
        raise ValueError(unknown_name("task", task, tasks))
    model.eval()
    if exported:
        device = next(model.encoder.parameters()).device
        logits_of = lambda x: model(x, task)
    else:  # one merge for every batch
        device = model.merged.coefficients.device
        params = {k: v.detach() for k, v in model.merged.merged_parameters().items()}
        logits_of = lambda x: model.task_logits({task: x}, params)[task]
    rows, index = [], 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=lambda items: items)
    for items in tqdm(loader, desc=f"predict {task}", unit="batch", disable=not progress, file=sys.stderr):
        x = torch.stack([image_of(item) for item in items]).to(device)
        probs = logits_of(x).float().softmax(-1)
        p, y = probs.max(-1)
        for item, pi, yi in zip(items, p.tolist(), y.tolist()):
            label = label_of(item)
            rows.append({"index": index, "file": files[index] if files else "", "prediction": yi,
                         "class_name": class_names[yi] if class_names and yi < len(class_names) else "",
                         "probability": f"{pi:.6f}", "label": "" if label is None else label})
            index += 1
    return rows


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write the predictions atomically (a reader never sees half a file)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(buf.getvalue())
    return Path(path)


def image_files(folder: str, encoder, clip_model: str | None = None, pretrained: str | None = None,
                image_size: int | None = None) -> ImageFiles:
    """The folder's images prepared as the run's data source prepares its own: open_clip's
    preprocessing for a CLIP model (``clip_model``), else a resize to ``image_size`` with the
    encoder's input channels."""
    from torch import nn
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    channels = convs[0].in_channels if convs else 3
    if clip_model is not None and image_size is None:
        from ..data.transforms import clip_transform
        return ImageFiles(folder, None, channels, clip_transform(clip_model, pretrained))
    return ImageFiles(folder, image_size, channels)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adamerge predict",
        description="Predict one task's images with the merged model of a checkpoint and write "
                    "predictions.csv (index, file, prediction, class_name, probability, label).")
    p.add_argument("--config", action="append", help="the run's config file(s), as given to fit")
    p.add_argument("--export", default=None,
                   help="an `adamerge export` folder to predict with instead of --config/--ckpt_path: "
                        "merged weights and heads only, no pool file is read (needs --images)")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", default=None,
                   help="checkpoint of the run (its method and pool must be the config's); without it "
                        "the method's starting point is used (e.g. coefficients at their prior: task "
                        "arithmetic with scaling = prior for granularity taskwise)")
    p.add_argument("--task", required=True, help="which task's head answers (a merged or an unseen task)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--split", help="a split of the config's data source (labels, when present, go to the CSV)")
    src.add_argument("--images", help="a folder of image files (recursively), prepared as the config's "
                                      "data source prepares images (open_clip preprocessing for CLIP)")
    p.add_argument("--image-size", type=int, default=None,
                   help="--images: resize to this square size instead (pixel values in [0, 1], no "
                        "normalisation; default: the data source's image_size / preprocessing)")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.epilog = "Other options are config overrides as for fit, e.g. --model.pool.init_args.head_cache DIR."
    return p


def predict_main(argv: Sequence[str]) -> None:
    args, overrides = build_parser().parse_known_args(list(argv))
    if bool(args.config) == bool(args.export):
        raise ValueError("give either --config (with --ckpt_path) or --export FOLDER")
    files, names = None, None
    if args.export:
        if args.split or overrides or args.ckpt_path:
            raise ValueError("--export predicts with the exported files alone: give --images "
                             f"(not {'--split' if args.split else '--ckpt_path' if args.ckpt_path else overrides[0]})")
        from ..exported import ExportedModel
        model = ExportedModel.from_folder(args.export)
        recipe = model.manifest.get("encoder") or {}
        spec = recipe.get("spec", {})
        dataset = image_files(args.images, model.encoder, recipe.get("model") if recipe.get("kind") == "open_clip" else None,
                              recipe.get("pretrained"), args.image_size or spec.get("image_size"))
        files = [str(f) for f in dataset.files]
    else:
        from .export import build_from_config
        model, dm = build_from_config(args.config, overrides)
        if args.ckpt_path:
            model.load_coefficients(args.ckpt_path)
        if args.task not in model.eval_tasks:
            raise ValueError(unknown_name("task", args.task, model.eval_tasks))
        if args.split:
            dm.select_tasks(model.task_names, unseen=model.unseen_tasks)
            dataset = dm.dataset(args.task, args.split)
            samples = getattr(dataset, "samples", None)
            if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
                files = [str(s[0]) for s in samples]
        else:
            source = dm.source
            clip_model = getattr(source, "model", None)
            dataset = image_files(args.images, model.merged.module,
                                  clip_model if isinstance(clip_model, str) else None,
                                  getattr(source, "pretrained", None),
                                  args.image_size or (None if isinstance(clip_model, str) else getattr(source, "image_size", None)))
            files = [str(f) for f in dataset.files]
        names = getattr(dataset, "classes", None)
    rows = predict(model, dataset, args.task, args.batch_size, names, files, args.progress)
    path = write_csv(rows, args.out)
    print(f"predictions: {path} ({len(rows)} images, task {args.task})", file=sys.stderr)
