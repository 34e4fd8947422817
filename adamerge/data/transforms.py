"""open_clip's image preprocessing for a model, built from its configs alone (nothing is created
or downloaded): what :class:`adamerge.data.HFSource` applies and what its image cache keys hash."""

from __future__ import annotations

from pathlib import Path


def is_file(pretrained: str | None) -> bool:
    """Whether ``pretrained`` names a checkpoint file (rather than an open_clip pretrained tag)."""
    return pretrained is not None and (Path(pretrained).expanduser().is_file()
                                       or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))


def clip_transform(model: str, pretrained: str | None = None, train: bool = False):
    """open_clip's preprocessing for ``model`` (+ the pretrained tag's mean/std/interpolation).

    Built from the configs alone, without creating (or downloading) the model.
    """
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model!r}")
    pp = merge_preprocess_dict(PreprocessCfg(), cfg.get("preprocess_cfg", {}))
    if pretrained and not is_file(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag_cfg:
            raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {model!r}; tags: "
                             f"{open_clip.list_pretrained_tags_by_model(model)}")
        pp = merge_preprocess_dict(pp, tag_cfg)
    pp["size"] = cfg["vision_cfg"].get("image_size", pp["size"])
    return image_transform_v2(PreprocessCfg(**pp), is_train=train)


# ------------------------------------------------------------------------------- heads
def preprocess_config(model: str, pretrained: str | None = None) -> dict:
    """The preprocessing settings of :func:`clip_transform` as a plain dict (for cache keys)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    cfg = open_clip.get_model_config(model) or {}
    pp = merge_preprocess_dict(PreprocessCfg(), cfg.get("preprocess_cfg", {}))
    if pretrained and not is_file(pretrained):
        pp = merge_preprocess_dict(pp, open_clip.get_pretrained_cfg(model, pretrained) or {})
    pp["size"] = cfg.get("vision_cfg", {}).get("image_size", pp["size"])
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}
