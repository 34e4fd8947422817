"""``adamerge convert``: CLIP image-encoder checkpoints in any layout :mod:`adamerge.models.convert`
reads -> open_clip image-tower safetensors files.

* ``adamerge convert SRC OUT.safetensors``: one file;
* ``adamerge convert --fusionbench DIR --out OUTDIR``: every FusionBench fine-tune downloaded under
  ``DIR`` (Hugging Face ``tanganke/clip-vit-base-patch32_<task>`` repos) -> ``OUTDIR/<task>.safetensors``,
  then an ``experts:`` YAML block for a config on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # torch is imported when a conversion runs, not for --help
    import torch

    from ..io.checkpoints import StateDict

EPILOG = """examples:
  adamerge convert finetuned.pt experts/ViT-B-32/mnist.safetensors --allow-pickle
  adamerge convert --fusionbench fusionbench/ --out experts/ViT-B-32 --model ViT-B-32 --pretrained openai

--fusionbench DIR: a folder of downloaded FusionBench fine-tunes, one Hugging Face repo per task
(tanganke/clip-vit-base-patch32_<task>), each a sub-folder named <model>_<task> (from
`hf download tanganke/clip-vit-base-patch32_mnist --local-dir DIR/clip-vit-base-patch32_mnist`) or in
the hub cache layout models--tanganke--clip-vit-base-patch32_<task>/snapshots/<hash>/ (DIR may be the
hub cache, ~/.cache/huggingface/hub). Writes OUTDIR/<task>.safetensors per task and prints the
`experts:` block of a config. Without a network: docs/offline.md.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adamerge convert",
        usage="adamerge convert SRC OUT.safetensors [options]\n"
              "       adamerge convert --fusionbench DIR --out OUTDIR [options]",
        description="Convert CLIP image-encoder checkpoints (open_clip state dict, Hugging Face\n"
                    "CLIPVisionModel/CLIPModel weights, or a pickled task-vectors ImageEncoder) into\n"
                    "open_clip image-tower safetensors files (keys of model.visual): one file, or every\n"
                    "FusionBench fine-tune of a folder (--fusionbench).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", help="input file (.safetensors, .bin/.pt/.pth)")
    p.add_argument("out", nargs="?", help="output .safetensors file")
    p.add_argument("--fusionbench", metavar="DIR", default=None,
                   help="convert every FusionBench snapshot folder under DIR (instead of SRC OUT)")
    p.add_argument("--out", dest="out_dir", metavar="OUTDIR", default=None,
                   help="with --fusionbench: output folder of <task>.safetensors")
    p.add_argument("--prefix", default=None,
                   help="with --fusionbench: only repos of this model (e.g. clip-vit-base-patch32)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow files holding pickled Python objects (runs code from the file; "
                        "needed for the original task-vectors checkpoints). Only for files you trust.")
    p.add_argument("--model", default=None,
                   help="open_clip model name (e.g. ViT-B-32): check keys and shapes against its "
                        "image tower and fill a missing 'proj' from --pretrained")
    p.add_argument("--pretrained", default=None,
                   help="with --model: pretrained tag or whole-CLIP file whose projection fills a "
                        "missing 'proj' (a local file works with no network)")
    return p


def convert_file(src: str | Path, out: str | Path, allow_pickle: bool = False,
                 base: Mapping[str, torch.Tensor] | None = None, source: str | None = None) -> StateDict:
    """Convert one checkpoint to an open_clip image-tower safetensors file; returns the state.

    Args:
        src: input checkpoint (any layout :func:`adamerge.models.convert.load_visual` reads).
        out: output ``.safetensors`` file.
        allow_pickle: allow pickled objects in ``src``.
        base: the base model's image-tower state: keys and shapes are checked against it and a
            missing ``proj`` comes from it.
        source: the name recorded in the file's metadata (default: ``src``'s file name).
    """
    from ..io.checkpoints import save_state_dict
    from ..models.convert import load_visual
    state = load_visual(src, allow_pickle=allow_pickle)
    if base is not None:
        from ..models.clip import complete_visual_state
        state = complete_visual_state(state, base, source=str(src))
    save_state_dict(state, out, metadata={"format": "open_clip.visual", "source": source or Path(src).name})
    return state


def _base(args: argparse.Namespace) -> dict[str, torch.Tensor] | None:
    if not args.model:
        return None
    from ..models.clip import create_clip
    return {k: v.detach() for k, v in create_clip(args.model, args.pretrained).visual.state_dict().items()}


def convert_fusionbench(args: argparse.Namespace) -> dict[str, Path]:
    """``--fusionbench DIR --out OUTDIR``: every snapshot -> ``OUTDIR/<task>.safetensors``."""
    import yaml

    from ..models.convert import find_fusionbench_experts
    experts, notes = find_fusionbench_experts(args.fusionbench, prefix=args.prefix)
    for note in notes:
        print(f"skipped {note}", file=sys.stderr)
    out_dir = Path(args.out_dir)
    base = _base(args)
    written: dict[str, Path] = {}
    for i, (task, src) in enumerate(experts.items(), 1):
        out = out_dir / f"{task}.safetensors"
        repo = next((p.name for p in src.parents if p.name.startswith("models--")), src.parent.name)
        state = convert_file(src, out, args.allow_pickle, base, source=f"{repo}/{src.name}")
        print(f"[{i}/{len(experts)}] {task}: {src} -> {out} ({len(state)} tensors)", file=sys.stderr)
        written[task] = out
    print(f"# {len(written)} experts converted from {args.fusionbench}; paste under model.pool.init_args")
    print(yaml.safe_dump({"experts": {t: str(p) for t, p in written.items()}}, sort_keys=False), end="")
    return written


def convert_main(argv: Sequence[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.fusionbench is not None:
        if args.src or args.out or not args.out_dir:
            parser.error("--fusionbench DIR takes --out OUTDIR and no SRC OUT")
        convert_fusionbench(args)
        return
    if not (args.src and args.out) or args.out_dir or args.prefix:
        parser.error("give SRC OUT.safetensors, or --fusionbench DIR --out OUTDIR")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output must be a .safetensors file")
    if not Path(args.src).expanduser().is_file():  # before --pretrained may download
        raise FileNotFoundError(f"{args.src}: no such file")
    state = convert_file(args.src, out, args.allow_pickle, _base(args))
    print(f"wrote {out} ({len(state)} tensors, {sum(v.numel() for v in state.values()):,} values)",
          file=sys.stderr)
