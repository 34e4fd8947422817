"""``adamerge convert SRC OUT``: a CLIP image-encoder checkpoint in any layout
:mod:`adamerge.models.convert` reads -> an open_clip image-tower safetensors file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..io.checkpoints import save_state_dict
from ..models.convert import load_visual


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adamerge convert",
        description="Convert a CLIP image-encoder checkpoint (open_clip state dict, Hugging Face "
                    "CLIPVisionModel/CLIPModel weights, or a pickled task-vectors ImageEncoder) "
                    "into an open_clip image-tower safetensors file (keys of model.visual).")
    p.add_argument("src", help="input file (.safetensors, .bin/.pt/.pth)")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow files holding pickled Python objects (runs code from the file; "
                        "needed for the original task-vectors checkpoints). Only for files you trust.")
    p.add_argument("--model", default=None,
                   help="open_clip model name (e.g. ViT-B-32): check keys and shapes against its "
                        "image tower and fill a missing 'proj' from --pretrained")
    p.add_argument("--pretrained", default=None,
                   help="with --model: pretrained tag or file whose projection fills a missing 'proj'")
    return p


def convert_main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(list(argv))
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output must be a .safetensors file")
    state = load_visual(args.src, allow_pickle=args.allow_pickle)
    if args.model:
        from ..models.clip import complete_visual_state, create_clip
        model = create_clip(args.model, args.pretrained)
        state = complete_visual_state(state, model.visual.state_dict(), source=args.src)
    save_state_dict(state, out, metadata={"format": "open_clip.visual", "source": Path(args.src).name})
    print(f"wrote {out} ({len(state)} tensors, {sum(v.numel() for v in state.values()):,} values)",
          file=sys.stderr)
