"""The fused merge sharded over processes: each rank keeps 1/W of the base and of every task vector.

Each transformer block of the base module becomes one unit (:class:`MergeUnit`) that owns its
share of the block's base parameters and of their stacked task vectors; so does each leaf module
outside the blocks with merged weights (embeddings, final norm, output layer); tied weights stay
together in the root unit. A unit's forward merges ``base + lambda @ tau`` with the fused merge of
:mod:`.merged_model`, runs its module on the merged weights and frees them after; with
``recompute`` (default) a block is re-run in the backward (activation checkpointing), so its
merged weights live only while it runs. Two ways to gather (``gather``):

* ``merged`` (default): each rank merges its rows and the merged rows are all-gathered (DTensor);
  the gradient comes back by reduce-scatter. ``N b`` bytes per gather.
* ``stored``: FSDP2's ``fully_shard`` gathers the unit's stored base and task vectors (task
  vectors sharded along the parameter's own dim 0) and each rank merges them whole;
  ``(b + K t) N`` bytes per gather.

The coefficients stay outside both: a plain ``[rows, K]`` tensor, the same on every rank, whose
gradient the Lightning strategy averages over the ranks (:class:`~adamerge.methods.sharding.
ShardedMergeStrategy`). The memory model per rank is in docs/usage.md, "Sharded merges".
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint


class SharedCoefficients:
    """The effective coefficients of the running forward, computed once by the root unit and read
    by the block units (a plain object: a module attribute would register the coefficients as a
    parameter of every unit, and FSDP2 would shard them), and the fused merge that applies them
    (``merge(lam, rows, bases, taus, outs, chunks)``: :class:`~.merged_model._Merge`'s ``apply``)."""

    def __init__(self, lambdas: Callable[[], torch.Tensor], merge: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        self.lambdas, self.merge = lambdas, merge
        self.current: torch.Tensor | None = None


class MergeUnit(nn.Module):
    """A part of the base module and the task vectors of the parameters it merges, in one of two
    storages (``mesh``):

    * ``None`` (``gather: stored``): the task vectors are frozen parameters of the unit, which
      FSDP2 (``fully_shard``) shards, gathers before the forward, with the part's base
      weights, and frees after; the unit merges the gathered tensors.
    * a device mesh (``gather: merged``): the unit keeps its rank's rows of each base weight and
      task vector ([rows of dim 0] and [K, rows, ...]; DTensor's ``Shard`` split, uneven sizes
      included), merges them locally and gathers the merged rows only (``DTensor.redistribute``);
      the gradient of the gathered weight comes back summed over the ranks and split by rows
      (a reduce-scatter: ``to_local(grad_placements=[Partial()])``), and each rank's coefficient
      gradient is its rows' share, which the strategy's all-reduce adds up.

    Args:
        part: the wrapped module (a transformer block, a leaf module, or the whole module for the
            root unit).
        names: the merged parameters of ``part``, by their names in ``part``.
        taus: their stacked task vectors, ``[K, *shape]`` each.
        rows: the coefficient row of each parameter (its first row when ``chunks`` splits it).
        chunks: rows per parameter (``split_qkv``; ``gather: stored`` only), or ``None``.
        shared: where the unit reads the running forward's coefficients.
        root: the root unit computes the coefficients at the start of each forward.
        recompute: re-run the part in the backward instead of keeping its merged weights.
        prefix: the part's name in the base module (``""`` for the root).
        mesh: the data-parallel mesh for ``gather: merged``; ``None`` for ``gather: stored``.
    """

    def __init__(self, part: nn.Module, names: Sequence[str], taus: Sequence[torch.Tensor], rows: Sequence[int],
                 chunks: Sequence[int] | None, shared: SharedCoefficients, root: bool = False,
                 recompute: bool = True, prefix: str = "", mesh: Any = None) -> None:
        super().__init__()
        self.part = part
        self.names = list(names)
        self.prefix, self.mesh = prefix, mesh
        self.register_buffer("rows", torch.tensor(list(rows), dtype=torch.long), persistent=False)
        self.chunks = tuple(chunks) if chunks is not None else None
        self.shared, self.root, self.recompute = shared, root, recompute
        if mesh is None:
            for i, tau in enumerate(taus):
                param = nn.Parameter(tau, requires_grad=False)
                param._adamerge_tau = True  # read by _placement
                self.register_parameter(f"tau{i}", param)
            return
        own = dict(part.named_parameters())
        self.shapes = [tuple(own[n].shape) for n in self.names]
        for i, (n, tau) in enumerate(zip(self.names, taus)):  # this rank's rows; the whole tensors are dropped
            self.register_buffer(f"base{i}", _rows(own[n].detach(), mesh, 0), persistent=False)
            self.register_buffer(f"tau{i}", _rows(tau, mesh, 1), persistent=False)

    def taus(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"tau{i}") for i in range(len(self.names)))

    def bases(self) -> tuple[torch.Tensor, ...]:
        """The base tensors the unit merges: gathered by FSDP2, or this rank's rows."""
        if self.mesh is None:
            own = dict(self.part.named_parameters())
            return tuple(own[n] for n in self.names)
        return tuple(getattr(self, f"base{i}") for i in range(len(self.names)))

    def merged(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """The whole merged tensors of this unit's parameters (``gather: stored``: its tensors
        must be gathered; ``gather: merged``: collective, every rank calls it)."""
        merged = self.shared.merge(lam, self.rows, self.bases(), self.taus(), None, self.chunks)
        if self.mesh is not None:
            merged = tuple(_gathered(m, self.mesh, shape) for m, shape in zip(merged, self.shapes))
        return dict(zip(self.names, merged))

    def _run(self, lam: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = functional_call(self.part, self.merged(lam), args, kwargs, strict=False)
        # FSDP2 (gather: stored) hooks the backward on the unit's output; an in-place op on a view of
        # the step's activations (a model's last-token slice) would bypass that hook: return it owned
        fsdp_view = self.mesh is None and isinstance(out, torch.Tensor) and out._is_view()
        return out.clone() if fsdp_view else out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.root:
            self.shared.current = self.shared.lambdas()
        lam = self.shared.current
        if lam is None:
            raise RuntimeError("a sharded block ran outside its model's forward: call the merged module, "
                               "not one of its blocks")
        if self.recompute and torch.is_grad_enabled() and lam.requires_grad:
            return checkpoint(self._run, lam, *args, use_reentrant=False, **kwargs)
        return self._run(lam, *args, **kwargs)


def _rows(tensor: torch.Tensor, mesh: Any, dim: int) -> torch.Tensor:
    """This rank's chunk of ``tensor`` along ``dim`` (DTensor's ``Shard`` split), as its own
    storage: only the chunk's pages of a memory-mapped tensor are read. A 0-d tensor (or a
    task-vector stack of one) stays whole."""
    from torch.distributed.tensor import Shard, distribute_tensor
    if tensor.dim() <= dim:
        return tensor.detach().clone()
    local = distribute_tensor(tensor.detach(), mesh, [Shard(dim)], src_data_rank=None).to_local()
    return local.clone(memory_format=torch.contiguous_format)  # a view would keep the whole storage alive


def _gathered(local: torch.Tensor, mesh: Any, shape: Sequence[int]) -> torch.Tensor:
    """The whole tensor from each rank's rows (an all-gather), whose gradient is the sum over the
    ranks of theirs, split back into rows (a reduce-scatter): the ranks ran different data."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    if len(shape) == 0:  # kept whole on every rank: its gradient is summed by the strategy's all-reduce
        return local
    stride = torch.empty(shape, device="meta").stride()
    whole = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)
    return whole.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])


def _placement(world: int) -> Callable[[nn.Parameter], Any]:
    """Task vectors ``[K, *shape]`` are sharded along the parameter's dim 0 (dim 1 of the stack),
    so every rank holds 1/W of every task's vector even when K < W, where that dim divides evenly
    (FSDP2 pads dim 0 only); everything else along dim 0."""
    from torch.distributed.tensor import Shard

    def place(param: nn.Parameter) -> Any:
        even = param.dim() > 1 and param.shape[1] % world == 0
        return Shard(1) if getattr(param, "_adamerge_tau", False) and even else Shard(0)
    return place


def _leaf_owners(module: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Parameters outside the blocks whose module is a leaf (an embedding, a norm, an output
    layer) and shares no tensor with another module: each such leaf is a unit of its own, gathered
    only while it runs (left at the root, an 8B model's embeddings and output layer would stay
    gathered for the whole step); tied weights stay at the root, which holds them together."""
    users: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), set()).add(name.rpartition(".")[0])
    out = {}
    for n in names:
        leaf = n.rpartition(".")[0]
        if not leaf or next(module.get_submodule(leaf).children(), None) is not None:
            continue
        if all(users[id(p)] == {leaf} for p in module.get_submodule(leaf).parameters()):
            out[n] = leaf
    return out


def shard_merge(module: nn.Module, names: Sequence[str], taus: Sequence[torch.Tensor], rows: Sequence[int],
                chunks: Sequence[int] | None, blocks: Sequence[str], shared: SharedCoefficients, mesh: Any,
                recompute: bool = True, offload: bool = False, gather: str = "merged") -> MergeUnit:
    """Wrap each of ``blocks`` of ``module`` (in place) and the module itself in :class:`MergeUnit`
    and shard them on ``mesh``; returns the root unit, which replaces the module as what is called.

    Args:
        module: the frozen base module (changed in place: its blocks become units, and with
            ``gather: merged`` its merged parameters become empty placeholders).
        names, taus, rows, chunks: the merged parameters (names in ``module``), their stacked task
            vectors, coefficient rows and row counts, as :class:`~.merged_model.MergedModel` has them.
        blocks: qualified names of the transformer blocks (a pool's ``layout.blocks``); a merged
            parameter outside every block belongs to its leaf module's unit (untied embeddings,
            norms, output layers: :func:`_leaf_owners`), else to the root unit.
        mesh: the 1-D data-parallel device mesh.
        offload: ``gather: stored`` only: keep the shards in host memory (FSDP2's
            ``CPUOffloadPolicy``), gathered to the accelerator per unit.
        gather: ``"merged"``: each rank merges its rows and the merged rows are gathered (one
            model's bytes per pass); ``"stored"``: FSDP2's ``fully_shard`` gathers the stored base
            and task vectors (1 + K models' bytes per pass) and each rank merges them whole.
    """
    if gather not in ("merged", "stored"):
        raise ValueError(f"gather must be 'merged' or 'stored', got {gather!r}")
    if gather == "merged" and (chunks is not None or offload):
        what = "split_qkv" if chunks is not None else "offload"
        raise ValueError(f"{what} needs gather: stored (FSDP2 gathers whole tensors); gather: merged "
                         "splits each parameter by rows")
    local_mesh = mesh if gather == "merged" else None
    chunk_of = list(chunks) if chunks is not None else [1] * len(names)
    owner = {n: next((b for b in blocks if n.startswith(b + ".")), "") for n in names}
    leaves = _leaf_owners(module, [n for n in names if not owner[n]])
    owner.update(leaves)
    units = []
    for block in [*blocks, *dict.fromkeys(leaves.values())]:
        mine = [i for i, n in enumerate(names) if owner[n] == block]
        if not mine:
            continue
        parent_name, _, child = block.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        unit = MergeUnit(parent.get_submodule(child), [names[i][len(block) + 1:] for i in mine],
                         [taus[i] for i in mine], [rows[i] for i in mine],
                         [chunk_of[i] for i in mine] if chunks is not None else None, shared, recompute=recompute,
                         prefix=block, mesh=local_mesh)
        setattr(parent, child, unit)  # ModuleList children are set by their index name too
        units.append(unit)
    rest = [i for i, n in enumerate(names) if not owner[n]]
    root = MergeUnit(module, [names[i] for i in rest], [taus[i] for i in rest], [rows[i] for i in rest],
                     [chunk_of[i] for i in rest] if chunks is not None else None, shared, root=True,
                     recompute=False, mesh=local_mesh)  # re-running the root would re-run everything
    if gather == "merged":
        _drop_whole(module, names)
        return root
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    options = {"mesh": mesh, "shard_placement_fn": _placement(mesh.size()),
               "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(root, **options)
    return root


def _drop_whole(module: nn.Module, names: Sequence[str]) -> None:
    """Replace each merged parameter of ``module`` (under every name a tied weight has) by one
    empty placeholder of its dtype and device: the units hold their rows, and the forward gets the
    merged tensors by name (a placeholder shared by tied names keeps them tied for functional_call)."""
    merged = {id(p) for n, p in module.named_parameters() if n in set(names)}
    placeholders: dict[int, nn.Parameter] = {}
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if id(p) in merged:
            holder = placeholders.setdefault(id(p), nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device),
                                                                 requires_grad=False))
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, holder)


