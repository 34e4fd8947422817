"""``adamerge eval``: a merged language model through EleutherAI's lm-evaluation-harness
(``lm_eval``, the tool MergeBench scores its merged models with).

Two sources of the same model:

* ``--export DIR``: the Hugging Face folder ``adamerge export`` writes for a language-model pool
  (``DIR/hf``, or that folder itself), loaded with ``from_pretrained``;
* ``--config CONFIG --ckpt_path CKPT``: the live merged model. The run's module is built from its
  config as ``test`` builds it, the checkpoint's coefficients are loaded (with the resume checks),
  and the merged weights are written into the pool's own base model in memory: for LoRA experts
  ``W0 + sum_k lambda_k s_k B_k A_k`` is formed per weight and nothing is written to disk.

Either model is handed to lm_eval as an instance (``HFLM(pretrained=model)``), so both paths run
the same lm_eval code on the same weights. ``lm_eval`` is imported only when the command runs
(``pip install 'adamerge[eval]'``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import unknown_name

EXTRA = "pip install 'adamerge[eval]'"
DEFAULT_DEVICE = "auto"  # cuda when there is one, else cpu


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adamerge eval",
        description="Score a merged language model with EleutherAI's lm-evaluation-harness (lm_eval): an "
                    "exported Hugging Face folder (--export) or the live merged model of a run "
                    "(--config with --ckpt_path; LoRA experts are merged in memory, nothing is written). "
                    f"Needs {EXTRA}.")
    p.add_argument("--export", default=None, help="an `adamerge export` folder of a language-model run "
                                                   "(its hf/ subfolder is the model), or that hf/ folder")
    p.add_argument("--config", action="append", default=None,
                   help="the run's config file(s), as given to `adamerge fit` (with --ckpt_path)")
    p.add_argument("--ckpt_path", "--ckpt-path", dest="ckpt_path", default=None,
                   help="the run's checkpoint (e.g. RUN/checkpoints/last.ckpt); its method and pool must be the config's")
    p.add_argument("--tasks", required=True,
                   help="lm_eval task, group or tag names, comma separated (e.g. gsm8k_cot,ifeval)")
    p.add_argument("--include_path", "--include-path", dest="include_path", default=None,
                   help="a folder of custom lm_eval task YAMLs (passed to lm_eval's TaskManager)")
    p.add_argument("--num_fewshot", "--num-fewshot", dest="num_fewshot", type=int, default=None,
                   help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--limit", type=_limit, default=None,
                   help="examples per task (a fraction when below 1); for quick checks only")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=_batch_size, default=1,
                   help="lm_eval batch size, or 'auto' (default 1, lm_eval's)")
    p.add_argument("--device", default=DEFAULT_DEVICE, help="torch device of the model (default: cuda if available, else cpu)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id (default: --export: the hf/ folder when it has one; "
                        "--config: the run's data source's, else the pool's base)")
    p.add_argument("--output", default=None, help="write lm_eval's results as JSON to this file")
    p.add_argument("--bootstrap_iters", "--bootstrap-iters", dest="bootstrap_iters", type=int, default=100000,
                   help="bootstrap draws for the stderr of metrics without a closed form (lm_eval's default "
                        "100000; 0: no stderr)")
    p.add_argument("--confirm_run_unsafe_code", "--confirm-run-unsafe-code", dest="unsafe_code", action="store_true",
                   help="let lm_eval run tasks that execute generated code (e.g. humaneval_plus, mbpp_plus)")
    p.epilog = "Other options (--config only) are config overrides as for fit, e.g. --model.pool.init_args.base DIR."
    return p


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be > 0, got {text!r}")
    return int(value) if value >= 1 and value.is_integer() else value


def _batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch_size must be a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--batch_size must be >= 1, got {value}")
    return value


# ------------------------------------------------------------------------- inputs
def hf_folder(export: str | Path) -> Path:
    """The Hugging Face model folder of an export (``DIR/hf``, or ``DIR`` itself)."""
    folder = Path(export).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: export folder does not exist")
    for candidate in (folder / "hf", folder):
        if (candidate / "config.json").is_file():
            return candidate
    if (folder / "hf").is_dir():  # sequence classifiers: one folder per task, each with its own head
        raise ValueError(f"{folder / 'hf'}: no config.json; lm_eval scores language models (HFLanguageModelPool), "
                         "this export holds one sequence classifier per task")
    raise FileNotFoundError(f"{folder}: no Hugging Face model (hf/config.json); it must be an `adamerge export` "
                            "folder of a language-model run, or its hf/ folder")


def check_inputs(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    """One-line errors for contradicting or missing inputs, before lm_eval or a model is loaded."""
    if bool(args.export) == bool(args.config):
        raise ValueError("give --export FOLDER (an exported model) or --config CONFIG --ckpt_path CKPT (the live merged model)")
    if args.export and (args.ckpt_path or overrides):
        raise ValueError(f"--export scores the exported folder alone: drop {'--ckpt_path' if args.ckpt_path else overrides[0]}")
    if args.config and not args.ckpt_path:
        raise ValueError("--config needs --ckpt_path: the run's checkpoint holds the learned coefficients")
    for what, path in [*(("--config", c) for c in args.config or []), ("--ckpt_path", args.ckpt_path)]:
        if path and not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"{path}: {what} file does not exist")
    if args.include_path and not Path(args.include_path).expanduser().is_dir():
        raise FileNotFoundError(f"{args.include_path}: --include_path folder does not exist")
    if args.export:
        hf_folder(args.export)
    if not task_names(args.tasks):
        raise ValueError(f"--tasks {args.tasks!r}: give lm_eval task names, comma separated")


def task_names(tasks: str) -> list[str]:
    return [t.strip() for t in tasks.split(",") if t.strip()]


def import_lm_eval() -> Any:
    """The ``lm_eval`` package, or a one-line error naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (HFLM)
        import lm_eval.tasks  # noqa: F401  (TaskManager)
    except ImportError as exc:
        raise RuntimeError(f"adamerge eval needs EleutherAI's lm-evaluation-harness (lm_eval, {exc.name or 'missing'} "
                           f"not importable): {EXTRA}") from None
    return lm_eval


