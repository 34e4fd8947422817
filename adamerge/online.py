"""Online test-time merging: answer each incoming batch with the current merge, then adapt on it.

One pass over a stream of images of several tasks (each image's task is known): at every step
each task contributes its next ``batch_size`` images, in a seeded order; the batch is first
predicted with the current learned tensors (those predictions are the output: nothing is answered
after having been trained on), then used for one optimizer step of the method's objective.

Restarts are exact: every ``checkpoint_every`` steps the learned tensors, the optimizer state,
the step and the number of prediction rows written go to ``state.pt`` (atomically). A restarted
run truncates ``predictions.csv`` to that many rows and continues from that step with the same
state, so each image is answered exactly once and as it would have been without the restart.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from .data.datamodule import image_of, label_of
from .io.checkpoints import atomic_write

FIELDS = ("step", "task", "index", "prediction", "probability", "label", "correct")


@dataclass
class OnlineResult:
    """Per task: images answered and (when labels exist) top-1 accuracy in percent of the
    answers given online; ``steps`` taken."""

    answered: dict[str, int]
    accuracy: dict[str, float]
    steps: int


def stream_order(sizes: Mapping[str, int], seed: int) -> dict[str, list[int]]:
    """Each task's images in a seeded order (one pass, no repeats)."""
    out = {}
    for pos, (task, n) in enumerate(sizes.items()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + pos * 7919)
        out[task] = torch.randperm(n, generator=g).tolist()
    return out


def stream_units(order: Mapping[str, list[int]], batch_size: int) -> Callable[[str, int], list[int]]:
    """``(task, index) -> indices``: the batch of the online stream ``order`` that holds ``index``
    (what the experts' feature cache computes together: on a miss, the batch in hand)."""
    where = {t: {i: p for p, i in enumerate(o)} for t, o in order.items()}

    def unit(task: str, index: int) -> list[int]:
        lo = where[task][index] // batch_size * batch_size
        return order[task][lo:lo + batch_size]
    return unit


def run_online(model, datasets: Mapping[str, Dataset], out: str | Path, batch_size: int = 16,
               seed: int = 0, checkpoint_every: int = 10, stop_after: int | None = None,
               say: Callable[[str], None] = print, progress: bool = True) -> OnlineResult:
    """Run (or continue) an online pass of ``model`` over ``datasets`` and write to ``out``.

    Args:
        model: a learned module (:class:`adamerge.methods.AdaMerging` or a subclass) built on the
            pool the datasets belong to; its tasks must be in ``datasets``.
        datasets: task -> the stream's images (items ``(image, label)`` or images).
        out: folder for ``predictions.csv`` and ``state.pt`` (continued if present).
        batch_size: images per task per step.
        seed: seed of the stream order.
        checkpoint_every: steps between state checkpoints (the last step always saves).
        stop_after: stop after this step (tests: a run interrupted on purpose).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in model.task_names if t in datasets]
    if not tasks:
        raise ValueError(f"no stream data for the model's tasks {model.task_names}; got {list(datasets)}")
    order = stream_order({t: len(datasets[t]) for t in tasks}, seed)
    steps = max((len(v) + batch_size - 1) // batch_size for v in order.values())
    reason = model.refusal("online") if hasattr(model, "refusal") else None
    if reason:
        raise ValueError(f"{type(model).__name__} cannot run online: {reason}")
    optimizer, scheduler = _optimizers(model.optimizers_for(steps))
    pred_path, state_path = out / "predictions.csv", out / "state.pt"
    start, rows = 0, 0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["tasks"] != tasks or state["seed"] != seed or state["batch_size"] != batch_size:
            raise ValueError(f"{state_path}: a stream of tasks {state['tasks']}, seed {state['seed']}, batch "
                             f"{state['batch_size']}; this run has {tasks}, {seed}, {batch_size}")
        if state["method"] != model.method or state["fingerprint"] != model.fingerprint:
            raise ValueError(f"{state_path} was written by method {state['method']!r} on another pool or "
                             "method; use a new output folder")
        with torch.no_grad():
            for k, v in model.learned_state().items():
                v.copy_(state["learned"][k])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start, rows = state["step"], state["rows"]
        _truncate_csv(pred_path, rows)
        say(f"continuing at step {start} of {steps} ({rows} answers kept)")
    elif pred_path.exists():
        raise ValueError(f"{pred_path} exists without {state_path.name}: use a new output folder")
    new_file = not pred_path.exists()
    with open(pred_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for step in tqdm(range(start, steps), initial=start, total=steps, desc="online",
                         disable=not progress):
            batch, labels = {}, {}
            for t in tasks:
                idx = order[t][step * batch_size:(step + 1) * batch_size]
                if idx:
                    items = [datasets[t][i] for i in idx]
                    batch[t] = (torch.stack([image_of(it) for it in items]), torch.tensor(idx))
                    labels[t] = [label_of(it) for it in items]
            rows += _answer(model, batch, labels, step, writer)
            f.flush()
            _adapt(model, optimizer, scheduler, batch, step)
            done = step + 1
            if done % checkpoint_every == 0 or done == steps or done == stop_after:
                os.fsync(f.fileno())
                _save(state_path, model, optimizer, scheduler, tasks, seed, batch_size, done, rows)
            if stop_after is not None and done >= stop_after:
                break
    return summarize_online(pred_path, steps)


@torch.no_grad()
def _answer(model, batch, labels, step: int, writer) -> int:
    params = {k: v.detach() for k, v in model.merged.merged_parameters().items()}
    n = 0
    model.eval()
    for t, (x, idx) in batch.items():
        probs = model.task_logits({t: x}, params)[t].float().softmax(-1)
        p, y = probs.max(-1)
        for i, pi, yi, label in zip(idx.tolist(), p.tolist(), y.tolist(), labels[t]):
            writer.writerow({"step": step, "task": t, "index": i, "prediction": yi, "probability": f"{pi:.6f}",
                             "label": "" if label is None else label,
                             "correct": "" if label is None else int(label == yi)})
            n += 1
    return n


def _optimizers(configured) -> tuple[torch.optim.Optimizer, object | None]:
    """The optimizer and the per-step scheduler (if any) of ``optimizers_for``'s answer."""
    if isinstance(configured, dict):
        sched = configured.get("lr_scheduler")
        if isinstance(sched, dict):
            sched = sched["scheduler"]
        return configured["optimizer"], sched
    return configured, None