def _units(root: MergeUnit) -> list[MergeUnit]:
    return [m for m in root.modules() if isinstance(m, MergeUnit)]


def _qualified(unit: MergeUnit, name: str) -> str:
    return f"{unit.prefix}.{name}" if unit.prefix else name


def unit_tensors(root: MergeUnit) -> dict[str, torch.Tensor]:
    """Each merged parameter's (sharded) task-vector stack, by its name in the base module."""
    return {_qualified(u, n): t for u in _units(root) for n, t in zip(u.names, u.taus())}


def _own_state(part: nn.Module) -> dict[str, torch.Tensor]:
    """``part``'s parameters and persistent buffers outside the units nested in it (each unit
    gathers its own), by name in ``part``; tied tensors under each of their names."""
    out: dict[str, torch.Tensor] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, t in module._parameters.items():
            if t is not None:
                out[prefix + name] = t
        for name, t in module._buffers.items():
            if t is not None and name not in module._non_persistent_buffers_set:
                out[prefix + name] = t
        for name, child in module._modules.items():
            if child is not None and not isinstance(child, MergeUnit):
                walk(child, f"{prefix}{name}.")
    walk(part, "")
    return out


@torch.no_grad()
def gathered_state_dict(root: MergeUnit) -> dict[str, torch.Tensor]:
    """The merged module's full state dict, in the base module's names (plain CPU tensors),
    gathered one unit at a time (collective: every rank calls it; each gets the whole dict)."""
    lam = root.shared.lambdas().detach()
    out = {}
    for unit in _units(root):
        stored = unit.mesh is None  # FSDP2 gathers the stored tensors; merged rows are gathered by merged()
        if stored:
            unit.unshard()
        try:
            own = dict(unit.part.named_parameters())
            # by tensor identity: a tied weight (an output layer sharing the embedding) is merged too
            merged = {id(own[n]): m for n, m in unit.merged(lam).items()}
            for name, t in _own_state(unit.part).items():
                value = merged.get(id(t), t)
                value = value.full_tensor() if hasattr(value, "full_tensor") else value
                out[_qualified(unit, name)] = value.detach().cpu().contiguous().clone()
        finally:
            if stored:
                unit.reshard()
    return out


def local_bytes(root: MergeUnit) -> dict[str, int]:
    """Bytes of the sharded tensors this rank holds: ``{"task_vectors", "base"}`` (what a
    sharded run keeps between steps; measured from the tensors, not computed from shapes)."""
    from torch.distributed.tensor import DTensor

    def size(p: torch.Tensor) -> int:
        local = p.to_local() if isinstance(p, DTensor) else p
        return local.numel() * local.element_size()

    out = {"task_vectors": 0, "base": 0}
    for unit in _units(root):
        out["task_vectors"] += sum(size(t) for t in unit.taus())
        out["base"] += sum(size(b) for b in (unit.bases() if unit.mesh is not None else
                                               [unit.part.get_parameter(n) for n in unit.names]))
    return out
