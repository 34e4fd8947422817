"""``adamerge bench``: how far one AdaMerging step is from the physical limit.

The variants run on the same encoder, the same K x B images and the same frozen heads:

* ``limit``: a plain forward and backward of the encoder on all K x B images, with gradients
  w.r.t. its weights: what any training step on this batch costs at least;
* ``adamerge``: adamerge's real training step of a learned method of the registry (``--method``,
  default ``adamerging_layerwise``: :meth:`AdaMerging.training_step`, backward, Adam);
* ``naive``: a step written the way the original AdaMerging code works: for every task batch a
  re-merge with a Python loop over parameters and tasks, a separate forward, and gradients for
  every task-vector tensor;
* ``surgery`` / ``tinting``: the steps of ``adamerging_layerwise_surgery`` and ``tinting``, whose
  objectives read each task expert's features of the batch: computed once per image and cached
  (after warm-up every image of the fixed benchmark batch is cached, as every image is after a
  run's first pass over the adaptation data); ``surgery_uncached`` recomputes them each step (K
  extra expert forwards), which shows what the cache saves;
* ``trainer``: the ``adamerge`` step run by a real Lightning ``Trainer`` (fit loop, hooks,
  TensorBoard logger), one whole loop iteration per timed step (:func:`trainer_step`);
* ``wemoe`` / ``wemoe_batch`` / ``adarank``: the steps of ``wemoe`` (per-sample routed MLP
  task vectors; ``wemoe_batch``: one routing vector per task batch, ``batch_reduce``) and
  ``adarank`` (masks over the task vectors' singular components; its SVD is computed once when
  the variant is built, not timed).

``adamerge bench --svd [--blocks 12] [-h]`` times instead the SVD step of the static merges TSV-M
and Iso-CTS on random task vectors of ViT-B/32's shapes, ours against the straightforward code
(:mod:`adamerge.commands.bench_svd`).

Timings are interleaved (limit, adamerge, naive, limit, ...) after warm-up, and the median of
``--steps`` is reported. Peak memory is measured per variant: on CPU in a child process that
builds only what that variant needs and runs two steps (first, before anything is built for the
timings): ``peak_rss_mb`` is its peak resident set, ``step_rss_mb`` the peak of the steps over
what was resident once the model and task vectors were built (activations, gradients, merge
buffers, optimizer state); on GPU with ``torch.cuda.max_memory_allocated``. The last stdout
line is JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Sequence

import lightning as L
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from ..engine.objectives import entropy
from ..engine.task_vectors import DTYPES, TaskVectors
from ..methods import registry
from ..models.pool import LoadedPool, PreloadedPool

# variant -> (learned method of the registry, expert features cached, hyper-parameters set):
# Surgery cached and not, every method the registry marks for the bench (``Method.bench``) under
# its own name, and WEMoE with FusionBench's batch-reduced routing.
ADD_ONS = {"surgery": ("adamerging_layerwise_surgery", True, {}),
           "surgery_uncached": ("adamerging_layerwise_surgery", False, {}),
           "surgery_miss": ("adamerging_layerwise_surgery", "miss", {}),
           **{name: (name, True, {}) for name in registry.names("learned") if registry.get(name).bench},
           "wemoe_batch": ("wemoe", True, {"batch_reduce": True})}
VARIANTS = ("limit", "adamerge", "naive", *ADD_ONS, "miss_bound", "trainer")
CLASSES = 10  # classes per task head: the head's cost is negligible next to the encoder's


def build_encoder(model: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """``(encoder, image shape, feature width)``: ``tiny`` (a small TinyViT) or an open_clip
    architecture name (its image tower, random weights, nothing downloaded)."""
    if model == "tiny":
        from ..suites.synthetic import TinyViT
        return TinyViT(image_size=16, dim=32, depth=2, heads=2, out_dim=32), (1, 16, 16), 32
    import open_clip
    if model not in open_clip.list_models():
        raise ValueError(f"unknown model {model!r}: use 'tiny' or an open_clip architecture "
                         f"such as ViT-B-32, ViT-B-16, ViT-L-14")
    visual = open_clip.create_model(model).visual
    size = visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return visual, (3, *size), int(visual.output_dim)


def build_pool(model: str, tasks: int, seed: int = 0, with_task_vectors: bool = True) -> tuple[LoadedPool, tuple[int, ...]]:
    """A pool of ``model`` with ``tasks`` random task vectors (scale 1e-3) and random heads."""
    torch.manual_seed(seed)
    encoder, image_shape, width = build_encoder(model)
    encoder.eval().requires_grad_(False)
    names = [n for n, p in encoder.named_parameters() if p.is_floating_point()]
    params = dict(encoder.named_parameters())
    task_names = [f"task{k}" for k in range(tasks)]
    tensors = [torch.randn(tasks if with_task_vectors else 1, *params[n].shape) * 1e-3 for n in names]
    if not with_task_vectors:  # the limit needs no task vectors: expand a 1-row tensor (no memory)
        tensors = [t.expand(tasks, *t.shape[1:]) for t in tensors]
    tv = TaskVectors(task_names, names, tensors, {})
    heads = {t: nn.Linear(width, CLASSES, bias=False) for t in task_names}
    return LoadedPool(encoder, tv, heads), image_shape


def make_batch(tasks: list[str], batch: int, image_shape: tuple[int, ...], device: torch.device,
               seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(batch, *image_shape, generator=g).to(device) for t in tasks}


# ------------------------------------------------------------------------------ variants
def limit_step(loaded: LoadedPool, device: torch.device) -> Callable[[dict], None]:
    """Plain forward + backward of the encoder on all images, gradients w.r.t. its weights."""
    enc = loaded.encoder.to(device)
    heads = {t: h.to(device) for t, h in loaded.heads.items()}
    weights = {n: p.detach().requires_grad_() for n, p in enc.named_parameters() if p.is_floating_point()}

    def step(images: dict[str, torch.Tensor]) -> None:
        feats = functional_call(enc, weights, (torch.cat(list(images.values())),), strict=False)
        chunks = feats.split([x.shape[0] for x in images.values()])
        loss = sum(entropy(heads[t](f)) for t, f in zip(images, chunks))
        torch.autograd.grad(loss, list(weights.values()))
    return step


def method_hparams(ns: argparse.Namespace) -> dict:
    """The hyper-parameters of ``--method`` (registry defaults, then this command's options)."""
    overrides = {"per_task_backward": ns.per_task_backward, "task_vector_dtype": ns.task_vector_dtype}
    if ns.granularity is not None:
        overrides["granularity"] = ns.granularity
    return registry.get(ns.method).resolve(overrides)


def adamerge_step(loaded: LoadedPool, device: torch.device, method: str, hparams: dict,
                  cache: bool | str = True, steps: int = 1) -> tuple[Callable[[dict], None], "L.LightningModule"]:
    """The training step of a learned method of the registry, optimizer included. The images
    carry their indices (0..B-1) as the adaptation stream's do; methods that read the experts'
    features get the batch's images as their adaptation data (``cache``: keep those features).
    ``cache="miss"``: every step's images are new to the cache (indices ``s*B .. (s+1)*B-1`` of
    an adaptation set of ``steps`` batches, computed as the stream's first pass computes them:
    the batch in hand is the unit), what a step costs before the run has seen its images."""
    module = registry.get(method).build(PreloadedPool(loaded), **hparams).to(device)
    module.train()
    opt = module.configure_optimizers()
    state = {"step": 0}

    def step(images: dict[str, torch.Tensor]) -> None:
        b = next(iter(images.values())).shape[0]
        if "indices" not in state:
            n = b * steps if cache == "miss" else b
            data = {t: TensorDataset(x.cpu().repeat(n // b, *[1] * (x.dim() - 1))) for t, x in images.items()}
            units = (lambda task, i: range(i // b * b, i // b * b + b)) if cache == "miss" else None
            module.use_adaptation_data(data, cache=bool(cache), units=units)
            state["indices"] = {t: torch.arange(x.shape[0]) for t, x in images.items()}
        first = state["step"] * b if cache == "miss" else 0
        state["step"] += 1
        batch = {t: (x, state["indices"][t] + first) for t, x in images.items()}
        opt.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        opt.step()
    return step, module


def trainer_step(loaded: LoadedPool, device: torch.device, method: str, hparams: dict
                 ) -> tuple[Callable[[dict], None], Callable[[], None], "L.LightningModule"]:
    """The same training step as ``adamerge``, run by a real Lightning ``Trainer`` (its fit loop,
    hooks, TensorBoard logger in a temporary folder, the module's ``self.log`` calls) in a
    background thread, one step per call: a callback holds the loop at the start of each batch
    until the call lets it go, and the call returns when the loop reaches the next batch, so the
    time of a call is a whole iteration of the fit loop (data fetch and after-batch hooks
    included). Returns ``(step, stop, module)``; ``stop`` ends the fit and joins the thread."""
    import tempfile
    import threading

    from lightning.pytorch.loggers import TensorBoardLogger
    module = registry.get(method).build(PreloadedPool(loaded), **hparams).to(device)
    go, done, state = threading.Semaphore(0), threading.Semaphore(0), {"started": False, "batch": None}
    folder = tempfile.TemporaryDirectory(prefix="adamerge-bench-")

    class Gate(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if state["started"]:
                done.release()  # the previous iteration is over
            state["started"] = True
            go.acquire()

    def batches():
        while True:
            yield state["batch"]

    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=-1, max_epochs=-1,
                        logger=TensorBoardLogger(folder.name, name="bench"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Gate()])
    errors: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit(module, train_dataloaders=batches())
        except BaseException as e:  # re-raised by the next call
            errors.append(e)
            done.release()

    thread = threading.Thread(target=fit, daemon=True)

    def step(images: dict[str, torch.Tensor]) -> None:
        if state["batch"] is None:
            state["batch"] = {t: (x, torch.arange(x.shape[0])) for t, x in images.items()}
            thread.start()
        go.release()
        done.acquire()
        if errors:
            raise RuntimeError(f"the Trainer variant failed: {errors[0]!r}") from errors[0]

    def stop() -> None:
        if thread.is_alive():
            trainer.should_stop = True
            go.release()
            thread.join(timeout=600)
        folder.cleanup()
    return step, stop, module


def miss_bound_step(loaded: LoadedPool, device: torch.device) -> Callable[[dict], None]:
    """What a Surgery step on unseen images cannot do without: each task's expert forward on its
    batch (the experts' weights already formed) and one forward of the merged encoder on all
    tasks' images, without gradients (its coefficients are fixed)."""
    enc = loaded.encoder.to(device)
    tv = loaded.task_vectors
    params = dict(enc.named_parameters())
    with torch.no_grad():
        experts = {t: {n: params[n].detach() + tau[k].to(device) for n, tau in zip(tv.names, tv.tensors)}
                   for k, t in enumerate(tv.task_names)}
        merged = {n: params[n].detach() + 0.3 * tau.to(device).sum(0) for n, tau in zip(tv.names, tv.tensors)}

    @torch.no_grad()
    def step(images: dict[str, torch.Tensor]) -> None:
        for t, x in images.items():
            functional_call(enc, experts[t], (x,), strict=False)
        functional_call(enc, merged, (torch.cat(list(images.values())),), strict=False)
    return step


def add_on_hparams(ns: argparse.Namespace, variant: str) -> dict:
    """Hyper-parameters of an add-on variant's method (registry defaults, this command's options;
    an option the method does not have is an error only when it is set, e.g.
    ``--per-task-backward`` for Twin-Merging, whose router step has no per-task mode)."""
    method = registry.get(ADD_ONS[variant][0])
    options = {"per_task_backward": ns.per_task_backward, "task_vector_dtype": ns.task_vector_dtype}
    known = method.defaults()
    unsupported = [k for k, v in options.items() if k not in known and v not in (None, False)]
    if unsupported:
        raise ValueError(f"variant {variant!r} ({method.name}) has no {', '.join(unsupported)}; "
                         "drop the option or the variant")
    return method.resolve({**{k: v for k, v in options.items() if k in known}, **ADD_ONS[variant][2]})


def naive_step(loaded: LoadedPool, device: torch.device, granularity: str) -> Callable[[dict], None]:
    """The original code's shape: per task batch, re-merge parameter by parameter and task by
    task, forward that task alone, and back-propagate into every task-vector tensor too."""
    enc = loaded.encoder.to(device)
    heads = {t: h.to(device) for t, h in loaded.heads.items()}
    tv = loaded.task_vectors
    base = [dict(enc.named_parameters())[n].detach() for n in tv.names]
    taus = [[t[k].detach().clone().to(device).requires_grad_() for k in range(tv.num_tasks)]
            for t in tv.tensors]  # one tensor per (parameter, task), as the original keeps them
    rows = tv.num_params if granularity == "layerwise" else 1
    lam = torch.full((rows, tv.num_tasks), 0.3, device=device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=1e-3)

    def step(images: dict[str, torch.Tensor]) -> None:
        opt.zero_grad(set_to_none=True)
        for t, x in images.items():
            merged = {}
            for p, name in enumerate(tv.names):
                w = base[p]
                for k in range(tv.num_tasks):
                    w = w + lam[p if rows > 1 else 0, k].clamp(0, 1) * taus[p][k]
                merged[name] = w
            entropy(heads[t](functional_call(enc, merged, (x,), strict=False))).backward()
        opt.step()
        for row in taus:
            for tau in row:
                tau.grad = None
    return step


# ---------------------------------------------------------------------------------- run
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def status_mb(field: str) -> float | None:
    """A memory figure of this process from Linux's /proc/self/status (``VmRSS``, ``VmHWM``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    """Peak resident set of this process. Linux's VmHWM, which starts afresh at exec (ru_maxrss
    would carry the parent's peak into the child)."""
    peak = status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the VmHWM count at the current resident set (Linux: ``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _variant_fn(variant: str, ns: argparse.Namespace, device: torch.device):
    loaded, shape = build_pool(ns.model, ns.tasks, with_task_vectors=variant != "limit")
    if variant == "limit":
        fn = limit_step(loaded, device)
    elif variant == "adamerge":
        fn, _ = adamerge_step(loaded, device, ns.method, method_hparams(ns))
    elif variant in ADD_ONS:
        fn, _ = adamerge_step(loaded, device, ADD_ONS[variant][0], add_on_hparams(ns, variant),
                              cache=ADD_ONS[variant][1], steps=ns.warmup + ns.steps + 2)
    elif variant == "miss_bound":
        fn = miss_bound_step(loaded, device)
    elif variant == "trainer":
        fn, _, _ = trainer_step(loaded, device, ns.method, method_hparams(ns))
    else:
        fn = naive_step(loaded, device, method_hparams(ns)["granularity"])
    return fn, make_batch(loaded.task_vectors.task_names, ns.batch, shape, device)


def task_vector_bytes(task_vectors: TaskVectors) -> int:
    """Bytes of stacked task vectors as stored."""
    return sum(t.numel() * t.element_size() for t in task_vectors.tensors)


def _autocast(ns: argparse.Namespace, device: torch.device):
    if ns.precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def run_child(ns: argparse.Namespace) -> dict:
    """Peak memory of one variant in a fresh process (CPU: resident set includes its build)."""
    device = torch.device(ns.device)
    fn, images = _variant_fn(ns.child, ns, device)
    with _autocast(ns, device):
        build_peak = _peak_rss_mb()
        resident = status_mb("VmRSS") if reset_peak_rss() else None
        for _ in range(2):
            fn(images)
    step_peak = _peak_rss_mb()
    # step_rss_mb: what the steps need on top of the built model and task vectors
    return {"variant": ns.child, "peak_rss_mb": round(max(build_peak, step_peak), 1),
            "step_rss_mb": None if resident is None else round(step_peak - resident, 1)}


def run(ns: argparse.Namespace, say: Callable[[str], None]) -> dict:
    device = torch.device(ns.device)
    variants = list(ns.variants)
    memory: dict[str, dict[str, float]] = {}
    if device.type == "cpu" and ns.memory:
        # First, while this process holds nothing big: the children need the RAM (the naive
        # variant alone peaks near 14 GB on ViT-B-32 x 8), and freed memory is not always
        # returned to the system by the allocator.
        for v in variants:
            say(f"peak memory of {v} (separate process)")
            cmd = [sys.executable, "-m", "adamerge.commands.bench", *_child_args(ns, v)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"memory child for {v} failed (exit {res.returncode}): "
                                   f"{res.stderr.strip()[-500:]}")
            memory[v] = json.loads(res.stdout.strip().splitlines()[-1])
    hparams = method_hparams(ns)
    say(f"building {ns.model} with {ns.tasks} task vectors on {device}")
    loaded, shape = build_pool(ns.model, ns.tasks)
    images = make_batch(loaded.task_vectors.task_names, ns.batch, shape, device)
    fns: dict[str, Callable] = {}
    stops: dict[str, Callable[[], None]] = {}
    for v in variants:
        if v == "limit":
            fns[v] = limit_step(loaded, device)
        elif v == "adamerge":
            fns[v], module = adamerge_step(loaded, device, ns.method, hparams)
        elif v in ADD_ONS:
            fns[v], _ = adamerge_step(loaded, device, ADD_ONS[v][0], add_on_hparams(ns, v),
                                      cache=ADD_ONS[v][1], steps=ns.warmup + ns.steps + 2)
        elif v == "miss_bound":
            fns[v] = miss_bound_step(loaded, device)
        elif v == "trainer":
            fns[v], stops[v], _ = trainer_step(loaded, device, ns.method, hparams)
        else:
            fns[v] = naive_step(loaded, device, hparams["granularity"])
    # what adamerge really holds (its module converts the dtype); else what it would hold
    stored_bytes = task_vector_bytes(module.merged.task_vectors if "adamerge" in fns else (
        loaded.task_vectors.to(dtype=DTYPES[ns.task_vector_dtype]) if ns.task_vector_dtype else loaded.task_vectors))
    times: dict[str, list[float]] = {v: [] for v in variants}
    peak_cuda: dict[str, float] = {}
    last: dict[str, float] = {}
    total = ns.warmup + ns.steps
    with _autocast(ns, device):
        for i in range(total):
            for v in variants:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                t0 = time.perf_counter()
                fns[v](images)
                _sync(device)
                dt = time.perf_counter() - t0
                last[v] = dt
                if i >= ns.warmup:
                    times[v].append(dt)
                if device.type == "cuda":
                    peak_cuda[v] = max(peak_cuda.get(v, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
            say(f"step {i + 1}/{total}{' (warm-up)' if i < ns.warmup else ''}: "
                + ", ".join(f"{v} {last[v]:.3f} s" for v in variants))
    med = {v: statistics.median(times[v]) for v in variants}
    out: dict = {"model": ns.model, "tasks": ns.tasks, "batch": ns.batch, "method": ns.method,
                 "granularity": hparams["granularity"],
                 "device": str(device), "precision": ns.precision, "steps": ns.steps,
                 "per_task_backward": ns.per_task_backward,
                 "task_vector_dtype": ns.task_vector_dtype or "float32",
                 "task_vector_bytes": stored_bytes,
                 "torch": torch.__version__, "threads": torch.get_num_threads()}
    for v in variants:
        out[f"{v}_s"] = round(med[v], 6)  # microseconds: a tiny model steps in milliseconds
        out[f"{v}_s_range"] = [round(min(times[v]), 6), round(max(times[v]), 6)]
    for name, num, den in ratios(variants):
        # the ratio of the medians, and the range of the ratios of steps timed side by side
        each = [a / b for a, b in zip(times[num], times[den])]
        out[name] = round(med[num] / med[den], 3)
        out[f"{name}_range"] = [round(min(each), 3), round(max(each), 3)]
    if ns.profile:
        out["profile"] = profile_steps({v: f for v, f in fns.items() if v not in stops}, images, device,
                                       ns.profile, say)
    for stop in stops.values():
        stop()
    if device.type == "cuda":
        out["peak_cuda_mb"] = {v: round(m, 1) for v, m in peak_cuda.items()}
    elif memory:
        out["peak_rss_mb"] = {v: m["peak_rss_mb"] for v, m in memory.items()}
        out["step_rss_mb"] = {v: m["step_rss_mb"] for v, m in memory.items()}
    return out


def ratios(variants: Sequence[str]) -> list[tuple[str, str, str]]:
    """The ratios ``run`` reports, ``(name, numerator, denominator)``, among ``variants``."""
    out = [("adamerge_over_limit", "adamerge", "limit"), ("naive_over_adamerge", "naive", "adamerge"),
           ("trainer_over_limit", "trainer", "limit"), ("trainer_over_adamerge", "trainer", "adamerge")]
    out += [(f"{v}_over_adamerging", v, "adamerge") for v in ADD_ONS if v not in ("surgery_uncached", "surgery_miss")]
    out += [("surgery_uncached_over_cached", "surgery_uncached", "surgery"),
            ("surgery_miss_over_bound", "surgery_miss", "miss_bound"),
            ("surgery_miss_over_cached", "surgery_miss", "surgery")]
    return [r for r in out if r[1] in variants and r[2] in variants]


def profile_steps(fns: dict[str, Callable], images: dict[str, torch.Tensor], device: torch.device,
                  top: int, say: Callable[[str], None]) -> dict[str, list[dict]]:
    """One step of each variant under ``torch.profiler``: the ``top`` operators by their own
    (self) time, printed and returned (``{variant: [{name, self_ms, calls}]}``)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for v, fn in fns.items():
        with profile(activities=activities) as prof:
            fn(images)
            _sync(device)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        rows = [{"name": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count}
                for e in events[:top]]
        say(f"profile of one {v} step: {total:.0f} ms of operator self time; top {top}:")
        for r in rows:
            say(f"  {r['self_ms']:>9.1f} ms {r['calls']:>6} x  {r['name']}")
        out[v] = rows
    return out


def _child_args(ns: argparse.Namespace, variant: str) -> list[str]:
    args = ["--model", ns.model, "--tasks", str(ns.tasks), "--batch", str(ns.batch),
            "--method", ns.method, "--device", ns.device, "--precision", ns.precision,
            "--child", variant]
    if ns.granularity:
        args += ["--granularity", ns.granularity]
    if ns.per_task_backward:
        args.append("--per-task-backward")
    if ns.task_vector_dtype:
        args += ["--task-vector-dtype", ns.task_vector_dtype]
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adamerge bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32",
                   help="open_clip architecture (random weights, no download) or 'tiny' (default: ViT-B-32)")
    p.add_argument("--tasks", "-K", type=int, default=8, help="number of task vectors K (default: 8)")
    p.add_argument("--batch", "-B", type=int, default=2, help="images per task per step (default: 2)")
    learned = registry.names("learned")
    p.add_argument("--method", choices=learned, default="adamerging_layerwise", metavar="METHOD",
                   help=f"learned method of the registry whose step is timed: {', '.join(learned)} "
                        "(default: adamerging_layerwise)")
    p.add_argument("--granularity", choices=["layerwise", "taskwise"], default=None,
                   help="override the method's coefficients: per task per parameter tensor, or per "
                        "task (default: the method's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant; the median is reported (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first (default: 1)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="which variants to run (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--precision", choices=["32", "bf16-mixed"], default="32",
                   help="bf16-mixed: every variant under bf16 autocast (for GPUs) (default: 32)")
    p.add_argument("--task-vector-dtype", choices=list(DTYPES), default=None,
                   help="storage dtype of adamerge's task vectors (default: float32)")
    p.add_argument("--per-task-backward", action="store_true",
                   help="adamerge back-propagates task by task (activation memory of one task)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="CPU: skip the per-variant peak-memory child processes")
    p.add_argument("--profile", type=int, nargs="?", const=15, default=0, metavar="TOP",
                   help="after the timings, profile one step of each variant (torch.profiler) and print "
                        "its TOP operators by self time (default TOP: 15)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return p


def bench_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``adamerge bench`` and ``scripts/benchmark.py``; ``--svd`` times the SVD
    step of TSV-M and Iso-CTS instead (:mod:`adamerge.commands.bench_svd`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if "--svd" in args:
        from .bench_svd import main as svd_main
        svd_main([a for a in args if a != "--svd"])
        return
    ns = parser().parse_args(args)
    if ns.tasks < 1 or ns.batch < 1 or ns.steps < 1 or ns.warmup < 0:
        parser().error(f"--tasks, --batch and --steps must be >= 1 and --warmup >= 0; got "
                       f"K={ns.tasks} B={ns.batch} steps={ns.steps} warmup={ns.warmup}")
    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        parser().error(f"--device {ns.device}: CUDA is not available on this machine")
    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached here
    if ns.child:
        print(json.dumps(run_child(ns)))
        return
    say = lambda s: print(s, file=sys.stderr, flush=True)
    print(json.dumps(run(ns, say)))


if __name__ == "__main__":
    bench_main()
