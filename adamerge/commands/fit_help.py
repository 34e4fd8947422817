"""The short ``adamerge fit|validate|test --help``: the keys that matter, on one screen.

LightningCLI's own help lists every key of Lightning's Trainer and of the method (about 850
lines) and needs torch and Lightning imported (seconds); this one is plain text, printed without
importing either. ``--help-all`` prints LightningCLI's full help. ``tests/test_cli.py`` checks
that every key listed here exists in the full help with the default stated here.
"""

from __future__ import annotations

import textwrap

# (section title, [(key, default as the full help prints it or None, what it does)])
KEYS: tuple[tuple[str, tuple[tuple[str, str | None, str], ...]], ...] = (
    ("run", (
        ("--config FILE", None, "a YAML config (configs/*.yaml); repeat to layer configs"),
        ("--ckpt_path last|FILE", None, "fit: continue the run of default_root_dir (last) or a file; "
                                        "validate/test: evaluate it"),
        ("--start_over", "False", "fit over a run in the folder (deletes its checkpoints)"),
        ("--trainer.default_root_dir", "null", "the run's folder (null: the working directory)"),
        ("--trainer.max_steps", "500", "optimizer steps, each on one batch of every task"),
        ("--trainer.val_check_interval", None, "evaluate every N steps (adamerge: 500)"),
        ("--trainer.accelerator", "auto", "cpu, gpu, auto"),
        ("--trainer.devices", "auto", "how many devices (DDP past one)"),
        ("--trainer.precision", "null", "e.g. bf16-mixed"),
        ("--seed_everything", "True", "seed (an int) of the run"),
        ("--checkpoint.every_n_train_steps", "50", "steps between checkpoints (and last.ckpt)"),
    )),
    ("model (AdaMerging; another method: --model.class_path adamerge.methods.Surgery, its keys: "
     "--model.help CLASS)", (
        ("--model.pool", None, "base, experts, heads: a class_path (SuitePool, OpenCLIPPool, CheckpointPool)"),
        ("--model.granularity", "layerwise", "taskwise or layerwise (a coefficient per tensor)"),
        ("--model.prior", "0.3", "initial coefficient"),
        ("--model.clamp", "True", "coefficients clamped to [0, 1]"),
        ("--model.lr", "0.001", "Adam learning rate"),
        ("--model.trim", "null", "AdaMerging++: keep this fraction (e.g. 0.2)"),
        ("--model.objective", "entropy", "entropy, pseudo_label, cross_entropy"),
        ("--model.per_task_backward", "False", "back-propagate task by task (less memory)"),
        ("--model.task_vector_dtype", "null", "bfloat16/float16 task vectors"),
    )),
    ("data (MultiTaskDataModule)", (
        ("--data.source", None, "the datasets: a class_path (SuiteSource, HFSource, FolderSource)"),
        ("--data.batch_size", "16", "unlabeled images per task per step"),
        ("--data.eval_batch_size", "128", "batch of validate/test"),
        ("--data.adapt_split", "test", "split the coefficients adapt on"),
        ("--data.eval_split", "test", "split that validate/test report"),
        ("--data.num_workers", "0", "data-loading worker processes"),
    )),
)

USAGE = """usage: adamerge {command} --config FILE [--KEY VALUE ...]

{what} Settings come from YAML configs and --KEY VALUE overrides (a key
is a config path: model.lr is --model.lr). The keys that matter:
"""

WHAT = {
    "fit": "Learn merging coefficients on unlabeled test batches; checkpoints, TensorBoard logs and the\n"
           "coefficient heatmap go to --trainer.default_root_dir.",
    "validate": "Evaluate the merged model of a config or of a checkpoint (--ckpt_path) on the\n"
                "validation split; prints the per-task table and writes results.json.",
    "test": "Evaluate the merged model of a config or of a checkpoint (--ckpt_path) on the evaluation\n"
            "split; prints the per-task table and writes results.json.",
}

FOOTER = """
More: `adamerge {command} --help-all` lists every key (Lightning's Trainer and checkpoint included),
`--print_config` prints the resolved config, `--model.help CLASS` a method's keys, `--verbose`
Lightning's full console output. Example: adamerge fit --config configs/tiny.yaml
"""


def summary(command: str = "fit", width: int = 34, columns: int = 100) -> str:
    """The short help of ``adamerge COMMAND`` (``fit``, ``validate`` or ``test``), ``columns`` wide."""
    head, _, rest = USAGE.format(command=command, what=WHAT.get(command, WHAT["fit"])).partition("\n\n")
    lines = [head, "", textwrap.fill(" ".join(rest.split()), columns), ""]
    for title, keys in KEYS:
        lines += textwrap.wrap(f"{title}:", columns, subsequent_indent="  ")
        for key, default, what in keys:
            text = what + (f" (default: {default})" if default is not None else "")
            wrapped = textwrap.wrap(text, columns - width - 2)
            first = f"  {key:<{width}}" if len(key) < width else f"  {key}\n  {'':<{width}}"
            lines.append(first + wrapped[0])
            lines += [f"  {'':<{width}}{more}" for more in wrapped[1:]]
        lines.append("")
    return "\n".join(lines) + FOOTER.format(command=command)


__all__ = ["KEYS", "summary"]
