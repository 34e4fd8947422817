"""Language models: a tiny random Llama, PEFT LoRA experts, prompts from JSONL; no network."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

import peft  # the [llm] extra, installed by [dev]
import transformers

from adamerge.data.datamodule import MultiTaskDataModule
from adamerge.data.text import TextSource
from adamerge.engine.lowrank import LowRankTaskVectors
from adamerge.methods import AdaMerging
from adamerge.models.hf import HFCausalLMPool, read_lora
from adamerge.models.pool import PreloadedPool

WORDS = ["count", "parity", ":", "->", "a", "b", "c", "0", "1", "2", "even", "odd", "yes", "no"]
TASKS = {"parity": {"labels": ["even", "odd"]}, "count": {"labels": ["0", "1", "2"]},
         "yesno": {"labels": ["yes", "no"]}}


def make_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast, len(vocab)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    tok, vocab = make_tokenizer(root / "base")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    experts = {}
    for i, (task, rank) in enumerate((("parity", 4), ("count", 2))):
        torch.manual_seed(10 + i)
        lcfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank + i, target_modules=["q_proj", "v_proj", "down_proj"],
                               lora_dropout=0.0, init_lora_weights=False)  # random B: a non-zero change
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(root / "base"), lcfg)
        model.save_pretrained(root / task)
        experts[task] = root / task
    (root / "tasks.json").write_text(json.dumps(TASKS))
    g = torch.Generator().manual_seed(0)
    for task in ("parity", "count", "yesno"):
        (root / "data" / task).mkdir(parents=True)
        for split in ("test", "val"):
            lines = []
            for _ in range(24):
                seq = " ".join(["a", "b", "c", "0", "1"][int(j)] for j in torch.randint(0, 5, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g))
                lines.append(json.dumps({"prompt": f"{task} : {seq} ->", "label": int(torch.randint(0, len(TASKS[task]["labels"]), (1,), generator=g))}))
            (root / "data" / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "experts": experts, "tok": tok}


def pool(world, **kw):
    return HFCausalLMPool(base=str(world["root"] / "base"), experts={t: str(p) for t, p in world["experts"].items()},
                          tasks_file=str(world["root"] / "tasks.json"), **kw)


def test_lora_pool_merge_equals_peft_merge_of_each_adapter(world):
    loaded = pool(world).load()
    tv = loaded.task_vectors
    assert isinstance(tv, LowRankTaskVectors) and tv.task_names == ["parity", "count"]
    model = AdaMerging(PreloadedPool(loaded), granularity="layerwise", clamp=False)
    assert model.num_classes("parity") == 2 and model.num_classes("count") == 3
    for k, task in enumerate(tv.task_names):  # coefficient 1 on expert k, 0 elsewhere
        with torch.no_grad():
            model.merged.coefficients.zero_()
            model.merged.coefficients[:, k] = 1.0
        merged = model.merged.merged_state_dict()
        ref = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(world["root"] / "base"),
                                             world["experts"][task]).merge_and_unload().state_dict()
        for name in tv.names:
            torch.testing.assert_close(merged[name], ref[name.removeprefix("lm.")], rtol=1e-5, atol=1e-5)


def test_text_fit_then_export_reloads_with_transformers(world, tmp_path):
    from adamerge.io.export import export
    loaded = pool(world, unseen_tasks=["yesno"]).load()
    model = AdaMerging(PreloadedPool(loaded), lr=0.05)
    src = TextSource(str(world["root"] / "data"), tokenizer=str(world["root"] / "base"), max_length=12)
    dm = MultiTaskDataModule(src, batch_size=4, eval_batch_size=16)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    start = model.merged.coefficients.detach().clone()
    trainer.fit(model, dm)
    assert not torch.equal(start, model.merged.coefficients.detach())  # entropy moved them
    metrics = trainer.test(model, dm, verbose=False)[0]
    assert {"test/acc/parity", "test/acc/count", "test/acc/yesno", "test/acc_avg_unseen"} <= set(metrics)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    paths = export(model, tmp_path / "run.ckpt", tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(paths["hf"]).eval()
    x = src.dataset("count", "test").data[:5]
    params = {k: v.detach() for k, v in model.merged.merged_parameters().items()}
    with torch.no_grad():
        ours = model.merged(x, params=params)
        mask = x[:, 1]
        theirs = hf(input_ids=x[:, 0], attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lora_reader_errors_name_the_file(world, tmp_path):
    import shutil
    bad = tmp_path / "dora"
    shutil.copytree(world["experts"]["parity"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="DoRA adapters are not a low-rank weight change"):
        read_lora(bad, transformers.LlamaForCausalLM.from_pretrained(world["root"] / "base").state_dict())
    with pytest.raises(ValueError, match=r"no label words for tasks \['nope'\]"):
        HFCausalLMPool(base=str(world["root"] / "base"), experts={"nope": str(bad)},
                       tasks_file=str(world["root"] / "tasks.json"))


def test_lora_resume_is_exact(world, tmp_path):
    """4 steps in one go == 2 steps, a checkpoint, then 2 more from it (bitwise)."""
    src = TextSource(str(world["root"] / "data"), tokenizer=str(world["root"] / "base"), max_length=12)

    def run(steps, root, ckpt=None):
        torch.manual_seed(0)
        model = AdaMerging(PreloadedPool(pool(world).load()), lr=0.05)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                            enable_checkpointing=False)
        trainer.fit(model, MultiTaskDataModule(src, batch_size=4), ckpt_path=ckpt)
        return trainer, model

    _, full = run(4, tmp_path / "a")
    half_trainer, _ = run(2, tmp_path / "b")
    half_trainer.save_checkpoint(tmp_path / "half.ckpt")
    _, resumed = run(4, tmp_path / "c", ckpt=str(tmp_path / "half.ckpt"))
    assert torch.equal(full.merged.coefficients, resumed.merged.coefficients)
    assert not torch.equal(full.merged.coefficients, torch.full_like(full.merged.coefficients, 0.3))
