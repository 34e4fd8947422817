"""Where a model keeps its transformer parts, declared by its pool (as mergekit's
``_data/architectures/*.json`` declare each family's layer names).

Methods that act on parts of the model (WEMoE routes the MLPs, Twin-Merging the linear layers,
AdaRank masks the attention and MLP matrices) read :attr:`LoadedPool.layout` instead of guessing
layer names, so a new model family touches ``models/`` only: its pool passes ``mlp_children``
(or a whole :class:`Layout`) when the generic reading below does not find its MLPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

# Child names of an MLP's two linear layers under one parent: open_clip, timm / the suites, HF ViT/CLIP.
MLP_CHILDREN: tuple[tuple[str, str], ...] = (("c_fc", "c_proj"), ("fc1", "fc2"))
# Attention weights that a module reads as parameters, not through child nn.Linear calls.
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")


@dataclass(frozen=True)
class Layout:
    """The transformer parts of an encoder, by qualified name in the encoder.

    Attributes:
        blocks: the transformer blocks, in order.
        mlps: ``(first, second)`` linear layers of each MLP, in order (the first's input is the
            MLP's input; the second's output is its output).
        attention: the attention weight matrices (parameter names), in order.
    """

    blocks: tuple[str, ...] = ()
    mlps: tuple[tuple[str, str], ...] = ()
    attention: tuple[str, ...] = ()

    def matrices(self) -> list[str]:
        """Parameter names of every attention and MLP weight matrix (AdaRank's ``attn_mlp``)."""
        return [*self.attention, *(f"{layer}.weight" for pair in self.mlps for layer in pair)]


def find_mlps(module: nn.Module, children: Sequence[tuple[str, str]] = MLP_CHILDREN) -> list[tuple[str, str]]:
    """``(first, second)`` qualified names of the linear layer pairs of every MLP in ``module``:
    modules with two ``nn.Linear`` children named as in ``children`` (dotted paths allowed, e.g.
    BERT's ``("intermediate.dense", "output.dense")`` under each layer), in module order."""
    found = []
    for prefix, m in module.named_modules():
        for a, b in children:
            first, second = _child(m, a), _child(m, b)
            if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
                found.append((f"{prefix}.{a}" if prefix else a, f"{prefix}.{b}" if prefix else b))
    return found


def _child(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = dict(module.named_children()).get(part)
        if module is None:
            return None
    return module


def infer_layout(module: nn.Module, mlp_children: Sequence[tuple[str, str]] = MLP_CHILDREN) -> Layout:
    """The :class:`Layout` read off ``module``: blocks are the children of its ``nn.ModuleList``s
    that hold an MLP; MLPs by :func:`find_mlps`; attention matrices are, inside each block, the
    weights of ``nn.MultiheadAttention`` modules (``in_proj_weight``, ``out_proj.weight``) and of
    every other ``nn.Linear`` outside the MLPs (e.g. ``qkv`` / ``proj``, ``query`` ... ``dense``)."""
    mlps = find_mlps(module, mlp_children)
    mlp_layers = {n for pair in mlps for n in pair}
    lists = [n for n, m in module.named_modules() if isinstance(m, nn.ModuleList)]
    blocks = []
    for name in lists:
        for child, _ in module.get_submodule(name).named_children():
            block = f"{name}.{child}" if name else child
            if any(layer.startswith(f"{block}.") for layer in mlp_layers):
                blocks.append(block)
    attention: list[str] = []
    params = dict(module.named_parameters())
    for block in blocks:
        inside = module.get_submodule(block)
        mha = [n for n, m in inside.named_modules() if isinstance(m, nn.MultiheadAttention)]
        for n in mha:
            attention += [f"{block}.{n}.{w}" for w in _MHA_WEIGHTS if f"{block}.{n}.{w}" in params]
        for n, m in inside.named_modules():
            full = f"{block}.{n}"
            if isinstance(m, nn.Linear) and full not in mlp_layers and not any(n.startswith(f"{a}.") for a in mha):
                attention.append(f"{full}.weight")
    return Layout(tuple(blocks), tuple(mlps), tuple(attention))


def repeated_blocks(module: nn.Module) -> list[str]:
    """The children of ``module``'s longest ``nn.ModuleList`` (its stack of blocks, whatever its
    MLPs are called), by qualified name; empty when it has none."""
    lists = [(len(m), n) for n, m in module.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    _, name = max(lists, key=lambda x: x[0])
    return [f"{name}.{child}" if name else child for child, _ in module.get_submodule(name).named_children()]