def task_manager(names: Sequence[str], include_path: str | None) -> Any:
    """lm_eval's ``TaskManager`` that knows every name, or a one-line error on the first unknown one.

    Indexing lm_eval's own ~15,000 task configs takes seconds: when every name is a task of
    ``include_path``, that folder alone is indexed."""
    from lm_eval.tasks import TaskManager
    if include_path:
        own = TaskManager(include_path=include_path, include_defaults=False)
        if all(_known(n, own) for n in names):
            return own
    manager = TaskManager(include_path=include_path)
    for name in names:
        if not _known(name, manager):
            where = f" (lm_eval's tasks{f' and {include_path}' if include_path else ''})"
            raise ValueError(unknown_name("lm_eval task", name, manager.all_tasks, where=where))
    return manager


def _known(name: str, manager: Any) -> bool:
    """A registered task, group or tag, or a task YAML file (lm_eval takes both)."""
    return name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


# ------------------------------------------------------------------------- models
def pick_device(device: str) -> str:
    """``--device``: ``auto`` is cuda when there is one; a cuda device without one fails in one line."""
    import torch
    if device == DEFAULT_DEVICE:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device here (use cpu, or leave --device out)")
    return device


def exported_model(folder: Path) -> Any:
    """The exported merged model of an :func:`hf_folder` (``from_pretrained``, in the dtype it was saved in)."""
    import transformers
    config = transformers.AutoConfig.from_pretrained(folder)
    if getattr(config, "is_encoder_decoder", False):
        auto = transformers.AutoModelForSeq2SeqLM
    else:
        auto = transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype="auto").eval()


def live_model(configs: Sequence[str], overrides: Sequence[str], ckpt_path: str,
               tokenizer: str | None = None) -> tuple[Any, str]:
    """``(merged LM, tokenizer name)`` of a run (see :func:`merged_lm`, :func:`tokenizer_name`).
    The learned module goes out of scope here: its task vectors are freed before evaluating."""
    from .export import build_from_config
    module, dm = build_from_config(configs, overrides)
    module.load_coefficients(ckpt_path)
    return merged_lm(module), tokenizer or tokenizer_name(module, dm)


def merged_lm(module: Any) -> Any:
    """The run's ``transformers`` model with the merged weights in its parameters.

    The merged tensors are formed once and copied into the pool's own base model (no copy of the
    module; peak: the base plus the merged parameters): the command ends after evaluating, and the
    base weights are not needed again. For LoRA experts
    the merge is the engine's low-rank one, one ``W0 + (B * s) @ A`` per adapted weight, in memory.
    """
    import torch

    from ..engine.merged_model import MergedModel
    from ..models.hf import FirstTokenSeq2Seq, LastTokenLM
    merged, method = module.merged, getattr(module, "method", type(module).__name__)
    if not isinstance(merged, MergedModel) or len(getattr(module, "task_modules", ())):
        raise ValueError(f"method {method!r} answers through per-task or routed parts, not one merged model; "
                         "lm_eval scores one model: use a plain learned merge (adamerging, adarank)")
    if not isinstance(merged.module, (LastTokenLM, FirstTokenSeq2Seq)):
        raise ValueError(f"lm_eval scores causal and seq2seq language models (HFLanguageModelPool); this run's "
                         f"model is a {type(merged.module).__name__}")
    with torch.no_grad():
        for name, value in merged.merged_parameters().items():
            merged.module.get_parameter(name).copy_(value)
    return merged.module.lm.eval()


