"""Write configs/clip-<model>_<N>tasks_<method>.yaml (the shipped CLIP benchmark configs).

Run from the repository root after changing the template: python scripts/make_clip_configs.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

from adamerge.methods import AdaMerging, registry

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"vit-b-32": "ViT-B-32", "vit-l-14": "ViT-L-14"}
SUITES = yaml.safe_load((ROOT / "adamerge" / "data" / "tasks.yaml").read_text())["suites"]
COUNTS = {8: "tall8", 14: "tall14", 20: "tall20"}

TEMPLATE = """\
# {title}
# {method_doc}; {n} tasks, CLIP {model} (open_clip, `{pretrained}` weights).
# Paper defaults (Yang et al., ICLR 2024): prior 0.3, Adam lr 1e-3, 500 steps, 16 unlabeled test
# images per task per step, coefficients clamped to [0, 1].
#
#   adamerge fit  --config configs/{name} --trainer.default_root_dir runs/{stem}
#   adamerge test --config configs/{name} --ckpt_path runs/{stem}/checkpoints/last.ckpt
#   adamerge export --config configs/{name} --ckpt_path runs/{stem}/checkpoints/last.ckpt --out runs/{stem}/export
#
# Downloads on first use: the open_clip `{pretrained}` weights (open_clip's cache) and the test splits
# of the Hugging Face datasets named in adamerge/data/tasks.yaml (the datasets cache); zero-shot heads and
# decoded images are cached under $ADAMERGE_CACHE (default ~/.cache/adamerge).
# Experts: one fine-tuned image encoder per task under experts/{model}/<task>.safetensors, from
# `adamerge finetune`, `adamerge convert` (task-vectors pickles, Hugging Face CLIPVisionModel fine-tunes),
# or any open_clip image-tower / CLIP state dict (converted on the fly). Edit the paths to yours.
seed_everything: 0
model:
  pool:
    class_path: adamerge.models.OpenCLIPPool
    init_args:
      model: {model}
      pretrained: {pretrained}
      experts:                 # task -> fine-tuned image encoder (same order as data.source.tasks)
{experts}
      tasks_file: null         # YAML of extra / overriding tasks (see adamerge/data/tasks.yaml)
      allow_pickle: false      # true only for trusted pickled checkpoints; better: adamerge convert
      text_device: cpu         # where the text tower runs once to build the zero-shot heads (cached)
  granularity: {granularity}
  prior: 0.3                   # initial coefficient
  clamp: true                  # coefficients clamped to [0, 1]
  lr: 0.001                    # Adam learning rate
  trim: {trim:<23}# {trim_comment}
  per_task_backward: {ptb:<10}# true: back-propagate task by task (activation memory of one task)
  task_vector_dtype: null      # bfloat16 halves task-vector memory ({tv_note})
data:
  source:
    class_path: adamerge.data.HFSource
    init_args:
      tasks: [{tasks}]
      model: {model}
      pretrained: {pretrained}
      paths: {{}}                # task -> local save_to_disk folder or image folder, instead of the HF id
      image_cache: disk        # decode every image once (uint8 after resize/crop) under $ADAMERGE_CACHE/images
      decode_threads: 8
  batch_size: 16               # unlabeled test images per task per step (paper: 16)
  eval_batch_size: 256
  adapt_split: test            # the paper adapts on the test images themselves
  eval_split: test
  num_workers: 8
trainer:
  max_steps: 500               # paper: 500
  val_check_interval: 500      # evaluate once, at the end
  check_val_every_n_epoch: null
  log_every_n_steps: 10
  accelerator: auto
  devices: 1
  precision: 32-true           # bf16-mixed is faster on recent GPUs (not the paper's setting)
checkpoint:
  every_n_train_steps: 50      # coefficient checkpoints (kilobytes); resume with --ckpt_path last
  save_last: true
  save_top_k: -1
"""


def adamerging_methods() -> dict[str, tuple[str, float | None, str]]:
    """Config suffix -> (granularity, trim, description) of every AdaMerging variant of the registry."""
    out = {}
    for name in registry.names("learned"):
        method = registry.get(name)
        if method.build is AdaMerging:
            hp = method.defaults()
            out[name.removeprefix("adamerging_")] = (hp["granularity"], hp["trim"], method.description)
    return out


def main() -> None:
    for key, model in MODELS.items():
        for n, suite in COUNTS.items():
            tasks = SUITES[suite]
            for method, (granularity, trim, doc) in adamerging_methods().items():
                name = f"clip-{key}_{n}tasks_{method}.yaml"
                experts = "\n".join(f"        {t}: experts/{model}/{t}.safetensors" for t in tasks)
                big = key == "vit-l-14" or n > 8
                text = TEMPLATE.format(
                    title=name, method_doc=doc, n=n, model=model, pretrained="openai", name=name,
                    stem=name.removesuffix(".yaml"), experts=experts, granularity=granularity,
                    trim="null" if trim is None else str(trim),
                    trim_comment="AdaMerging++: keep the top 20% of each task vector (TIES)"
                    if trim else "AdaMerging++ sets 0.2",
                    ptb="true" if big else "false",
                    tv_note=f"{n} x the image tower in float32 otherwise", tasks=", ".join(tasks))
                (ROOT / "configs" / name).write_text(text)
                print("wrote", name)


if __name__ == "__main__":
    main()
