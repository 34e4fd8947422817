"""Time one WEMoE-routed MLP layer (forward + backward) in its formulations, in one process.

    python scripts/bench_wemoe_layer.py [--threads 2] [--batch 16] [--tokens 50]

Shapes default to ViT-B-32's ``c_fc`` (D 768 -> H 3072) with K = 8 task vectors and 16 samples.
Variants: ``shared`` (a plain linear layer with one weight for all samples: the floor),
``blocked:<values>`` (adamerge's :class:`RoutedLinearFunction`, samples' weights formed per
block of output rows of that many values), ``whole`` (all ``[B, H, D]`` weights at once) and
``x_tau`` (``x W0^T + sum_k r_bk x tau_k^T``: K times the FLOPs). Prints the best of 3 per variant.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from adamerge.methods.wemoe import RoutedLinearFunction


def best(fn, repeat: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=50)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--tasks", type=int, default=8)
    ns = p.parse_args()
    torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    b, n, d, h, k = ns.batch, ns.tokens, ns.dim, ns.hidden, ns.tasks
    x = torch.randn(b, n, d, requires_grad=True)
    r = torch.randn(b, k, requires_grad=True)
    w, bias = torch.randn(h, d) * 0.02, torch.zeros(h)
    tau, tau_b = torch.randn(k, h, d) * 1e-3, torch.zeros(k, h)
    g = torch.randn(b, n, h)

    def run(make):
        def step():
            x.grad = r.grad = None
            make().backward(g)
        return step

    variants = {"shared": run(lambda: F.linear(x, w, bias))}
    for numel in (1 << 20, 1 << 21, 1 << 22):
        rows = max(1, numel // (b * d))
        variants[f"blocked:2^{numel.bit_length() - 1}"] = run(
            lambda rows=rows: RoutedLinearFunction.apply(x, r, w, bias, tau, tau_b, rows))
    variants["whole"] = run(lambda: RoutedLinearFunction.apply(x, r, w, bias, tau, tau_b, h))
    variants["x_tau"] = run(lambda: F.linear(x, w, bias) + torch.einsum(
        "bk,bnkh->bnh", r, F.linear(x, tau.reshape(k * h, d)).view(b, n, k, h)))
    print(f"B {b} N {n} D {d} H {h} K {k}, {ns.threads} thread(s): forward + backward, best of 3")
    for name, fn in variants.items():
        print(f"{name:>14}: {best(fn):.3f} s")


if __name__ == "__main__":
    main()
