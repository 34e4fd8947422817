#!/usr/bin/env python
"""Time one AdaMerging step of a language model on LoRA experts: low-rank vs dense merge.

    python scripts/bench_lora.py [--layers 12] [--tasks 8] [--rank 16] [--steps 3] [--out FILE]

The model is a ``transformers.LlamaForCausalLM`` with random weights built from a config (nothing
is downloaded), by default of GPT-2-small's width and depth in Llama layout (hidden 768, MLP 3072,
12 layers, 12 heads, vocabulary 32000, every projection an ``nn.Linear``), wrapped in adamerge's
``LastTokenLM`` (next-token logits at the last position). K random LoRA experts (A and B random,
one ``scale`` for all) adapt the ``--targets`` projections of every layer. A step sees the K
tasks' batches (``--batch`` sequences of ``--seq-len`` tokens each) concatenated into one
forward, as AdaMerging does; its objective is the sum over tasks of the mean entropy of the
next-token distribution (full vocabulary). Variants:

* ``limit``: forward + backward of the plain model, gradients w.r.t. the adapted weights only, no
  merge: the least any step on this batch costs;
* ``lowrank``: ``LowRankMergedModel.merged_parameters(reuse_buffers=True)`` (one GEMM per weight,
  ``W0 + (B s) @ A``), forward with ``functional_call``, backward to the layer-wise coefficients;
* ``dense``: the same with ``MergedModel`` on ``LowRankTaskVectors.to_dense()`` (K dense task
  vectors of the adapted weights; the low-rank factors are freed once densified).

Each variant runs in its own process (``--in-process``: all in this one, for tests; then no
memory figures): ``--warmup`` untimed steps, then ``--steps`` timed ones, median reported;
``peak_rss_mb`` is the process's peak resident set (build included), ``step_rss_mb`` the steps'
peak over what was resident once everything was built. The merge variants also report the bytes of
their task vectors and their coefficient gradient, which must agree (``grad_rel_diff``:
``max |g_lowrank - g_dense| / max |g_dense|``; the coefficients do not change between steps, so
every step's gradient is the same), and ``merge_s``: the merge and its backward alone (fixed
random weight gradients in place of the model's), timed after the steps. ``cpu_s`` is the median
CPU time of a step (all threads): about ``--threads`` x the wall time when nothing else ran.
``implied_task_vector_factor`` is what the ranks predict for the dense / low-rank task-vector
memory: ``sum out*in / sum rank*(out+in)`` over the adapted weights.
The last stdout line is JSON (``--out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from adamerge.commands.bench import reset_peak_rss, status_mb
from adamerge.engine.lowrank import LowRankMergedModel, LowRankTaskVectors
from adamerge.engine.merged_model import MergedModel
from adamerge.engine.objectives import entropy
from adamerge.models.hf import LastTokenLM

VARIANTS = ("limit", "lowrank", "dense")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRIOR = 0.3  # initial coefficient (AdaMerging's default)


# ------------------------------------------------------------------------- model and data
def build_lm(ns: argparse.Namespace) -> LastTokenLM:
    """A frozen random Llama of the configured shape, as adamerge's ``LastTokenLM`` (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(ns.seed)
    cfg = LlamaConfig(hidden_size=ns.hidden, intermediate_size=ns.intermediate,
                      num_hidden_layers=ns.layers, num_attention_heads=ns.heads,
                      num_key_value_heads=ns.heads, vocab_size=ns.vocab,
                      max_position_embeddings=max(128, ns.seq_len))
    return LastTokenLM(LlamaForCausalLM(cfg).float().eval()).requires_grad_(False)


