"""Sharded runs: the base and the task vectors split over the processes (DTensor's merged-row
gather by default, FSDP2's ``fully_shard`` with ``gather: stored``), through Lightning's
:class:`~lightning.pytorch.strategies.ModelParallelStrategy`.

``trainer.strategy: adamerge.ShardedMergeStrategy`` (with ``trainer.devices: W``) makes each of
the W processes hold 1/W of the base and of every stacked task vector (:mod:`adamerge.engine.sharded`),
where DDP copies all of it to every rank. The learned tensors (coefficients, per-task modules,
routers) are small: they stay whole on every rank, their gradients are averaged over the ranks
after each backward as DDP averages them, and checkpoints hold them whole, so a checkpoint written
by W processes resumes on any other number.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..engine.merged_model import MergedModel
from ..models.layout import repeated_blocks


class ShardedMergeStrategy(ModelParallelStrategy):
    """The merge sharded over all processes (data parallel, no tensor parallelism).

    Args:
        gather: ``merged`` (default): each rank merges its rows of every weight and only the
            merged rows are gathered (DTensor all-gather; the gradient comes back by
            reduce-scatter): one model's bytes per pass. ``stored``: FSDP2's ``fully_shard``
            gathers the stored base and task vectors of a block and every rank merges them whole:
            1 + K models' bytes per pass; needed for ``split_qkv`` and ``offload``.
        recompute: re-run each block in the backward instead of keeping its merged weights
            (activation checkpointing; a block's merged weights then live only while it runs).
        offload: ``gather: stored`` only: keep the shards in host memory, gathered to the
            accelerator one block at a time (FSDP2's ``CPUOffloadPolicy``).
        process_group_backend: ``nccl`` / ``gloo`` (default: by device).
    """

    def __init__(self, gather: Literal["merged", "stored"] = "merged", recompute: bool = True,
                 offload: bool = False, process_group_backend: str | None = None) -> None:
        if gather not in ("merged", "stored"):
            raise ValueError(f"trainer.strategy.init_args.gather must be 'merged' or 'stored', got {gather!r}")
        if offload and gather != "stored":
            raise ValueError("trainer.strategy.init_args.offload streams FSDP2's stored shards: it needs gather: stored")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend)
        self.gather, self.recompute, self.offload = gather, recompute, offload

    def setup_environment(self) -> None:
        # every process is one data-parallel shard (ModelParallelStrategy's "auto" is one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def mesh(self) -> Any:
        """The 1-D mesh the merge is sharded over."""
        return self.device_mesh["data_parallel"]

    # --- the learned tensors are whole on every rank: average their gradients, save them whole
    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        grads = [p.grad for p in self.lightning_module.parameters() if p.requires_grad and p.grad is not None]
        if not grads or self.world_size == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.reduce(flat, reduce_op="mean")  # one all-reduce for all of them
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # the sharded frozen tensors come back from the pool; the rest is what the module keeps
        from torch.distributed.tensor import DTensor
        return {k: v for k, v in self.lightning_module.state_dict().items() if not isinstance(v, DTensor)}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=False)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return getattr(optimizer, "_optimizer", optimizer).state_dict()  # plain tensors: world-size free

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(state)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self.is_global_zero:  # one file, as a single process writes it
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return self.checkpoint_io.load_checkpoint(checkpoint_path, weights_only=weights_only)


def shard_module(module: Any, strategy: ShardedMergeStrategy) -> None:
    """Shard ``module.merged`` (an :class:`~adamerge.methods.adamerging.AdaMerging`) over the
    strategy's mesh, or say in one line why it stays whole on every rank."""
    merged = module.merged
    if getattr(merged, "sharded", False):
        return
    if module.needs_experts:
        raise ValueError(f"objective {module.objective!r} reads each expert's own features, computed on the whole "
                         "model; under ShardedMergeStrategy use an objective without experts (entropy, "
                         "entropy_of_mean, vocab_entropy_of_mean, cross_entropy), or trainer.strategy: ddp")
    if type(merged) is not MergedModel:
        rank_zero_info(f"adamerge: {type(merged).__name__} is not sharded ({type(module).__name__}'s merge keeps its "
                       f"tensors whole on each of the {strategy.world_size} ranks); its learned tensors are averaged "
                       "as under DDP")
        return
    blocks = list(module.loaded.layout.blocks) if module.loaded.layout is not None else []
    blocks = blocks or repeated_blocks(merged.module)  # e.g. Llama, whose MLP names the layout does not read
    if not blocks:
        raise ValueError(f"{type(module.loaded.encoder).__name__}: its pool's layout names no transformer blocks, "
                         "and the sharded merge gathers one block at a time; declare the pool's layout "
                         "(adamerge.models.layout.Layout) or use trainer.strategy: ddp")
    pool_tv = module.loaded.task_vectors
    shared = pool_tv.names == merged.task_vectors.names and all(
        a is b for a, b in zip(pool_tv.tensors, merged.task_vectors.tensors))
    merged.shard(strategy.mesh, blocks, recompute=strategy.recompute, offload=strategy.offload,
                 gather=strategy.gather)
    if shared:  # the pool's stacks are the whole tensors: point it at the shards, so the whole ones are freed
        pool_tv.tensors = list(merged.task_vectors.tensors)
    # a sharded run builds no expert's whole state (reference rows are compare's, on one process),
    # and the pool's builders hold the whole base: drop them so it is freed too
    module.loaded.expert_state = {}
    from ..engine.sharded import local_bytes
    held = local_bytes(merged.module)
    how = "FSDP2" if strategy.gather == "stored" else "merged rows gathered"
    rank_zero_info(f"adamerge: sharded over {strategy.world_size} processes ({how}; {len(blocks)} blocks + the "
                   f"root); rank 0 holds {held['task_vectors'] / 2**20:.1f} MiB of task vectors and "
                   f"{held['base'] / 2**20:.1f} MiB of base weights")
