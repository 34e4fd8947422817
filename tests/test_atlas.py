"""aTLAS few-shot (issue 31): coefficients over the OTHER tasks' vectors, learned on the target's
labeled shots (``adapt_tasks: unseen``), with AdamW, weight decay, a cosine schedule and
gradient-norm clipping; the defaults (Adam, constant, merged tasks only) unchanged."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from pathlib import Path

import adamerge.suites.synthetic as synthetic
from adamerge import AdaMerging, MultiTaskDataModule
from adamerge.methods import WEMoE, registry
from adamerge.models.pool import PreloadedPool
from adamerge.suites.synthetic import SuitePool, SuiteSource
from test_adamerging import trainer

ROOT = Path(__file__).resolve().parents[1]
TARGET = "gratings"  # the tiny suite's third task: the aTLAS target here
ATLAS = {"granularity": "layerwise", "objective": "cross_entropy", "prior": 0.0, "clamp": False, "lr": 0.1,
         "optimizer": "adamw", "weight_decay": 0.1, "lr_schedule": "cosine", "adapt_tasks": "unseen"}


class Batches(L.Callback):
    """The tasks (and whether labels came) of every training batch, and the logged losses."""

    def __init__(self) -> None:
        self.tasks, self.labeled, self.metrics, self.lrs = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.tasks.append(sorted(batch))
        self.labeled.append(all(len(v) == 3 for v in batch.values()))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


@pytest.fixture
def guarded(monkeypatch):
    """Every file the tiny suite pool reads, recorded; reading the target's expert raises."""
    read = []
    real = synthetic.load_state_dict

    def load(path, *args, **kwargs):
        read.append(Path(path).name)
        if Path(path).name == f"expert_{TARGET}.safetensors":
            raise AssertionError(f"the target's own expert was read: {path}")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(synthetic, "load_state_dict", load)
    return read


def target_ce(model: AdaMerging, dm: MultiTaskDataModule) -> float:
    """Cross-entropy of the target's head on the merged model over all its shots."""
    ds = dm.adaptation_dataset(TARGET)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([torch.as_tensor(ds[i][1]) for i in range(len(ds))]).long()
    with torch.no_grad():
        logits = model.task_logits({TARGET: x}, model.merged.merged_parameters())[TARGET]
    return float(F.cross_entropy(logits, y))


def test_atlas_fewshot_learns_on_the_target_over_the_other_tasks_vectors(guarded, tmp_path):
    pool = SuitePool("tiny", unseen_tasks=[TARGET])
    model = AdaMerging(pool, **ATLAS)
    assert model.task_names == ["digits", "shapes"] and model.unseen_tasks == [TARGET]
    assert model.merged.coefficients.shape[-1] == 2  # K - 1 columns: the target has none
    assert model.adapted_tasks == [TARGET]
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=8, shots=2, shots_split="train")
    before = target_ce(model, dm)
    rec = Batches()
    trainer(tmp_path, 12, [rec], log_every_n_steps=1).fit(model, dm)
    # only the target's labeled shots came, its head scored them, and its loss is the logged one
    assert rec.tasks == [[TARGET]] * 12 and all(rec.labeled)
    assert dm.adaptation_task_names() == [TARGET] and dm.eval_task_names() == ["digits", "shapes", TARGET]
    for m in rec.metrics:
        assert set(m) == {"train/ce", f"train/ce/{TARGET}"}
        assert m["train/ce"] == pytest.approx(m[f"train/ce/{TARGET}"])
    assert not torch.allclose(model.merged.coefficients, torch.zeros_like(model.merged.coefficients))
    assert target_ce(model, dm) < before  # the shots' cross-entropy went down
    # the target's own task vector was never read: not at the build, not in the steps
    assert f"expert_{TARGET}.safetensors" not in guarded
    assert {"expert_digits.safetensors", "expert_shapes.safetensors"} <= set(guarded)
    assert set(model.loaded.expert_state) == {"digits", "shapes"} and TARGET not in model.loaded.task_vectors.task_names


def test_adapt_tasks_all_covers_merged_and_unseen_and_bad_settings_name_the_key(tmp_path):
    loaded = SuitePool("tiny", unseen_tasks=[TARGET]).load()
    model = AdaMerging(PreloadedPool(loaded), objective="cross_entropy", adapt_tasks="all")
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=4, shots=2, shots_split="train")
    rec = Batches()
    trainer(tmp_path, 2, [rec], log_every_n_steps=1).fit(model, dm)
    assert rec.tasks == [sorted(["digits", "shapes", TARGET])] * 2
    assert {f"train/ce/{t}" for t in ("digits", "shapes", TARGET)} <= set(rec.metrics[-1])
    with pytest.raises(ValueError, match="model.adapt_tasks: unseen .* this pool has none"):
        AdaMerging(PreloadedPool(SuitePool("tiny").load()), adapt_tasks="unseen")
    with pytest.raises(ValueError, match="model.adapt_tasks: unseen .* objective 'pseudo_label' reads"):
        AdaMerging(PreloadedPool(loaded), objective="pseudo_label", adapt_tasks="unseen")
    with pytest.raises(ValueError, match="model.adapt_tasks must be one of"):
        AdaMerging(PreloadedPool(loaded), adapt_tasks="target")
    entropy = AdaMerging(PreloadedPool(loaded), adapt_tasks="unseen")  # online streams the merged tasks only
    assert "drop model.adapt_tasks" in entropy.refusal("online")
    with pytest.raises(ValueError, match="adaptation tasks"):
        dm.select_tasks(["digits"], unseen=[TARGET], adapted=["shapes"])


