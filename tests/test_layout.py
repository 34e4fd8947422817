"""The model's layout declared by its pool (``LoadedPool.layout``): read off the encoder for the
suites and open_clip, the same parts the methods used to find by name."""

from __future__ import annotations

import torch

from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods.adarank import masked_names
from adamerge.models.layout import Layout, infer_layout
from adamerge.suites.synthetic import SuitePool


def by_name(tv: TaskVectors) -> list[str]:
    """AdaRank's choice without a layout (names with attn / mlp, else every 2-D in a block)."""
    return masked_names(tv, "attn_mlp", None)


def test_suite_layout_names_its_blocks_mlps_and_attention():
    loaded = SuitePool("tiny").load()
    assert loaded.layout == Layout(("blocks.0", "blocks.1"),
                                   (("blocks.0.fc1", "blocks.0.fc2"), ("blocks.1.fc1", "blocks.1.fc2")),
                                   ("blocks.0.qkv.weight", "blocks.0.proj.weight", "blocks.1.qkv.weight",
                                    "blocks.1.proj.weight"))
    tv = loaded.task_vectors
    assert masked_names(tv, "attn_mlp", loaded.layout) == by_name(tv)


def test_open_clip_layout_gives_adarank_the_matrices_it_masked_by_name():
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    enc = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=32)
    layout = infer_layout(enc)
    block = "transformer.resblocks"
    assert layout.blocks == (f"{block}.0", f"{block}.1")
    assert layout.mlps == tuple((f"{block}.{i}.mlp.c_fc", f"{block}.{i}.mlp.c_proj") for i in range(2))
    assert layout.attention == tuple(f"{block}.{i}.attn.{w}" for i in range(2) for w in ("in_proj_weight", "out_proj.weight"))
    base = {k: v.clone() for k, v in enc.state_dict().items()}
    experts = {t: {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()} for t in ("a", "b")}
    tv = TaskVectors.from_state_dicts(base, experts, names=[n for n, _ in enc.named_parameters()])
    assert masked_names(tv, "attn_mlp", layout) == by_name(tv)
