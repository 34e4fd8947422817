#!/usr/bin/env python
"""Soak test: run a config for many steps and report resident memory (RSS) over the run.

    python scripts/soak.py                      # configs/tiny.yaml, 2,000 steps
    python scripts/soak.py --steps 5000 --config configs/tiny.yaml --max-growth 5

The run goes through the same CLI code path as ``adamerge fit`` (periodic checkpoints,
validation and TensorBoard logging as the config sets them) in a temporary run folder. RSS is
sampled every ``--every`` steps; the report gives RSS at step ``--baseline`` (default 200, after
warm-up: allocator pools, lazily built loaders) and at the end, and the growth between them, for
the whole RSS and for its anonymous part (heap and tensors, where a leak shows; the file-backed
part, mostly shared libraries, shrinks and grows with the machine's page cache). The exit status
is 1 if the growth of ``--metric`` exceeds ``--max-growth`` percent. This is a measurement, not
a timed test: it is not part of the pytest suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]


def memory_mib() -> dict[str, float]:
    """Resident memory of this process in MiB: ``rss`` in all, ``anon`` (heap, tensors: what a
    leak grows) and ``file`` (mapped shared libraries, which the kernel may drop and re-read
    under memory pressure). Linux ``/proc``; elsewhere only the peak RSS is available."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(maxsplit=1)[0]
                if key in fields:
                    out[fields[key]] = int(line.split()[1]) / 1024
    except OSError:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
        out = {"rss": rss, "anon": rss, "file": 0.0}
    return out


class RSSProbe(L.Callback):
    """Record ``(step, memory, seconds since start)`` every ``every`` optimizer steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[tuple[int, dict[str, float], float]] = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            mem, sec = memory_mib(), time.perf_counter() - self.start
            self.samples.append((step, mem, sec))
            print(f"step {step:6d}  RSS {mem['rss']:7.1f} MiB (anon {mem['anon']:7.1f}, file "
                  f"{mem['file']:6.1f})  {sec:7.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/tiny.yaml"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--baseline", type=int, default=200, help="step whose RSS is the reference")
    ap.add_argument("--every", type=int, default=100, help="sample RSS every N steps")
    ap.add_argument("--max-growth", type=float, default=5.0, help="percent; exit 1 above it")
    ap.add_argument("--metric", choices=["anon", "rss"], default="anon",
                    help="what --max-growth applies to: anonymous resident memory (default; not "
                         "moved by the page cache) or the whole RSS")
    ap.add_argument("--root", default=None, help="run folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    if args.steps <= args.baseline or args.baseline % args.every:
        ap.error("--steps must exceed --baseline, and --baseline must be a multiple of --every")

    from adamerge.methods.adamerging import AdaMerging
    from adamerge.io.checkpoints import write_json_atomic
    from adamerge.commands.fit import AdaMergeCLI
    from adamerge.data.datamodule import MultiTaskDataModule

    probe = RSSProbe(args.every)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or tmp
        AdaMergeCLI(AdaMerging, MultiTaskDataModule,
                    args=["fit", "--config", args.config, "--trainer.max_steps", str(args.steps),
                          "--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false"],
                    save_config_kwargs={"overwrite": True},
                    trainer_defaults={"callbacks": [probe]})
    samples = {s: m for s, m, _ in probe.samples}
    if args.baseline not in samples:
        print(f"no memory sample at step {args.baseline}", file=sys.stderr)
        return 1
    end_step = probe.samples[-1][0]
    base, end = samples[args.baseline], samples[end_step]
    growth = {k: 100 * (end[k] - base[k]) / base[k] for k in base if base[k] > 0}
    report = {"config": args.config, "steps": end_step, "baseline_step": args.baseline,
              "metric": args.metric, "baseline_mib": {k: round(v, 1) for k, v in base.items()},
              "end_mib": {k: round(v, 1) for k, v in end.items()},
              "growth_percent": {k: round(v, 2) for k, v in growth.items()},
              "seconds": round(probe.samples[-1][2], 1),
              "samples": [[s, {k: round(v, 1) for k, v in m.items()}] for s, m, _ in probe.samples],
              "python": sys.version.split()[0], "cpu_count": os.cpu_count()}
    for k in ("rss", "anon", "file"):
        if k in base:
            print(f"{k:>4}: step {args.baseline} {base[k]:7.1f} MiB -> step {end_step} {end[k]:7.1f} MiB "
                  f"({growth.get(k, 0.0):+.2f}%)")
    print(f"growth of {args.metric}: {growth[args.metric]:+.2f}% (limit {args.max_growth}%); "
          f"{probe.samples[-1][2]:.0f} s")
    if args.json:
        write_json_atomic(report, args.json)
    return 0 if growth[args.metric] <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
