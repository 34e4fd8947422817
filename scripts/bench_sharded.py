#!/usr/bin/env python
"""Per-rank memory and step time of AdaMerging on full experts: one process, W sharded processes
(:class:`adamerge.ShardedMergeStrategy`'s merge, both ``gather`` modes) and W DDP-style processes
(whole model on every rank), on the same model.

    python scripts/bench_sharded.py [--hidden 512] [--layers 6] [--world 2] [--steps 3] [--out FILE]

The model is a ``transformers.LlamaForCausalLM`` with random weights (nothing is downloaded) over
the built-in tiny text suite's tokenizer and tasks (K = 3 tasks: its label words give the heads);
each expert is the base plus random noise, saved with ``save_pretrained``, loaded through
``HFLanguageModelPool(task_vector_file=...)`` (streamed: the task vectors are a memory-mapped
stack, written once before the runs). Every process builds the same ``AdaMerging`` module
(layer-wise, entropy), then runs ``--warmup`` untimed and ``--steps`` timed steps of
``adaptation_step`` + backward + the average of the coefficient gradients over the ranks + Adam,
on random prompts (``--batch`` per task per rank). Variants:

* ``single``: one process, the whole model (``--threads`` threads);
* ``sharded``: W processes, ``MergedModel.shard`` with ``gather: merged`` (each rank merges its
  rows, the merged rows are gathered per block; the default);
* ``fsdp``: the same with ``gather: stored`` (FSDP2's ``fully_shard`` gathers each block's stored
  base and task vectors, every rank merges them whole);
* ``ddp``: W processes, the whole model on each, gradients averaged (what DDP does for the
  learned tensors; DDP itself ignores the frozen ones, see ``AdaMerging.setup``).

The W-process variants get ``--threads // W`` threads each, so all variants use the same cores.
Per rank: ``held_mb`` (bytes of base weights and task vectors the rank's tensors hold, from the
tensors), ``anon_mb`` (peak private resident memory over the steps, ``RssAnon``: what cannot be
paged out; the memory-mapped stack is file-backed and counts under ``file_mb``, the resident
file pages after the steps), ``hwm_mb`` (the process's peak resident set), ``step_s`` (median).
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from adamerge.commands.bench import status_mb

ROOT = Path(__file__).resolve().parents[1]


def prepare(folder: Path, hidden: int, layers: int, noise: float = 0.01) -> dict:
    """Base, experts and tasks file of the benchmark model under ``folder`` (and the stack)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adamerge.models.hf import HFLanguageModelPool
    from adamerge.suites.text import ensure_text_suite, get_text_spec
    suite = ensure_text_suite(get_text_spec("tiny"))
    tasks = json.loads((suite / "tasks.json").read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(suite / "base")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    experts = {}
    for k, task in enumerate(tasks):
        g = torch.Generator().manual_seed(k + 1)
        expert = LlamaForCausalLM(config)
        expert.load_state_dict({n: v + noise * torch.randn(v.shape, generator=g) for n, v in base.state_dict().items()})
        expert.save_pretrained(folder / "experts" / task)
        experts[task] = str(folder / "experts" / task)
    spec = {"base": str(folder / "base"), "experts": experts, "tasks_file": str(suite / "tasks.json"),
            "task_vector_file": str(folder / "task_vectors.safetensors")}
    HFLanguageModelPool(**spec).load()  # writes the stack once, before any worker maps it
    return {**spec, "vocab": len(tok), "params": sum(p.numel() for p in base.parameters())}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, variant: str, world: int, port: int, spec: dict, ns: argparse.Namespace, out: dict) -> None:
    import torch.distributed as dist

    from adamerge.engine.sharded import local_bytes
    from adamerge.methods.adamerging import AdaMerging
    from adamerge.methods.sharding import shard_module
    from adamerge.models.hf import HFLanguageModelPool
    torch.set_num_threads(max(1, ns.threads // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    pool = HFLanguageModelPool(**{k: spec[k] for k in ("base", "experts", "tasks_file", "task_vector_file")})
    module = AdaMerging(pool)
    if variant in ("sharded", "fsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        strategy = SimpleNamespace(mesh=init_device_mesh("cpu", (world,)), recompute=not ns.no_recompute,
                                   offload=False, world_size=world, gather="merged" if variant == "sharded" else "stored")
        shard_module(module, strategy)
        held = local_bytes(module.merged.module)
    else:
        tv = module.merged.task_vectors
        own = dict(module.merged.module.named_parameters())
        held = {"task_vectors": tv.nbytes(), "base": sum(own[n].numel() * own[n].element_size() for n in tv.names)}
    optimizer = module.optimizers_for(None)
    g = torch.Generator().manual_seed(100 + rank)
    ids = {t: torch.randint(4, spec["vocab"], (ns.batch, ns.seq_len), generator=g) for t in module.task_names}
    batch = {t: (torch.stack([x, torch.ones_like(x)], 1), None) for t, x in ids.items()}
    times, anon = [], []
    for step in range(ns.warmup + ns.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        module.adaptation_step(batch, step).backward()
        grad = module.merged.coefficients.grad
        if world > 1:  # what ShardedMergeStrategy.post_backward (and DDP) do
            dist.all_reduce(grad)
            grad /= world
        optimizer.step()
        if step >= ns.warmup:
            times.append(time.perf_counter() - start)
        anon.append(status_mb("RssAnon") or 0.0)
    out[(variant, rank)] = {"held_mb": round(sum(held.values()) / 2**20, 1),
                            "task_vectors_mb": round(held["task_vectors"] / 2**20, 1),
                            "anon_mb": round(max(anon), 1), "file_mb": round(status_mb("RssFile") or 0.0, 1),
                            "hwm_mb": round(status_mb("VmHWM") or 0.0, 1),
                            "step_s": round(statistics.median(times), 4)}
    if world > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512, help="hidden size (MLP 4x; default 512)")
    p.add_argument("--layers", type=int, default=6, help="transformer blocks (default 6)")
    p.add_argument("--world", type=int, default=2, help="processes of the sharded and DDP variants (default 2)")
    p.add_argument("--threads", type=int, default=2, help="threads of the one-process variant; split over W")
    p.add_argument("--batch", type=int, default=4, help="prompts per task per rank per step (default 4)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens per prompt (default 16)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--variants", nargs="+", default=["single", "sharded", "fsdp", "ddp"],
                   choices=["single", "sharded", "fsdp", "ddp"])
    p.add_argument("--no-recompute", action="store_true", help="sharded variants keep every block's merged weights")
    p.add_argument("--out", help="also write the JSON here")
    ns = p.parse_args(argv)
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare(Path(tmp), ns.hidden, ns.layers)
        print(f"model: Llama, hidden {ns.hidden}, {ns.layers} blocks, {spec['params'] / 1e6:.1f} M parameters "
              f"({spec['params'] * 4 / 2**20:.0f} MB fp32), K = {len(spec['experts'])} experts", flush=True)
        out = mp.Manager().dict()
        for variant in ns.variants:
            world = 1 if variant == "single" else ns.world
            mp.start_processes(_worker, args=(variant, world, _port(), spec, ns, out), nprocs=world,
                               start_method="spawn")
        results = {f"{v}/rank{r}": dict(out[(v, r)]) for v, r in sorted(out.keys())}
    print(f"{'variant/rank':<16}" + "".join(f"{k:>16}" for k in next(iter(results.values()))))
    for name, row in results.items():
        print(f"{name:<16}" + "".join(f"{v:>16}" for v in row.values()))
    report = {"settings": {k: v for k, v in vars(ns).items() if k != "out"}, "params": spec["params"],
              "tasks": len(spec["experts"]), "results": results}
    line = json.dumps(report)
    print(line)
    if ns.out:
        Path(ns.out).write_text(line + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