def _adapt(model, optimizer, scheduler, batch, step: int) -> None:
    """One optimizer step on the batch just answered, through the method's own
    ``adaptation_step`` (what ``fit``'s ``training_step`` runs: the same objective, per-step
    state and NaN checks), then the gradient check and the scheduler step of ``fit``. Tasks whose
    part of the stream is exhausted simply have no images in it."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    model.adaptation_step(batch, step, every_task=False).backward()
    model.check_gradients()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def _save(path: Path, model, optimizer, scheduler, tasks, seed, batch_size, step, rows) -> None:
    state = {"learned": {k: v.detach().cpu().clone() for k, v in model.learned_state().items()},
             "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "step": step, "rows": rows, "tasks": list(tasks),
             "seed": seed, "batch_size": batch_size, "method": model.method, "fingerprint": model.fingerprint}
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def _truncate_csv(path: Path, rows: int) -> None:
    """Keep the header and the first ``rows`` rows (those covered by the saved state)."""
    if not path.exists():
        raise ValueError(f"{path} is missing but the state says {rows} answers were written")
    with open(path, newline="") as f:
        lines = f.readlines()
    if len(lines) - 1 < rows:
        raise ValueError(f"{path} has {len(lines) - 1} answers, the saved state {rows}: the file was changed")
    with atomic_write(path) as tmp:
        Path(tmp).write_text("".join(lines[:rows + 1]))


def summarize_online(pred_path: str | Path, steps: int) -> OnlineResult:
    """Answers per task and the accuracy of the online answers (labeled streams)."""
    answered: dict[str, int] = {}
    correct: dict[str, int] = {}
    labeled: dict[str, int] = {}
    with open(pred_path, newline="") as f:
        for row in csv.DictReader(f):
            t = row["task"]
            answered[t] = answered.get(t, 0) + 1
            if row["correct"] != "":
                labeled[t] = labeled.get(t, 0) + 1
                correct[t] = correct.get(t, 0) + int(row["correct"])
    acc = {t: 100.0 * correct.get(t, 0) / n for t, n in labeled.items() if n}
    return OnlineResult(answered, acc, steps)
