"""The AdaMerging Lightning module: learn merging coefficients by test-time entropy minimisation."""

from __future__ import annotations

from typing import Any, Literal, Mapping

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from ..data.datamodule import MultiTaskDataModule
from ..engine.merged_model import Granularity, MergedModel
from ..engine.objectives import entropy
from ..engine.task_vectors import DTYPES, TaskVectors, fingerprint_difference
from ..io.checkpoints import read_checkpoint
from ..models.pool import ModelPool
from ..report import evaluate

COEFFICIENTS_KEY = "merged.coefficients"


def images_of(batch: Any) -> torch.Tensor:
    """The image tensor of a batch that is ``images``, ``(images, labels, ...)`` or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["image"] if "image" in batch else next(iter(batch.values()))
    return batch[0]


class AdaMerging(L.LightningModule):
    """Task-wise or layer-wise AdaMerging.

    Args:
        pool: where the base encoder, the fine-tuned experts and the task heads come from.
        granularity: ``taskwise`` (one coefficient per task) or ``layerwise`` (one per task per
            parameter tensor).
        prior: initial coefficient (the paper uses 0.3).
        clamp: clamp coefficients to [0, 1] when merging.
        lr: Adam learning rate (the paper uses 1e-3).
        per_task_backward: back-propagate task by task through the shared merged weights, so
            peak activation memory is that of one task's batch instead of all K.
        trim: AdaMerging++: keep this fraction of each task vector's largest magnitudes, elect
            signs and drop disagreeing entries (TIES) before learning; ``None`` is plain
            AdaMerging, the paper's ++ uses 0.2.
        task_vector_dtype: storage dtype of the task vectors (float32, bfloat16, float16);
            ``None`` keeps the pool's.
        offload: keep task vectors in (pinned) CPU memory and stream them to the device per merge.
    """

    def __init__(self, pool: ModelPool, granularity: Granularity = "layerwise", prior: float = 0.3,
                 clamp: bool = True, lr: float = 1e-3, per_task_backward: bool = False,
                 trim: float | None = None,
                 task_vector_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
                 offload: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pool"])
        self.strict_loading = False  # frozen tensors are rebuilt from the pool, not the checkpoint
        loaded = pool.load()
        self.loaded = loaded
        tv = loaded.task_vectors
        if trim is not None:
            from .static import ties_task_vectors
            tv = ties_task_vectors(tv, keep=trim)
        if task_vector_dtype is not None:
            tv = tv.to(dtype=DTYPES[task_vector_dtype])
        if offload:
            tv = tv.to("cpu")
            if torch.cuda.is_available():
                tv = TaskVectors(tv.task_names, tv.names, [t.pin_memory() for t in tv.tensors], tv.meta)
        self.merged = MergedModel(loaded.encoder, tv, granularity=granularity, prior=prior,
                                  clamp=clamp, offload=offload)
        self.heads = nn.ModuleDict({t: h.requires_grad_(False) for t, h in loaded.heads.items()})
        self.fingerprint = tv.fingerprint()
        self.lr, self.per_task_backward = lr, per_task_backward
        self.metrics = nn.ModuleDict({t: MulticlassAccuracy(num_classes=self.num_classes(t), average="micro")
                                      for t in self.task_names})
        self._eval_params: dict[str, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------- helpers
    @property
    def task_names(self) -> list[str]:
        return self.merged.task_names

    def num_classes(self, task: str) -> int:
        """Output width of a task's head, found by probing its last linear layer."""
        head = self.heads[task]
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"cannot tell the class count of head {task!r}: no nn.Linear in it")
        return linears[-1].out_features

    def task_logits(self, images: dict[str, torch.Tensor],
                    params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits of each task's head on the merged encoder's features; one encoder call if possible."""
        tasks = list(images)
        shapes = {tuple(images[t].shape[1:]) for t in tasks}
        if len(shapes) == 1 and len(tasks) > 1:
            feats = self.merged(torch.cat([images[t] for t in tasks]), params=params)
            chunks = feats.split([images[t].shape[0] for t in tasks])
        else:
            chunks = [self.merged(images[t], params=params) for t in tasks]
        return {t: self.heads[t](f) for t, f in zip(tasks, chunks)}

    def _batch_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        missing = [t for t in self.task_names if t not in batch]
        if missing:
            raise ValueError(f"training batch has no data for tasks {missing}; got {list(batch)}")
        return {t: images_of(batch[t]) for t in self.task_names}

    # ------------------------------------------------------------------------------ train
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = self._batch_images(batch)
        params = self.merged.merged_parameters(reuse_buffers=True)  # one merge per step
        if not self.per_task_backward:
            ents = {t: entropy(z) for t, z in self.task_logits(images, params).items()}
            loss = torch.stack(list(ents.values())).sum()
            self._log_train(loss.detach(), {t: e.detach() for t, e in ents.items()})
            return loss
        # Task by task: gradients w.r.t. the merged tensors are accumulated, then pushed through
        # the merge once via a surrogate whose gradient w.r.t. the coefficients is exact.
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        grads = [torch.zeros_like(p) for p in leaves.values()]
        ents = {}
        for t in self.task_names:
            e = entropy(self.task_logits({t: images[t]}, leaves)[t])
            for acc, g in zip(grads, torch.autograd.grad(e, list(leaves.values()), allow_unused=True)):
                if g is not None:
                    acc.add_(g)
            ents[t] = e.detach()
        self._log_train(torch.stack(list(ents.values())).sum(), ents)
        return sum((p * g).sum() for p, g in zip(params.values(), grads))

    def _log_train(self, loss: torch.Tensor, ents: dict[str, torch.Tensor]) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # Every rank must take the same decision (a rank that raised alone would leave the
            # others waiting in the gradient all-reduce), and the logged value is the global one.
            loss = trainer.strategy.reduce(loss, reduce_op="mean")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite entropy {loss.item()} at step {self.global_step} "
                                     f"(per task: { {t: float(e) for t, e in ents.items()} }); the last "
                                     "good checkpoint is kept")
        self.log("train/entropy", loss, prog_bar=True)
        for t, e in ents.items():
            self.log(f"train/entropy/{t}", e)
        lam = self.merged.lambdas().detach()
        self.log_dict({"coef/mean": lam.mean(), "coef/min": lam.min(), "coef/max": lam.max()})
        for k, t in enumerate(self.task_names):
            self.log(f"coef/{t}", lam[:, k].mean())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After the (all-reduced) backward, before the step: a non-finite gradient would make
        # the coefficients NaN and every later checkpoint useless.
        grad = self.merged.coefficients.grad
        if grad is not None and not torch.isfinite(grad).all():
            raise FloatingPointError(f"non-finite coefficient gradient at step {self.global_step} "
                                     f"({int((~torch.isfinite(grad)).sum())} of {grad.numel()} "
                                     "entries); the last good checkpoint is kept")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.merged.coefficients], lr=self.lr)

    # -------------------------------------------------------------------------- evaluate
    def _start_eval(self) -> None:
        with torch.no_grad():
            self._eval_params = self.merged.merged_parameters()  # one merge per evaluation
        for m in self.metrics.values():
            m.reset()

    def _eval_step(self, batch: Any, dataloader_idx: int) -> None:
        task = self.task_names[dataloader_idx]
        x, y = batch[0], batch[1]
        n = self.num_classes(task)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n):
            raise ValueError(f"task {task!r}: label {int(y.max()) if int(y.max()) >= n else int(y.min())} "
                             f"is outside the head's {n} classes")
        logits = self.task_logits({task: x}, self._eval_params)[task]
        self.metrics[task].update(logits, y)

    def _end_eval(self, stage: str) -> dict[str, float]:
        accs = {t: float(m.compute()) * 100 for t, m in self.metrics.items() if m.update_called}
        # torchmetrics already reduced the counts over ranks: every rank logs the same value.
        for t, a in accs.items():
            self.log(f"{stage}/acc/{t}", a, sync_dist=True)
        if accs:
            self.log(f"{stage}/acc_avg", sum(accs.values()) / len(accs), prog_bar=True, sync_dist=True)
        self._eval_params = None
        self.last_accuracies = accs
        return accs

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    # -------------------------------------------------------------------- run set-up
    def setup(self, stage: str) -> None:
        """Check the data against the pool before any step, and keep DDP to the coefficients."""
        trainer = self.trainer
        dm = getattr(trainer, "datamodule", None)
        if isinstance(dm, MultiTaskDataModule):
            dm.select_tasks(self.task_names)
            splits = {"fit": [dm.adapt_split], "validate": [dm.eval_split],
                      "test": [dm.eval_split]}.get(stage, [])
            if stage == "fit" and trainer.limit_val_batches != 0:
                splits.append(dm.eval_split)
            dm.check({t: self.num_classes(t) for t in self.task_names}, splits)
        # DDP broadcasts every parameter and buffer at start-up and the buffers at every forward.
        # Only the coefficients differ between steps; every rank rebuilds the frozen weights from
        # the same files, so nothing else needs to travel.
        from torch.nn.parallel import DistributedDataParallel
        frozen = [n for n, _ in self.named_parameters() if n != COEFFICIENTS_KEY]
        frozen += [n for n, _ in self.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, frozen)

    def on_fit_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel):
            synced = [n for n, _ in self.named_parameters() if n not in wrapped.parameters_to_ignore]
            synced += [n for n, _ in self.named_buffers() if n not in wrapped.parameters_to_ignore]
            numel = sum(p.numel() for n, p in self.named_parameters() if n in synced)
            rank_zero_info(f"adamerge: DDP on {self.trainer.world_size} processes synchronises "
                           f"{synced} ({numel} values); frozen weights and buffers are not broadcast")

    def on_train_end(self) -> None:
        if self.trainer.world_size > 1:  # all ranks must hold the same coefficients
            every = self.all_gather(self.merged.coefficients.detach())
            spread = float((every - every[0:1]).abs().max())
            if spread > 0:
                raise RuntimeError(f"coefficients differ between DDP ranks by up to {spread:.3g}")
            rank_zero_info(f"adamerge: coefficients identical on all {self.trainer.world_size} ranks")

    @torch.no_grad()
    def accuracies(self, datasets: Mapping[str, Dataset], batch_size: int = 256) -> dict[str, float]:
        """Top-1 accuracy in percent per task of the merged model with its current coefficients
        (one merge, then :func:`adamerge.report.evaluate`; what ``adamerge compare`` reports)."""
        params = {k: v.detach() for k, v in self.merged.merged_parameters().items()}
        return evaluate(self.merged.module, params, dict(self.heads), datasets, batch_size,
                        device=self.merged.coefficients.device)

    # ------------------------------------------------------------------------ checkpoints
    def load_coefficients(self, path: str) -> dict[str, Any]:
        """Set the coefficients from an adamerge checkpoint file made on this pool; returns it.

        The file is read without unpickling code and checked with :func:`check_checkpoint`
        (task order, merged parameter names and shapes, weights hash, granularity).
        """
        checkpoint = read_checkpoint(path)
        check_checkpoint(checkpoint, self.fingerprint, tuple(self.merged.coefficients.shape),
                         source=str(path))
        with torch.no_grad():
            self.merged.coefficients.copy_(checkpoint["state_dict"][COEFFICIENTS_KEY])
        return checkpoint

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Only the coefficients: base weights, task vectors and heads come back from the pool.
        coeffs = checkpoint["state_dict"][COEFFICIENTS_KEY]
        if not torch.isfinite(coeffs).all():
            raise FloatingPointError(f"refusing to save non-finite coefficients at step {self.global_step}; "
                                     "the last good checkpoint is kept")
        checkpoint["state_dict"] = {COEFFICIENTS_KEY: coeffs}
        checkpoint["adamerge"] = {"fingerprint": self.fingerprint,
                                  "granularity": self.merged.granularity}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(checkpoint, self.fingerprint, tuple(self.merged.coefficients.shape))


def check_checkpoint(checkpoint: dict[str, Any], fingerprint: dict, coeff_shape: tuple[int, ...],
                     source: str = "checkpoint") -> None:
    """Refuse a checkpoint made on another model pool, naming the difference.

    The one check every path that consumes coefficients goes through (resume, validate, test,
    export): task order, merged parameter names and shapes, a hash of the task vectors (other
    files), the task-vector transform (e.g. TIES trimming) and the coefficient shape
    (granularity). Raises ``ValueError`` with a one-line message.

    Args:
        checkpoint: the loaded checkpoint dict (see :func:`adamerge.io.checkpoints.read_checkpoint`).
        fingerprint: ``TaskVectors.fingerprint()`` of the pool in use.
        coeff_shape: shape of the coefficients this run expects.
        source: how to name the checkpoint in messages (its path).
    """
    meta = checkpoint.get("adamerge")
    state = checkpoint.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict) or COEFFICIENTS_KEY not in state \
            or "fingerprint" not in meta:
        raise ValueError(f"{source} is not an adamerge checkpoint (no coefficients / fingerprint)")
    diff = fingerprint_difference(meta["fingerprint"], fingerprint)
    if diff:
        raise ValueError(f"{source} was made on a different model pool: {diff}")
    shape = tuple(checkpoint["state_dict"][COEFFICIENTS_KEY].shape)
    if shape != coeff_shape:
        raise ValueError(f"{source} holds {meta.get('granularity')} coefficients of shape {shape}, "
                         f"this run expects {coeff_shape}: use the same granularity")