def tokenizer_name(module: Any, dm: Any) -> str:
    """The run's tokenizer: its data source's (what its prompts were tokenised with), else the
    pool's base model folder or hub id (recorded with the task vectors)."""
    name = getattr(getattr(dm, "source", None), "tokenizer_name", None)
    if name:
        return str(name)
    base = module.loaded.task_vectors.meta.get("base")
    if not base:
        raise ValueError("the run's data source names no tokenizer and the pool no base model: give --tokenizer")
    return str(base)


def load_tokenizer(name: str | Path) -> Any:
    """A tokenizer by folder or hub id (hub ids: the local cache when offline, else one error line)."""
    from ..io import offline
    import transformers
    name = str(name)
    if offline.is_local_path(name):
        if not Path(name).expanduser().exists():
            raise FileNotFoundError(f"{name}: tokenizer folder does not exist")
        return transformers.AutoTokenizer.from_pretrained(name)
    with offline.download_or_cache(f"tokenizer {name!r} (a Hugging Face hub id)",
                                   f"give a local folder instead (--tokenizer DIR, fetched once where there is "
                                   f"a network with `hf download {name} --local-dir DIR`)"):
        return transformers.AutoTokenizer.from_pretrained(name)


def export_tokenizer(folder: Path, given: str | None) -> Any:
    """``--tokenizer``, else the export's own (``adamerge export`` writes the model only: a
    tokenizer is there when the user saved one next to it)."""
    if given:
        return load_tokenizer(given)
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return load_tokenizer(folder)
    raise ValueError(f"{folder}: no tokenizer in the export folder; give --tokenizer (the base model's folder or hub id)")


# --------------------------------------------------------------------- evaluation
def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], manager: Any, num_fewshot: int | None = None,
             limit: int | float | None = None, batch_size: int | str = 1, bootstrap_iters: int = 100000,
             unsafe_code: bool = False) -> dict:
    """lm_eval's ``simple_evaluate`` on a model instance (``HFLM(pretrained=model)``): its results
    dict (``results``, ``configs``, ``versions``, ...). The model stays on its device."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters,
                              confirm_run_unsafe_code=unsafe_code)
    if results is None:  # lm_eval returns nothing on ranks other than 0
        raise RuntimeError("lm_eval returned no results (not the main process?)")
    return results


def metric_rows(results: dict) -> list[tuple[str, str, float]]:
    """``(task, metric, value)`` of every scalar metric of lm_eval's results: its keys are
    ``metric,filter`` (the filter is shown when it is not lm_eval's default ``none``); stderrs and
    keys without a filter (``alias``, ``sample_len``) are left out."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if not comma or "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            rows.append((task, metric if filt in ("", "none") else f"{metric} ({filt})", float(value)))
    return rows


def format_table(rows: Sequence[tuple[str, str, float]]) -> str:
    """A plain-text table: task, metric, value."""
    header = ("task", "metric", "value")
    cells = [header, *((t, m, f"{v:.4f}") for t, m, v in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)).rstrip() for c in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_results(results: dict, path: str | Path) -> Path:
    """lm_eval's results as JSON, atomically (lm_eval's own encoder for numpy values and the rest)."""
    import json

    from lm_eval.utils import handle_non_serializable

    from ..io.checkpoints import atomic_write
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1, default=handle_non_serializable) + "\n")
    return path


# lm_eval's warnings about a model passed as an instance: this command does it on purpose
EXPECTED_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


def quiet_lm_eval() -> None:
    """lm_eval logs every step at INFO; keep its warnings only (but the ones this command causes
    on purpose), unless ``--verbose``."""
    from ..report import verbose_requested
    if not verbose_requested():
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        hf = logging.getLogger("lm_eval.models.huggingface")
        if not any(isinstance(f, _Expected) for f in hf.filters):
            hf.addFilter(_Expected())


class _Expected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(EXPECTED_WARNINGS)


def eval_main(argv: Sequence[str]) -> None:
    args, overrides = build_parser().parse_known_args(list(argv))
    check_inputs(args, overrides)
    import_lm_eval()
    quiet_lm_eval()
    names, device = task_names(args.tasks), pick_device(args.device)
    manager = task_manager(names, args.include_path)  # unknown tasks fail before any model is loaded
    if args.export:
        folder = hf_folder(args.export)
        tokenizer = export_tokenizer(folder, args.tokenizer)  # before the model: a missing one fails fast
        model = exported_model(folder)
    else:
        model, name = live_model(args.config, overrides, args.ckpt_path, args.tokenizer)
        tokenizer = load_tokenizer(name)
    model.to(device)
    results = evaluate(model, tokenizer, names, manager, args.num_fewshot, args.limit, args.batch_size,
                       args.bootstrap_iters, args.unsafe_code)
    print(format_table(metric_rows(results)))
    if args.output:
        print(f"results: {write_results(results, args.output)}", file=sys.stderr)
