"""Sharded merges (FSDP2 over CPU gloo processes): the same coefficients as one process, half the
task-vector bytes per rank, whole checkpoints that resume on another number of processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adamerge.engine.merged_model import MergedModel
from adamerge.engine.sharded import local_bytes
from adamerge.engine.task_vectors import TaskVectors
from adamerge.io.checkpoints import read_checkpoint
from adamerge.methods.adamerging import COEFFICIENTS_KEY

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TiedLM(nn.Module):
    """Embedding, blocks, and an output layer tied to the embedding (as Llama-3.2-3B's)."""

    def __init__(self, vocab: int = 12, d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)[:, -1]


def pool(k: int = 3) -> tuple[nn.Module, TaskVectors]:
    torch.manual_seed(0)
    base = TiedLM()
    state = {n: p.detach() for n, p in base.named_parameters()}
    experts = {f"t{i}": {n: v + 0.2 * torch.randn_like(v) for n, v in state.items()} for i in range(k)}
    return base, TaskVectors.from_state_dicts(state, experts)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()


def train(model: MergedModel, call, ids: torch.Tensor, world: int = 1) -> torch.Tensor:
    opt = torch.optim.Adam([model.coefficients], lr=0.05)
    for _ in range(STEPS):
        opt.zero_grad()
        entropy_loss(call(ids)).backward()
        if world > 1:  # what ShardedMergeStrategy.post_backward does
            dist.all_reduce(model.coefficients.grad)
            model.coefficients.grad /= world
        opt.step()
    return model.coefficients.detach().clone()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# both gathers, with and without recompute, in one pair of processes (a spawn costs seconds)
SETTINGS = (("merged", True), ("merged", False), ("stored", True))


def _worker(rank: int, world: int, port: int, ids: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        for gather, recompute in SETTINGS:
            base, tv = pool()
            model = MergedModel(base, tv, "layerwise")
            model.shard(mesh, ["layers.0", "layers.1", "layers.2"], recompute=recompute, gather=gather)
            held = local_bytes(model.module)
            share = ids.shape[0] // world
            coefficients = train(model, lambda x: model(x), ids[rank * share:(rank + 1) * share], world)
            state = model.merged_state_dict()  # collective: every rank gathers
            out[(gather, recompute, rank)] = {"coefficients": coefficients, "held": held,
                                              "state": state if rank == 0 else None}
    finally:
        dist.destroy_process_group()


def test_two_sharded_processes_train_as_one_and_hold_half():
    ids = torch.randint(0, 12, (8, 5), generator=torch.Generator().manual_seed(1))
    base, tv = pool()
    whole = MergedModel(base, tv, "layerwise")
    expected = train(whole, lambda x: whole(x), ids)
    assert (expected - 0.3).abs().max() > 1e-3  # the coefficients moved
    out = mp.Manager().dict()
    mp.start_processes(_worker, args=(2, _free_port(), ids, out), nprocs=2, start_method="spawn")
    # 1/2 of every stack, give or take one row per tensor (an odd dim 0: FSDP2 pads, DTensor splits unevenly)
    total = tv.nbytes()
    row = sum(t[0].numel() // max(t.shape[1], 1) * t.shape[0] * t.element_size() for t in tv.tensors if t.dim() > 1)
    for gather, recompute in SETTINGS:
        what = f"gather {gather}, recompute {recompute}"
        for rank in range(2):
            got = out[(gather, recompute, rank)]
            diff = (got["coefficients"] - expected).abs().max().item()
            assert diff <= 1e-5, f"{what}, rank {rank}: coefficients differ from one process by {diff}"
            held = got["held"]["task_vectors"]
            assert abs(held - total / 2) <= row, f"{what}, rank {rank} holds {held} of {total} task-vector bytes"
        # the gathered merged model (tied output layer included) is the whole model's merge at these coefficients
        with torch.no_grad():
            whole.coefficients.copy_(out[(gather, recompute, 0)]["coefficients"])
        reference, gathered = whole.merged_state_dict(), out[(gather, recompute, 0)]["state"]
        assert set(gathered) == set(reference), what
        for name, value in reference.items():
            assert torch.allclose(gathered[name], value, atol=1e-6), f"{what}: {name}"
        assert torch.equal(gathered["out.weight"], gathered["embed.weight"]), what


# --------------------------------------------------------------- the CLI, as users run it
def command(root: Path, *extra: str, full: bool = True) -> list[str]:
    return [sys.executable, "-m", "adamerge", "fit", "--config", str(ROOT / "configs/text_tiny_layerwise.yaml"),
            "--model.pool.init_args.full_experts", "true" if full else "false", "--seed_everything", "7",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--data.batch_size", "8", *extra]


SHARDED = ("--trainer.devices", "2", "--trainer.strategy.class_path", "adamerge.ShardedMergeStrategy")


def run(cmd: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def coefficients(root: Path) -> torch.Tensor:
    checkpoint = read_checkpoint(root / "checkpoints/last.ckpt")
    assert checkpoint["global_step"] == STEPS
    return checkpoint["state_dict"][COEFFICIENTS_KEY]


def test_sharded_fit_equals_one_process_and_resumes_on_another_world_size(tmp_path):
    from adamerge.suites import TextSuitePool, TextSuiteSource
    TextSuitePool("tiny", full_experts=True).load()  # build the suite once, not in two processes at a time
    TextSuiteSource("tiny").task_names()
    TextSuiteSource("tiny").rows("topic", "test")
    steps = ("--trainer.max_steps", str(STEPS), "--checkpoint.every_n_train_steps", "2")
    run(command(tmp_path / "one", *steps))
    expected = coefficients(tmp_path / "one")
    assert (expected - 0.3).abs().max() > 1e-4
    out = run(command(tmp_path / "two", *steps, *SHARDED))
    assert "sharded over 2 processes" in out and "learned tensors identical on all 2 ranks" in out, out[-3000:]
    assert (coefficients(tmp_path / "two") - expected).abs().max().item() <= 1e-5
    # the step-2 checkpoint written by 2 processes, resumed by 1; and the reverse
    run(command(tmp_path / "2to1", *steps, "--ckpt_path", str(tmp_path / "two/checkpoints/epoch=0-step=2.ckpt")))
    run(command(tmp_path / "1to2", *steps, *SHARDED, "--ckpt_path", str(tmp_path / "one/checkpoints/epoch=0-step=2.ckpt")))
    for name in ("2to1", "1to2"):
        diff = (coefficients(tmp_path / name) - expected).abs().max().item()
        assert diff <= 1e-5, f"{name}: resumed run differs from the uninterrupted one by {diff}"


def test_lora_pool_keeps_its_low_rank_merge_under_the_strategy(tmp_path):
    """LoRA experts stay low-rank and whole on every rank; the strategy averages their gradients."""
    from adamerge.suites import TextSuitePool
    TextSuitePool("tiny").load()
    run(command(tmp_path / "one", "--trainer.max_steps", "2", full=False))
    out = run(command(tmp_path / "two", "--trainer.max_steps", "2", *SHARDED, full=False))
    assert "LowRankMergedModel is not sharded" in out, out[-3000:]
    one = read_checkpoint(tmp_path / "one/checkpoints/last.ckpt")["state_dict"][COEFFICIENTS_KEY]
    two = read_checkpoint(tmp_path / "two/checkpoints/last.ckpt")["state_dict"][COEFFICIENTS_KEY]
    assert (one - 0.3).abs().max() > 1e-4
    assert (one - two).abs().max().item() <= 1e-5
