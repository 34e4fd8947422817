"""Seq2seq LMs (first decoder token), sequence classifiers (per-task score heads) and prompts
from Hugging Face datasets / templates; tiny random models, no network."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

import peft  # the [llm] extra, installed by [dev]
import transformers

from adamerge.data.datamodule import MultiTaskDataModule
from adamerge.data.text import HFTextSource, TextSource, load_tasks_file
from adamerge.methods import AdaMerging
from adamerge.models.hf import (FirstTokenSeq2Seq, HFLanguageModelPool, HFSequenceClassifierPool,
                                LastTokenFeatures)
from adamerge.models.pool import PreloadedPool
from test_hf_lora import make_tokenizer

TASKS = {"parity": {"labels": ["even", "odd"]}, "count": {"labels": ["0", "1", "2"]}}


def write_prompts(root, tasks, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for task, k in tasks.items():
        (root / "data" / task).mkdir(parents=True, exist_ok=True)
        for split in ("test", "val"):
            lines = []
            for _ in range(n):
                seq = " ".join("abc01"[int(j)] for j in torch.randint(0, 5, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g))
                lines.append(json.dumps({"prompt": f"{task} : {seq} ->", "label": int(torch.randint(0, k, (1,), generator=g))}))
            (root / "data" / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def fit(model, source, root, steps=2):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        enable_checkpointing=False)
    start = model.merged.coefficients.detach().clone()
    trainer.fit(model, MultiTaskDataModule(source, batch_size=4, eval_batch_size=16))
    assert not torch.equal(start, model.merged.coefficients.detach())  # entropy moved them
    return trainer


def one_hot(model, k):
    with torch.no_grad():
        model.merged.coefficients.zero_()
        model.merged.coefficients[:, k] = 1.0


# ------------------------------------------------------------------------------ seq2seq
@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    tok, vocab = make_tokenizer(root / "base")
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(root / "base")
    experts = {}
    for i, task in enumerate(TASKS):
        torch.manual_seed(10 + i)
        lcfg = peft.LoraConfig(r=2 + i, lora_alpha=4, target_modules=["q", "v", "wo"], lora_dropout=0.0,
                               init_lora_weights=False)
        model = peft.get_peft_model(transformers.T5ForConditionalGeneration.from_pretrained(root / "base"), lcfg)
        model.save_pretrained(root / task)
        experts[task] = str(root / task)
    (root / "tasks.json").write_text(json.dumps(TASKS))
    write_prompts(root, {t: len(s["labels"]) for t, s in TASKS.items()})
    return root, experts


def test_seq2seq_lora_merge_equals_peft_and_export_reloads(t5, tmp_path):
    from adamerge.io.export import export
    root, experts = t5
    loaded = HFLanguageModelPool(base=str(root / "base"), experts=experts, tasks_file=str(root / "tasks.json")).load()
    assert isinstance(loaded.encoder, FirstTokenSeq2Seq)
    model = AdaMerging(PreloadedPool(loaded), granularity="layerwise", clamp=False, lr=0.05)
    src = TextSource(str(root / "data"), tokenizer=str(root / "base"), max_length=10)
    x = src.dataset("count", "test").data[:5]
    for k, task in enumerate(loaded.task_vectors.task_names):
        one_hot(model, k)
        ref = peft.PeftModel.from_pretrained(transformers.T5ForConditionalGeneration.from_pretrained(root / "base"),
                                             experts[task]).merge_and_unload().eval()
        with torch.no_grad():
            ours = model.merged(x, params=model.merged.merged_parameters())
            theirs = ref(input_ids=x[:, 0], attention_mask=x[:, 1],
                         decoder_input_ids=torch.zeros(5, 1, dtype=torch.long)).logits[:, 0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.merged.coefficients.fill_(0.3)
    trainer = fit(model, src, tmp_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    paths = export(model, tmp_path / "run.ckpt", tmp_path / "export")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(paths["hf"]).eval()
    with torch.no_grad():
        ours = model.merged(x, params={k: v.detach() for k, v in model.merged.merged_parameters().items()})
        theirs = hf(input_ids=x[:, 0], attention_mask=x[:, 1], decoder_input_ids=torch.zeros(5, 1, dtype=torch.long)).logits[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ sequence classifiers
@pytest.fixture(scope="module")
def gpt2cls(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2cls")
    tok, vocab = make_tokenizer(root / "base")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=2,
                                  pad_token_id=0, bos_token_id=2, eos_token_id=3)
    transformers.GPT2ForSequenceClassification(cfg).eval().save_pretrained(root / "base")
    lora, full = {}, {}
    for i, (task, classes) in enumerate((("parity", 2), ("count", 3))):
        torch.manual_seed(20 + i)
        if classes == 2:  # a LoRA adapter keeps the base's class count; PEFT saves score in full
            lcfg = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                   lora_dropout=0.0, init_lora_weights=False)
            m = peft.get_peft_model(transformers.GPT2ForSequenceClassification.from_pretrained(root / "base"), lcfg)
            with torch.no_grad():
                m.base_model.model.score.modules_to_save["default"].weight.normal_()
            m.save_pretrained(root / f"lora_{task}")
            lora[task] = str(root / f"lora_{task}")
        m = transformers.GPT2ForSequenceClassification.from_pretrained(root / "base", num_labels=classes,
                                                                       ignore_mismatched_sizes=True)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        m.save_pretrained(root / f"full_{task}")
        full[task] = str(root / f"full_{task}")
    # a second LoRA expert: same class count as the base
    torch.manual_seed(30)
    lcfg = peft.LoraConfig(task_type="SEQ_CLS", r=3, lora_alpha=3, target_modules=["c_attn"], lora_dropout=0.0,
                           init_lora_weights=False)
    m = peft.get_peft_model(transformers.GPT2ForSequenceClassification.from_pretrained(root / "base"), lcfg)
    m.save_pretrained(root / "lora_yesno")
    lora["yesno"] = str(root / "lora_yesno")
    write_prompts(root, {"parity": 2, "count": 3, "yesno": 2})
    return root, lora, full


def hf_class_logits(model, x):
    mask = x[:, 1]
    return model(input_ids=x[:, 0], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def test_sequence_classifier_lora_heads_and_merge_equal_peft(gpt2cls):
    root, lora, _ = gpt2cls
    experts = {"parity": lora["parity"], "yesno": lora["yesno"]}
    loaded = HFSequenceClassifierPool(base=str(root / "base"), experts=experts).load()
    assert isinstance(loaded.encoder, LastTokenFeatures)
    assert not any("score" in n for n in loaded.task_vectors.names)  # heads are never merged
    model = AdaMerging(PreloadedPool(loaded), granularity="layerwise", clamp=False)
    src = TextSource(str(root / "data"), tokenizer=str(root / "base"), max_length=10)
    x = src.dataset("parity", "test").data[:6]
    for k, task in enumerate(experts):
        one_hot(model, k)
        ref = peft.PeftModel.from_pretrained(transformers.GPT2ForSequenceClassification.from_pretrained(root / "base"),
                                             experts[task]).merge_and_unload().eval()
        with torch.no_grad():
            ours = model.task_logits({task: x}, model.merged.merged_parameters())[task]
            torch.testing.assert_close(ours, hf_class_logits(ref, x), rtol=1e-5, atol=1e-5)


def test_sequence_classifier_full_experts_fit_and_export_per_task(gpt2cls, tmp_path):
    from adamerge.io.export import export
    root, _, full = gpt2cls
    (root / "cls_tasks.json").write_text(json.dumps({"parity": {"labels": ["even", "odd"]},
                                                     "count": {"labels": ["0", "1", "2"]}}))
    pool = HFSequenceClassifierPool(base=str(root / "base"), experts=full, tasks_file=str(root / "cls_tasks.json"))
    loaded = pool.load()
    assert {t: h.out_features for t, h in loaded.heads.items()} == {"parity": 2, "count": 3}
    assert not any("score" in n for n in loaded.task_vectors.names)
    model = AdaMerging(PreloadedPool(loaded), lr=0.05)
    src = TextSource(str(root / "data"), tokenizer=str(root / "base"), tasks=["parity", "count"], max_length=10)
    trainer = fit(model, src, tmp_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    paths = export(model, tmp_path / "run.ckpt", tmp_path / "export")
    params = {k: v.detach() for k, v in model.merged.merged_parameters().items()}
    for task in ("parity", "count"):  # one from_pretrained classifier per task
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(paths["hf"] / task).eval()
        x = src.dataset(task, "test").data[:5]
        with torch.no_grad():
            torch.testing.assert_close(model.task_logits({task: x}, params)[task], hf_class_logits(hf, x),
                                       rtol=1e-5, atol=1e-5)
    (root / "bad_tasks.json").write_text(json.dumps({"count": {"labels": ["0", "1"]}, "parity": {"labels": ["a", "b"]}}))
    with pytest.raises(ValueError, match="task 'count' lists 2 labels, its expert's score layer has 3 classes"):
        HFSequenceClassifierPool(base=str(root / "base"), experts=full, tasks_file=str(root / "bad_tasks.json")).load()
    with pytest.raises(ValueError, match="a task without an expert has no head"):
        HFSequenceClassifierPool(base=str(root / "base"), experts=full, unseen_tasks=["yesno"])


def test_bfloat16_sequence_classifier_takes_full_experts(gpt2cls):
    """A bfloat16 base with full experts (float32 files): each expert is loaded in bfloat16 (it was
    refused: float32 against the base's dtype); tau = (expert_bf16.float() - base_bf16.float()),
    rounded to bfloat16 once; each task's head is its expert's, in the base's dtype."""
    root, _, full = gpt2cls
    loaded = HFSequenceClassifierPool(base=str(root / "base"), experts=full, dtype="bfloat16").load()
    own = loaded.encoder.state_dict()
    experts = {t: transformers.GPT2ForSequenceClassification.from_pretrained(p, dtype=torch.bfloat16).state_dict()
               for t, p in full.items()}
    assert loaded.task_vectors.task_names == list(full)
    for name, tau in zip(loaded.task_vectors.names, loaded.task_vectors.tensors):
        want = torch.stack([e[name[3:]].float() - own[name].float() for e in experts.values()]).to(torch.bfloat16)
        assert own[name].dtype == tau.dtype == torch.bfloat16 and torch.equal(tau, want), name
    for task, expert in experts.items():
        head = loaded.heads[task]
        assert head.weight.dtype == torch.bfloat16 and torch.equal(head.weight, expert["score.weight"]), task
    x = torch.randint(4, 10, (2, 2, 5))
    x[:, 1] = 1
    with torch.no_grad():  # the resized head (3 classes) reads the bfloat16 features too
        assert loaded.heads["count"](loaded.encoder(x)).shape == (2, 3)


# ------------------------------------------------------------------------ prompt sources
def test_templates_and_label_words_from_the_tasks_file(tmp_path):
    tok, _ = make_tokenizer(tmp_path / "tok")
    (tmp_path / "data" / "parity").mkdir(parents=True)
    (tmp_path / "data" / "parity" / "test.jsonl").write_text(
        json.dumps({"seq": "a b", "label": "odd"}) + "\n" + json.dumps({"seq": "c", "label": 0}) + "\n")
    (tmp_path / "tasks.yaml").write_text("parity:\n  labels: [even, odd]\n  template: 'parity : {seq} ->'\n")
    src = TextSource(str(tmp_path / "data"), tokenizer=str(tmp_path / "tok"), max_length=None,
                     tasks_file=str(tmp_path / "tasks.yaml"))
    ds = src.dataset("parity", "test")
    assert ds.labels == [1, 0] and ds.data.shape == (2, 2, 5)  # parity : a b -> ; padded to the longest
    assert tok.decode(ds.data[1, 0][ds.data[1, 1].bool()]).split()[-3:] == [":", "c", "->"]
    (tmp_path / "data" / "parity" / "val.jsonl").write_text(json.dumps({"sq": "a", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"val.jsonl: record 1 has no field 'seq' that the template"):
        src.dataset("parity", "val")
    (tmp_path / "data" / "parity" / "val.jsonl").write_text(json.dumps({"seq": "a", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"label 'maybe' is neither a class index nor one of the label words"):
        src.dataset("parity", "val")
    (tmp_path / "data" / "parity" / "val.jsonl").write_text(json.dumps({"seq": "a", "label": 2}) + "\n")
    with pytest.raises(ValueError, match=r"label 2 is out of range for 2 classes"):
        src.dataset("parity", "val")


def test_prompts_from_hugging_face_datasets(tmp_path):
    import datasets
    tok, _ = make_tokenizer(tmp_path / "tok")
    rows = {"sentence": ["a b", "c", "0 1 2", "b"], "label": [1, 0, 1, 0]}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows),
                          "train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "count.jsonl").write_text("".join(json.dumps({"text": t, "y": y}) + "\n"
                                                  for t, y in (("a", "0"), ("a b", "1"))))
    spec = {"parity": {"labels": ["even", "odd"], "template": "parity : {sentence} ->",
                       "dataset": {"path": str(tmp_path / "saved"), "splits": {"test": "validation", "val": "train"}}},
            "count": {"labels": ["0", "1", "2"], "template": "count : {text} ->",
                      "dataset": {"path": "json", "data_files": {"test": str(tmp_path / "count.jsonl")},
                                  "label_key": "y"}},
            "yesno": {"labels": ["yes", "no"]}}
    (tmp_path / "tasks.json").write_text(json.dumps(spec))
    src = HFTextSource(str(tmp_path / "tasks.json"), tokenizer=str(tmp_path / "tok"), max_length="longest")
    assert src.task_names() == ["parity", "count"]  # tasks with a dataset entry
    parity, count = src.dataset("parity", "test"), src.dataset("count", "test")
    assert parity.labels == [1, 0, 1, 0] and count.labels == [0, 1]  # label words mapped to indices
    assert parity.data.shape[-1] == count.data.shape[-1] == 6  # one length: the longest prompt of all
    assert tok.decode(parity.data[2, 0][parity.data[2, 1].bool()]).split() == ["parity", ":", "0", "1", "2", "->"]
    with pytest.raises(KeyError, match=r"no split 'nope'"):
        src.dataset("parity", "nope")
    with pytest.raises(ValueError, match="with a 'dataset' entry"):
        HFTextSource(str(tmp_path / "tasks.json"), tokenizer=str(tmp_path / "tok"), tasks=["yesno"])
    assert load_tasks_file(tmp_path / "tasks.json")["count"]["dataset"]["label_key"] == "y"


def test_nan_in_an_adapter_is_named_at_load(gpt2cls, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    root, lora, _ = gpt2cls
    bad = tmp_path / "nan_adapter"
    shutil.copytree(lora["yesno"], bad)
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(Exception, match=r"adapter_model.safetensors.*non-finite"):
        HFSequenceClassifierPool(base=str(root / "base"), experts={"parity": lora["parity"], "yesno": str(bad)}).load()
