"""The ``adamerge`` command line: one entry point dispatching to one module per command.

``fit``, ``validate`` and ``test`` are LightningCLI subcommands driven by YAML configs
(:mod:`adamerge.commands.fit`); the other commands are small argparse programs. A command's
module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from typing import Sequence

from ..errors import unknown_name
from ..options import VERBOSE_ENV

HELP_TEMPLATE = """usage: adamerge COMMAND [options]

Test-time adaptive model merging (AdaMerging) on Lightning.

commands:
  fit       learn merging coefficients:  adamerge fit --config configs/tiny.yaml
            resume with --ckpt_path last (same --trainer.default_root_dir)
  validate  evaluate merged model(s):     adamerge validate --config FILE [--ckpt_path CKPT]
  test      same, on the evaluation split: adamerge test --config FILE [--ckpt_path CKPT]
  demo      offline miniature benchmark: adamerge demo [--out DIR] [--methods all]
  compare   merging methods on the pool and data of a fit config:
            adamerge compare --config FILE --out DIR [--protocol paper]
            (--protocol paper: the official AdaMerging code's recipe; docs/fidelity.md)
            `adamerge compare --methods` lists the methods with their defaults
  export    write the merged model as safetensors:
            adamerge export --config FILE --ckpt_path CKPT --out DIR   (a learned run)
            adamerge export --config FILE --method ties --out DIR      (a static or fitted row)
  predict   one task's images through a checkpoint's merged model -> predictions.csv:
            adamerge predict --config FILE --ckpt_path CKPT --task T (--split S | --images DIR)
  online    answer a stream batch by batch, adapting after each answer (restartable):
            adamerge online --config FILE --out DIR [--stream SPLIT] [--stop-after N]
  convert   CLIP image-encoder checkpoint (open_clip, Hugging Face, pickled task-vectors
            ImageEncoder with --allow-pickle) -> open_clip image tower safetensors:
            adamerge convert SRC OUT.safetensors
            adamerge convert --fusionbench DIR --out OUTDIR   (FusionBench's HF fine-tunes, all tasks)
  finetune  make an expert: fine-tune CLIP's image tower on one task (task-vectors recipe):
            adamerge finetune --task mnist --out experts/ViT-B-32/mnist.safetensors
  eval      score a merged language model with lm_eval (pip install 'adamerge[eval]'):
            adamerge eval --export DIR --tasks gsm8k_cot,ifeval [--tokenizer BASE]
            adamerge eval --config FILE --ckpt_path CKPT --tasks T [--include_path TASKS_DIR]
  bench     step time and peak memory vs a plain forward+backward and a naive merge:
            adamerge bench [--model ViT-B-32] [-K 8] [-B 2] [--device cuda]
            the SVD step of TSV-M / Iso-CTS: adamerge bench --svd [--blocks 12]

Run `adamerge COMMAND --help` for the options of a command (fit/validate/test: the keys that
matter; --help-all: every key). Any command takes --verbose (or
ADAMERGE_VERBOSE=1): Lightning's warnings and tips that adamerge hides, and for validate/test
Lightning's metric box.
"""

# command -> (module under adamerge.commands, function taking the argument list)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("fit", "lightning_main"), "validate": ("fit", "lightning_main"),
    "test": ("fit", "lightning_main"), "demo": ("demo", "demo_main"),
    "compare": ("compare", "compare_main"), "export": ("export", "export_main"),
    "convert": ("convert", "convert_main"), "finetune": ("finetune", "finetune_main"),
    "bench": ("bench", "bench_main"), "predict": ("predict", "predict_main"),
    "online": ("online", "online_main"), "eval": ("eval", "eval_main"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test")  # they get the command name as first argument


def help_text() -> str:
    """The top-level ``--help`` (plain text: printed without importing torch or Lightning)."""
    return HELP_TEMPLATE


def pop_verbose(args: Sequence[str]) -> tuple[list[str], bool | None]:
    """``args`` without ``--verbose`` (also Lightning's ``--verbose true|false`` and
    ``--verbose=true|false``), and what it asked for (``None``: not given)."""
    out, verbose, args = [], None, list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--verbose":
            value = args[i + 1].lower() if i + 1 < len(args) else ""
            if value in ("true", "false", "1", "0", "yes", "no"):
                verbose, i = value in ("true", "1", "yes"), i + 2
            else:
                verbose, i = True, i + 1
            continue
        if arg.startswith("--verbose="):
            verbose = arg.split("=", 1)[1].lower() in ("true", "1", "yes")
        else:
            out.append(arg)
        i += 1
    return out, verbose


KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, OSError, FloatingPointError,
                                                  RuntimeError, argparse.ArgumentError)


def one_line(exc: BaseException) -> str:
    """The message of an error on one line.

    jsonargparse nests its messages (``Parser key "model.pool": / Problem with given class_path
    ... / Parser key "base": / Not of type Path_fr: File does not exist: ...``); they become
    ``model.pool.base: File does not exist: ...``. Other messages keep their first line.
    """
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, argparse.ArgumentError):
        lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
        keys = re.findall(r'Parser key "([^"]+)"', msg)
        if keys and lines and not lines[-1].startswith("Parser key"):
            last = re.sub(r"^Not of type [\w\[\], |]+: ", "", lines[-1])
            return f"{'.'.join(keys)}: {last}"
        return " ".join(lines) or type(exc).__name__
    msg = msg.strip()
    return msg.splitlines()[0] if msg else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"adamerge: {unknown_name('command', command, COMMANDS)}\n\n{help_text()}", file=sys.stderr)
        return 2
    module, function = COMMANDS[command]
    rest, verbose = pop_verbose(rest)
    if command in LIGHTNING_COMMANDS and ("-h" in rest or "--help" in rest):
        from .fit_help import summary
        print(summary(command))
        return 0
    if command in LIGHTNING_COMMANDS and "--help-all" in rest:  # LightningCLI's full help
        rest = [("--help" if a == "--help-all" else a) for a in rest]
    previous = os.environ.get(VERBOSE_ENV)
    if verbose is not None:  # read by adamerge.report.quiet_lightning, for this command only
        os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    try:
        run = getattr(importlib.import_module(f"adamerge.commands.{module}"), function)
        run([command, *rest] if command in LIGHTNING_COMMANDS else rest)
    except KNOWN_ERRORS as exc:
        if os.environ.get("ADAMERGE_DEBUG"):
            raise
        print(f"adamerge {command}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if verbose is not None:
            if previous is None:
                os.environ.pop(VERBOSE_ENV, None)
            else:
                os.environ[VERBOSE_ENV] = previous
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