def target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the 2-D weights of the ``targets`` projections (``lm.model.layers.<i>.self_attn.
    q_proj.weight``, ...)."""
    names = [n for n, p in model.named_parameters()
             if p.dim() == 2 and any(n.endswith(f".{t}.weight") for t in targets)]
    if not names:
        raise ValueError(f"no weight of the model matches the targets {list(targets)}")
    return names


def implied_factor(model: nn.Module, names: Sequence[str], rank: int) -> float:
    """Dense over low-rank task-vector size the ranks imply: ``sum out*in / sum rank*(out+in)``."""
    params = dict(model.named_parameters())
    dense = sum(params[n].shape[0] * params[n].shape[1] for n in names)
    return dense / sum(rank * (params[n].shape[0] + params[n].shape[1]) for n in names)


def random_adapters(model: nn.Module, names: Sequence[str], tasks: int, rank: int, scale: float,
                    seed: int) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """K random LoRA experts: ``A ~ N(0, 1/in)``, ``B ~ N(0, 0.01^2)`` (at rank 16, scale 2 a
    change of 7-15 % of a Llama weight's 0.02 std), the same ``scale`` everywhere."""
    g = torch.Generator().manual_seed(seed + 1)
    params = dict(model.named_parameters())
    out = {}
    for k in range(tasks):
        out[f"task{k}"] = {}
        for n in names:
            o, i = params[n].shape
            out[f"task{k}"][n] = (0.01 * torch.randn(o, rank, generator=g),
                                  torch.randn(rank, i, generator=g) / i ** 0.5, scale)
    return out


def make_batch(ns: argparse.Namespace) -> torch.Tensor:
    """All K tasks' batches concatenated: ``[K * B, 2, L]`` (random token ids, full masks)."""
    g = torch.Generator().manual_seed(ns.seed + 2)
    n = ns.tasks * ns.batch
    ids = torch.randint(0, ns.vocab, (n, ns.seq_len), generator=g)
    return torch.stack([ids, torch.ones_like(ids)], dim=1)


def objective(logits: torch.Tensor, tasks: int) -> torch.Tensor:
    """AdaMerging's loss: the sum over tasks of the mean entropy of that task's batch."""
    return sum(entropy(chunk) for chunk in logits.chunk(tasks))


# ------------------------------------------------------------------------------- variants
def limit_step(model: LastTokenLM, names: Sequence[str], x: torch.Tensor,
               tasks: int) -> Callable[[], None]:
    """Plain forward + ``loss.backward()``, only the adapted weights requiring grad."""
    params = dict(model.named_parameters())
    weights = [params[n].requires_grad_() for n in names]

    def step() -> None:
        for w in weights:
            w.grad = None
        objective(model(x), tasks).backward()
    return step


def merged_step(merged: MergedModel, x: torch.Tensor, tasks: int) -> Callable[[], torch.Tensor]:
    """Merge into reused buffers, forward with ``functional_call``, backward to the coefficients;
    returns the coefficient gradient."""
    def step() -> torch.Tensor:
        merged.coefficients.grad = None
        params = merged.merged_parameters(reuse_buffers=True)
        logits = functional_call(merged.module, params, (x,), strict=False)
        objective(logits, tasks).backward()
        return merged.coefficients.grad
    return step


def merge_only(merged: MergedModel, seed: int) -> Callable[[], None]:
    """The merge alone: merged weights into the reused buffers and their backward to the
    coefficients, with fixed random weight gradients (made at the first call) in place of the
    model's; ``step`` minus this is the model's forward and backward."""
    grads: list[torch.Tensor] = []

    def run() -> None:
        params = list(merged.merged_parameters(reuse_buffers=True).values())
        if not grads:
            g = torch.Generator().manual_seed(seed + 3)
            grads.extend(torch.randn(p.shape, generator=g) for p in params)
        torch.autograd.grad(params, merged.coefficients, grad_outputs=grads)
    return run


def build_variant(variant: str, ns: argparse.Namespace) -> tuple[Callable, dict, Callable | None]:
    """The step of ``variant``, its static figures (task-vector bytes, implied factor) and, for
    the merge variants, the merge alone (see :func:`merge_only`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {VARIANTS}")
    model = build_lm(ns)
    names = target_names(model, ns.targets)
    info: dict = {"adapted_params": len(names),
                  "implied_task_vector_factor": implied_factor(model, names, ns.rank)}
    x = make_batch(ns)
    if variant == "limit":
        return limit_step(model, names, x, ns.tasks), info, None
    lowrank = LowRankTaskVectors.from_adapters(
        random_adapters(model, names, ns.tasks, ns.rank, ns.scale, ns.seed))
    if variant == "lowrank":
        merged: MergedModel = LowRankMergedModel(model, lowrank, "layerwise", prior=PRIOR)
        info["task_vector_bytes"] = lowrank.nbytes()
    else:
        dense = lowrank.to_dense()
        del lowrank  # the dense variant holds the dense task vectors only
        merged = MergedModel(model, dense, "layerwise", prior=PRIOR)
        info["task_vector_bytes"] = sum(t.numel() * t.element_size() for t in dense.tensors)
    return merged_step(merged, x, ns.tasks), info, merge_only(merged, ns.seed)


# ------------------------------------------------------------------------------ measuring
def run_variant(variant: str, ns: argparse.Namespace, memory: bool = True) -> dict:
    """Build ``variant``, run its warm-up and timed steps; times, memory (``memory``: this process
    holds nothing else), task-vector bytes and the coefficient gradient of the first step; then,
    for the merge variants, ``--steps`` times the merge alone (after the memory is read)."""
    torch.set_num_threads(ns.threads)
    step, info, merge = build_variant(variant, ns)
    build_peak = status_mb("VmHWM") if memory else None
    resident = status_mb("VmRSS") if memory and reset_peak_rss() else None
    times, cpu, grad = [], [], None
    for i in range(ns.warmup + ns.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        g = step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if grad is None and g is not None:
            grad = g.detach().clone()
        if i >= ns.warmup:
            times.append(dt)
            cpu.append(dc)
    step_peak = status_mb("VmHWM") if memory else None
    out = {"variant": variant, "times_s": [round(t, 4) for t in times],
           "cpu_s": [round(c, 4) for c in cpu], **info}
    if memory and build_peak is not None and step_peak is not None:
        out["peak_rss_mb"] = round(max(build_peak, step_peak), 1)
        out["step_rss_mb"] = None if resident is None else round(step_peak - resident, 1)
    if grad is not None:
        out["coeff_grad"] = grad.tolist()
    if merge is not None:
        out["merge_s"] = [round(_timed(merge), 4) for _ in range(ns.warmup + ns.steps)][ns.warmup:]
    return out


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _child_args(ns: argparse.Namespace, variant: str) -> list[str]:
    return ["--hidden", str(ns.hidden), "--intermediate", str(ns.intermediate), "--layers", str(ns.layers),
            "--heads", str(ns.heads), "--vocab", str(ns.vocab), "--tasks", str(ns.tasks),
            "--rank", str(ns.rank), "--scale", str(ns.scale), "--batch", str(ns.batch),
            "--seq-len", str(ns.seq_len), "--steps", str(ns.steps), "--warmup", str(ns.warmup),
            "--threads", str(ns.threads), "--seed", str(ns.seed), "--targets", *ns.targets,
            "--child", variant]


def run_child(variant: str, ns: argparse.Namespace) -> dict:
    """``run_variant`` in a fresh Python process (its own memory peak); its last stdout line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *_child_args(ns, variant)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"variant {variant} failed (exit {res.returncode}): {res.stderr.strip()[-800:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def grad_rel_diff(a: Sequence, b: Sequence) -> float:
    """``max |a - b| / max |b|`` of two coefficient gradients."""
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((ta - tb).abs().max() / tb.abs().max().clamp_min(1e-30))


def summarize(results: dict[str, dict], ns: argparse.Namespace) -> dict:
    """The JSON report: configuration, medians, memory, bytes and the ratios between variants."""
    import transformers
    first = next(iter(results.values()))
    med = {v: statistics.median(r["times_s"]) for v, r in results.items()}
    out: dict = {
        "model": {"arch": "LlamaForCausalLM", "hidden": ns.hidden, "intermediate": ns.intermediate,
                  "layers": ns.layers, "heads": ns.heads, "vocab": ns.vocab},
        "tasks": ns.tasks, "rank": ns.rank, "scale": ns.scale, "batch": ns.batch, "seq_len": ns.seq_len,
        "targets": list(ns.targets), "adapted_params": first["adapted_params"], "granularity": "layerwise",
        "dtype": "float32", "steps": ns.steps, "warmup": ns.warmup, "threads": ns.threads,
        "isolated": not ns.in_process, "torch": torch.__version__, "transformers": transformers.__version__,
    }
    for v in results:
        out[f"{v}_s"] = round(med[v], 4)
    # CPU seconds of the process per step (all threads): near threads x wall time when it had the
    # cores to itself; much less means other processes took them during the timing
    out["cpu_s"] = {v: round(statistics.median(r["cpu_s"]), 4) for v, r in results.items()}
    # the merge and its backward alone (median), inside the step above
    out["merge_s"] = {v: round(statistics.median(r["merge_s"]), 4)
                      for v, r in results.items() if "merge_s" in r}
    if any("peak_rss_mb" in r for r in results.values()):
        out["peak_rss_mb"] = {v: r.get("peak_rss_mb") for v, r in results.items()}
        out["step_rss_mb"] = {v: r.get("step_rss_mb") for v, r in results.items()}
    out["task_vector_bytes"] = {v: r["task_vector_bytes"]
                                for v, r in results.items() if "task_vector_bytes" in r}
    for a, b in (("lowrank", "limit"), ("dense", "limit"), ("lowrank", "dense")):
        if a in med and b in med:
            out[f"{a}_over_{b}"] = round(med[a] / med[b], 3)
    if "lowrank" in results and "dense" in results:
        low, dense = results["lowrank"], results["dense"]
        out["dense_over_lowrank_task_vector_bytes"] = round(
            dense["task_vector_bytes"] / low["task_vector_bytes"], 2)
        if low.get("peak_rss_mb") and dense.get("peak_rss_mb"):
            out["dense_over_lowrank_peak_rss"] = round(dense["peak_rss_mb"] / low["peak_rss_mb"], 2)
        out["grad_rel_diff"] = grad_rel_diff(low["coeff_grad"], dense["coeff_grad"])
    out["implied_task_vector_factor"] = round(first["implied_task_vector_factor"], 2)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_lora.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768, help="hidden size (default: 768, GPT-2 small)")
    p.add_argument("--intermediate", type=int, default=3072, help="MLP size (default: 3072)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers (default: 12)")
    p.add_argument("--heads", type=int, default=12, help="attention heads = key/value heads (default: 12)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default: 32000)")
    p.add_argument("--tasks", "-K", type=int, default=8, help="LoRA experts K (default: 8)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every expert (default: 16)")
    p.add_argument("--scale", type=float, default=2.0, help="LoRA scale alpha / r (default: 2.0)")
    p.add_argument("--targets", nargs="+", default=list(TARGETS),
                   help=f"adapted projections (default: {' '.join(TARGETS)})")
    p.add_argument("--batch", "-B", type=int, default=2, help="sequences per task per step (default: 2)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: 64)")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per variant, median reported (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="variants to run, in this order (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, adapters and tokens (default: 0)")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants one after another in this process (fast, for tests; "
                        "no memory figures)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; print (and with ``--out`` write) the JSON report and return it."""
    ns = parser().parse_args(None if argv is None else list(argv))
    if min(ns.tasks, ns.rank, ns.batch, ns.seq_len, ns.steps, ns.layers, ns.threads) < 1 or ns.warmup < 0:
        parser().error("sizes, --steps and --threads must be >= 1 and --warmup >= 0")
    if ns.child:
        result = run_variant(ns.child, ns, memory=True)
        print(json.dumps(result))
        return result
    results = {}
    for v in ns.variants:
        print(f"{v}: {'in process' if ns.in_process else 'separate process'}", file=sys.stderr, flush=True)
        results[v] = run_variant(v, ns, memory=False) if ns.in_process else run_child(v, ns)
        print(f"{v}: steps {results[v]['times_s']} s", file=sys.stderr, flush=True)
    report = summarize(results, ns)
    text = json.dumps(report)
    if ns.out is not None:
        ns.out.write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
