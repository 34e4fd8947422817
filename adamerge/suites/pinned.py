"""Suite builds in a child process whose CPU kernels are pinned, so a suite is the same on every
x86 machine.

PyTorch, MKL and oneDNN pick their kernels by the CPU's instruction set: on a CPU with AVX-512
they run other kernels than on one with AVX2 only, and training the demo suite there gives
weights that differ by up to 2e-2 (after 1200 pretraining steps), enough to move three rows of
the demo table by one image (breadcrumbs, TSV-M, Iso-CTS, whose validation grids are near-ties;
measured 2026-12-06). Merging is not affected at that level (up to 1e-6 in merged weights, no
prediction changed): only the build is pinned. The variables are read when the libraries load,
so the build runs in a new process (``python -m adamerge.suites.build_child KIND SPEC OUT``) unless
this one already has them. CPUs without AVX2 (e.g. ARM) ignore them and may build other weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

# Caps of the kernels' instruction set: PyTorch's own, MKL's and oneDNN's.
PINNED_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pinned_here() -> bool:
    """Whether this process was started with :data:`PINNED_ISA`."""
    return all(os.environ.get(k) == v for k, v in PINNED_ISA.items())


def cpu_capability() -> str:
    """The instruction set PyTorch's CPU kernels run with here (e.g. ``AVX2``, ``AVX512``)."""
    import torch
    return str(torch.backends.cpu.get_cpu_capability())


def build_pinned(kind: str, spec: dict[str, Any], out: Path, build: Callable[[], Any],
                 progress: Callable[[str], None] | None) -> None:
    """Run ``build`` here if this process is pinned, else ``kind`` / ``spec`` -> ``out`` in a
    pinned child process (its progress lines go to this process's stdout when ``progress`` is
    given). A failed child raises ``RuntimeError`` with the last line it wrote to stderr."""
    if pinned_here():
        build()
        return
    cmd = [sys.executable, "-m", "adamerge.suites.build_child", kind, json.dumps(spec), str(out)]
    proc = subprocess.run(cmd, env={**os.environ, **PINNED_ISA}, stdout=None if progress else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeError(f"building the {kind} suite in {out} failed: {lines[-1] if lines else proc.returncode}")