def test_adamw_weight_decay_cosine_and_clipping(tmp_path):
    model = AdaMerging(PreloadedPool(SuitePool("tiny").load()), lr=0.05, optimizer="adamw", weight_decay=0.1,
                       lr_schedule="cosine")
    steps, clip = 6, 1e-4
    seen = {}

    class Norms(L.Callback):
        def on_train_start(self, trainer, pl_module):
            def post(opt, args, kwargs):  # the gradients the update used (the closure ran inside step)
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                seen.setdefault("clipped", []).append(float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g) for g in grads]))))
            trainer.optimizers[0].register_step_post_hook(post)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # before the clipping
            seen.setdefault("raw", []).append(float(pl_module.merged.coefficients.grad.norm()))
    rec = Batches()
    trainer(tmp_path, steps, [rec, Norms()], gradient_clip_val=clip).fit(model, MultiTaskDataModule(
        SuiteSource("tiny"), batch_size=8))
    optimizer = model.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.1
    (config,) = model.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert (config.scheduler.T_max, config.interval) == (steps, "step")
    assert rec.lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * s / steps)) / 2 for s in range(steps)])
    assert all(r > clip for r in seen["raw"])  # the clip was active at every step ...
    assert seen["clipped"] == pytest.approx([clip] * steps, rel=1e-3)  # ... and the update saw the clipped norm
    # online's optimizers_for: the schedule over its own stream length; unknown length: no schedule
    assert model.optimizers_for(None).__class__ is torch.optim.AdamW
    assert model.optimizers_for(10)["lr_scheduler"]["scheduler"].T_max == 10
    for key, value in (("optimizer", "sgd"), ("weight_decay", -0.1), ("lr_schedule", "linear")):
        with pytest.raises(ValueError, match=f"model.{key} must"):
            AdaMerging(PreloadedPool(SuitePool("tiny").load()), **{key: value})


def test_defaults_are_adam_constant_on_the_merged_tasks(tmp_path):
    loaded = SuitePool("tiny", unseen_tasks=[TARGET]).load()
    model = AdaMerging(PreloadedPool(loaded))
    assert (model.hparams["optimizer"], model.hparams["weight_decay"], model.hparams["lr_schedule"],
            model.hparams["adapt_tasks"]) == ("adam", 0.0, "constant", "merged")
    configured = model.optimizers_for(500)
    assert type(configured) is torch.optim.Adam and configured.defaults["weight_decay"] == 0.0
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=8)
    rec = Batches()
    trainer(tmp_path, 3, [rec], log_every_n_steps=1).fit(model, dm)
    assert model.trainer.lr_scheduler_configs == [] and type(model.trainer.optimizers[0]) is torch.optim.Adam
    assert rec.lrs == [1e-3] * 3
    assert rec.tasks == [["digits", "shapes"]] * 3  # the unseen task is evaluated, never adapted on
    assert dm.adaptation_task_names() == dm.task_names() == ["digits", "shapes"]
    assert not any(k.endswith(f"/{TARGET}") for m in rec.metrics for k in m)
    # WEMoE keeps its cosine schedule (now AdaMerging's), FusionBench's constant on request
    wemoe = WEMoE(PreloadedPool(SuitePool("tiny").load()))
    sched = wemoe.optimizers_for(20)["lr_scheduler"]
    assert isinstance(sched["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR) and sched["interval"] == "step"
    assert sched["scheduler"].T_max == 20 and type(sched["scheduler"].optimizer) is torch.optim.Adam
    assert type(WEMoE(PreloadedPool(SuitePool("tiny").load()), lr_schedule="constant").optimizers_for(20)) \
        is torch.optim.Adam


def test_atlas_recipe_configs():
    recipe = registry.get("adamerging_layerwise_fewshot").recipes["paper"]
    for key in ("vit-b-32", "vit-l-14"):
        cfg = yaml.safe_load((ROOT / "configs" / "paper" / f"clip-{key}_8tasks_atlas_fewshot.yaml").read_text())
        model, pool = cfg["model"], cfg["model"]["pool"]["init_args"]
        assert pool["unseen_tasks"] == list(recipe.unseen) == ["sun397"]
        assert "sun397" not in pool["experts"] and len(pool["experts"]) == 7
        assert "sun397" in cfg["data"]["source"]["init_args"]["tasks"]
        assert {k: model[k] for k in ATLAS} == ATLAS
        assert (cfg["data"]["shots"], cfg["data"]["shots_split"], cfg["data"]["batch_size"]) == (4, "train", 128)
        assert cfg["trainer"]["gradient_clip_val"] == 1.0 and cfg["trainer"]["max_steps"] == 130
