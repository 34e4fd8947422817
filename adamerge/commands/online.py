"""``adamerge online``: one pass over a stream of test images, answering each batch with the
current merge before adapting on it (:func:`adamerge.online.run_online`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adamerge online",
        description="Online test-time merging: every step, each task's next batch of the stream is "
                    "first answered with the current learned tensors (predictions.csv), then used for "
                    "one step of the method's objective. Restart with the same command to continue "
                    "an interrupted stream: each image is answered exactly once.")
    p.add_argument("--config", required=True, action="append", help="the run's config file(s), as for fit")
    p.add_argument("--stream", default=None,
                   help="split of the config's data source streamed (default: data.adapt_split)")
    p.add_argument("--out", required=True, help="output folder: predictions.csv, state.pt, summary.json")
    p.add_argument("--init-from", default=None,
                   help="start from the learned tensors of this checkpoint (same method and pool)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="steps between state checkpoints (default: 10)")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="stop after this many steps of the stream (state saved; the same command "
                        "without it continues the stream)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.epilog = "Other options are config overrides as for fit (batch size: --data.batch_size, seed: --data.seed)."
    return p


def online_main(argv: Sequence[str]) -> None:
    args, overrides = build_parser().parse_known_args(list(argv))  # --help before the imports below
    from ..online import run_online
    from .export import build_from_config
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
    model, dm = build_from_config(args.config, overrides)
    reason = model.refusal("online")
    if reason:
        from ..methods.registry import row_of
        raise ValueError(f"{row_of(model)[0]} cannot run online: {reason}")
    if args.init_from:
        model.load_coefficients(args.init_from)
    dm.select_tasks(model.task_names)
    split = args.stream or dm.adapt_split
    datasets = {t: dm.dataset(t, split) for t in model.task_names}
    if model.needs_experts:  # on a miss the experts' features of the batch in hand, nothing more
        from ..online import stream_order, stream_units
        order = stream_order({t: len(datasets[t]) for t in model.task_names}, dm.seed)
        model.use_adaptation_data(datasets, units=stream_units(order, dm.batch_size))
    say = lambda s: print(s, file=sys.stderr, flush=True)
    res = run_online(model, datasets, args.out, dm.batch_size, dm.seed, args.checkpoint_every,
                     stop_after=args.stop_after, say=say, progress=args.progress)
    summary = {"split": split, "steps": res.steps, "answered": res.answered,
               "online_accuracy": res.accuracy,
               "online_accuracy_avg": (sum(res.accuracy.values()) / len(res.accuracy)) if res.accuracy else None}
    from pathlib import Path
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    for t, a in res.accuracy.items():
        say(f"  {t}: {a:.1f} % online ({res.answered[t]} images)")
    if res.accuracy:
        say(f"online accuracy (avg over tasks): {summary['online_accuracy_avg']:.1f}")
    print(json.dumps(summary))
