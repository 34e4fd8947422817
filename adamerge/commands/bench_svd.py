"""Time the SVD work of TSV-M and Iso-CTS: the straightforward code vs adamerge's.

    adamerge bench --svd [--blocks 12] [--tasks 8] [--alpha 1.0] [--methods tsv_m,iso_cts]
                         [--solvers gram,full,lowrank] [--out FILE]

Random task vectors with the shapes of CLIP ViT-B/32's visual tower (``--blocks`` residual blocks
of ``attn.in_proj_weight`` 2304x768, ``attn.out_proj.weight`` 768x768, ``mlp.c_fc.weight``
3072x768, ``mlp.c_proj.weight`` 768x3072, their biases and layer norms, plus ``conv1.weight``
768x3x32x32, 4-D, and the 1-D embeddings and norms, all averaged). Each task matrix is
``A diag(s) B`` with Gaussian ``A [m, r]``, ``B [r, n]`` scaled to unit-norm columns / rows and
``s_i = i^-alpha`` (``--alpha 0``: flat, a plain random matrix), so the spectrum decays roughly as
task vectors' do; ``--alpha`` sets how fast, which the randomized solver's accuracy depends on.

Variants, each timed once, wall clock (the cost scales linearly with ``--blocks``):

* ``straightforward``: the official algorithm as written, one ``torch.linalg.svd(full_matrices=False)``
  per task per matrix into zero-padded buffers, then one SVD per polar factor (TSV-M:
  ``TSVM_utils.py`` L320-375; Iso-CTS: ``iso.py`` L50-102), float32 with a float64 retry where
  float32 does not converge (the official code would stop there);
* ``gram`` (TSV-M's default): ``tsv_m_deltas(solver="gram")``, the top triplets from float64
  eigendecompositions of the Gram matrices (exact up to round-off);
* ``full``: :func:`adamerge.methods.svd_merges.tsv_m_deltas` with ``solver="full"`` (exact,
  batched per-task SVDs) / ``iso_cts_deltas`` (exact, with its structural shortcuts);
* ``lowrank`` (TSV-M only): ``tsv_m_deltas(solver="lowrank")`` (randomized top triplets).

For each: ``seconds``, ``ratio`` (over ``straightforward``: the issue's target is 0.5 or less),
``rel_dev`` (``||delta - delta_straightforward|| / ||delta_straightforward||`` over all matrices)
and ``max_rel_dev`` (the worst matrix), ``fp64_retries`` (float32 SVDs redone in float64). The last
stdout line is JSON (``--out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from ..engine import svd as svd_step
from ..engine.task_vectors import TaskVectors
from ..methods import svd_merges


def vit_b32_shapes(blocks: int, width: int = 768) -> dict[str, tuple[int, ...]]:
    """The visual tower's tensor shapes (``width`` 768 is ViT-B/32's; smaller ones for tests)."""
    WIDTH, QKV, MLP = width, 3 * width, 4 * width  # noqa: N806  (the shapes' usual names)
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (WIDTH, 3, 32, 32), "class_embedding": (WIDTH,),
                                          "ln_pre.weight": (WIDTH,), "ln_pre.bias": (WIDTH,)}
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        shapes.update({p + "ln_1.weight": (WIDTH,), p + "ln_1.bias": (WIDTH,),
                       p + "attn.in_proj_weight": (QKV, WIDTH), p + "attn.in_proj_bias": (QKV,),
                       p + "attn.out_proj.weight": (WIDTH, WIDTH), p + "attn.out_proj.bias": (WIDTH,),
                       p + "ln_2.weight": (WIDTH,), p + "ln_2.bias": (WIDTH,),
                       p + "mlp.c_fc.weight": (MLP, WIDTH), p + "mlp.c_fc.bias": (MLP,),
                       p + "mlp.c_proj.weight": (WIDTH, MLP), p + "mlp.c_proj.bias": (WIDTH,)})
    shapes.update({"ln_post.weight": (WIDTH,), "ln_post.bias": (WIDTH,)})
    return shapes


def random_task_vectors(blocks: int, tasks: int, alpha: float, seed: int = 0, width: int = 768) -> TaskVectors:
    g = torch.Generator().manual_seed(seed)
    names, tensors = [], []
    for name, shape in vit_b32_shapes(blocks, width).items():
        if len(shape) != 2:
            tensors.append(1e-3 * torch.randn(tasks, *shape, generator=g))
        else:
            m, n = shape
            r = min(m, n)
            s = torch.arange(1, r + 1, dtype=torch.float32) ** -alpha
            a = torch.randn(tasks, m, r, generator=g) / math.sqrt(m)
            b = torch.randn(tasks, r, n, generator=g) / math.sqrt(n)
            tensors.append(1e-2 * (a * s) @ b)
        names.append(name)
    return TaskVectors([f"task{k}" for k in range(tasks)], names, tensors)


# ------------------------------------------------------------------- the straightforward code
RETRIES = {"straightforward": 0}


def plain_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        RETRIES["straightforward"] += 1
        return tuple(t.float() for t in torch.linalg.svd(x.double(), full_matrices=False))


def straightforward_tsv_m(tv: TaskVectors) -> dict[str, torch.Tensor]:
    out = {}
    for name, tau in zip(tv.names, tv.tensors):
        if tau.dim() != 3:
            out[name] = tau.mean(0)
            continue
        k_tasks, m, n = tau.shape
        r = min(m, n)
        k = int(r * (1 / k_tasks))
        su, ss, sv = torch.zeros(m, r), torch.zeros(r), torch.zeros(r, n)
        for i in range(k_tasks):
            u, s, v = plain_svd(tau[i])
            su[:, i * k:(i + 1) * k], ss[i * k:(i + 1) * k], sv[i * k:(i + 1) * k] = u[:, :k], s[:k], v[:k]
        uu, _, vu = plain_svd(su)
        uv, _, vv = plain_svd(sv)
        out[name] = torch.linalg.multi_dot((uu, vu, torch.diag(ss), uv, vv))
    return out


def straightforward_iso_cts(tv: TaskVectors, fraction: float = 0.8) -> dict[str, torch.Tensor]:
    out = {}
    for name, tau in zip(tv.names, tv.tensors):
        if tau.dim() != 3:
            out[name] = tau.mean(0)
            continue
        k_tasks, m, n = tau.shape
        r = min(m, n)
        common = int(r * fraction)
        common = r - round((r - common) / k_tasks) * k_tasks
        p = int((r - common) / k_tasks)
        u, s, v = plain_svd(tau.sum(0))
        uc, sc, vc = u[:, :common], s[:common], v[:common]
        cu, cs, cv = torch.zeros(m, r), torch.zeros(r), torch.zeros(r, n)
        for i in range(k_tasks):
            a, b, d = plain_svd(tau[i] - uc @ uc.T @ tau[i])
            cu[:, i * p:(i + 1) * p], cs[i * p:(i + 1) * p], cv[i * p:(i + 1) * p] = a[:, :p], b[:p], d[:p]
        cu[:, k_tasks * p:], cs[k_tasks * p:], cv[k_tasks * p:] = uc, sc, vc
        a, _, b = plain_svd(cu)
        c, _, d = plain_svd(cv)
        out[name] = torch.linalg.multi_dot((a @ b, torch.diag(torch.ones_like(cs) * cs.mean()), c @ d))
    return out


# ------------------------------------------------------------------- timing
class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "float64" in record.getMessage():
            self.n += 1


def deviation(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
              names: list[str]) -> tuple[float, float]:
    """``||got - ref|| / ||ref||`` over ``names`` together, and the worst single name's."""
    num = den = worst = 0.0
    for n in names:
        d, r = float((got[n] - ref[n]).norm()) ** 2, float(ref[n].norm()) ** 2
        num, den, worst = num + d, den + r, max(worst, math.sqrt(d / max(r, 1e-30)))
    return math.sqrt(num / max(den, 1e-30)), worst


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="adamerge bench --svd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=12, help="residual blocks (ViT-B/32 has 12)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=1.0, help="spectrum decay s_i = i^-alpha")
    ap.add_argument("--methods", default="tsv_m,iso_cts")
    ap.add_argument("--solvers", default="gram,full,lowrank", help="TSV-M's (Iso-CTS: full only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=768, help="transformer width (ViT-B/32: 768; smaller for a quick check)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    tv = random_task_vectors(args.blocks, args.tasks, args.alpha, args.seed, args.width)
    matrices = svd_step.matrix_names(tv, svd_merges.DEFAULT_EXCLUDE)
    counter = _Count()
    logging.getLogger("adamerge.engine.svd").addHandler(counter)
    logging.getLogger("adamerge.engine.svd").setLevel(logging.INFO)
    # (the straightforward code, ours) per method, named after the first (``straightforward_<method>``)
    pairs = ((straightforward_tsv_m, lambda solver: svd_merges.tsv_m_deltas(tv, solver=solver)),
             (straightforward_iso_cts, lambda solver: svd_merges.iso_cts_deltas(tv)))
    plain = {f.__name__.removeprefix("straightforward_"): f for f, _ in pairs}
    ours = {f.__name__.removeprefix("straightforward_"): g for f, g in pairs}
    result: dict = {"config": {"blocks": args.blocks, "tasks": args.tasks, "alpha": args.alpha, "width": args.width,
                               "matrices": len(matrices), "threads": torch.get_num_threads(),
                               "torch": torch.__version__}}
    for method in args.methods.split(","):
        RETRIES["straightforward"] = 0
        t0 = time.perf_counter()
        ref = plain[method](tv)
        base_s = time.perf_counter() - t0
        row = {"straightforward": {"seconds": round(base_s, 2), "fp64_retries": RETRIES["straightforward"]}}
        for solver in args.solvers.split(",") if method == "tsv_m" else ["full"]:
            svd_step.clear_memo()
            counter.n = 0
            t0 = time.perf_counter()
            got = ours[method](solver)
            sec = time.perf_counter() - t0
            dev, worst = deviation(got, ref, matrices)
            row[solver] = {"seconds": round(sec, 2), "ratio": round(sec / base_s, 3),
                           "rel_dev": float(f"{dev:.3g}"), "max_rel_dev": float(f"{worst:.3g}"),
                           "fp64_retries": counter.n}
            del got
        svd_step.clear_memo()
        result[method] = row
        print(method, json.dumps(row), flush=True)
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
