"""Encoder-only sequence classifiers (BERT, RoBERTa): the family the language-model path used to
refuse, added in ``models/`` alone (its features, heads and layout), then every registered method
run on it. Tiny random models, no network."""

from __future__ import annotations

import json

import pytest
import torch

import transformers

from adamerge.compare import CompareSettings, compare
from adamerge.data.datamodule import MultiTaskDataModule
from adamerge.data.text import TextSource
from adamerge.methods import AdaMerging, AdaRank, TwinMerging, WEMoE, registry
from adamerge.models.hf import FirstTokenFeatures, HFSequenceClassifierPool
from adamerge.models.pool import PreloadedPool
from test_hf_lora import make_tokenizer

CLASSES = {"parity": 2, "count": 3}
FAMILIES = {
    "bert": lambda vocab: transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64,
                                                  max_position_embeddings=32, pad_token_id=0, num_labels=2),
    "roberta": lambda vocab: transformers.RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=64,
                                                        max_position_embeddings=40, pad_token_id=0, num_labels=2),
}


def write_prompts(root, n: int = 24) -> None:
    """Prompts of both tasks in the test, val and train splits (few-shot rows read train)."""
    g = torch.Generator().manual_seed(0)
    for task, k in CLASSES.items():
        (root / "data" / task).mkdir(parents=True, exist_ok=True)
        for split in ("test", "val", "train"):
            lines = []
            for _ in range(n):
                length = int(torch.randint(2, 6, (1,), generator=g))
                seq = " ".join("abc01"[int(j)] for j in torch.randint(0, 5, (length,), generator=g))
                lines.append(json.dumps({"prompt": f"{task} : {seq} ->", "label": int(torch.randint(0, k, (1,), generator=g))}))
            (root / "data" / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A base classifier and two full fine-tunes (2 and 3 classes) of one family."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    _, vocab = make_tokenizer(root / "base")
    cfg = FAMILIES[name](vocab)
    auto = transformers.AutoModelForSequenceClassification
    torch.manual_seed(0)
    auto.from_config(cfg).eval().save_pretrained(root / "base")
    experts = {}
    for i, (task, classes) in enumerate(CLASSES.items()):
        torch.manual_seed(10 + i)
        m = auto.from_pretrained(root / "base", num_labels=classes, ignore_mismatched_sizes=True)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        m.save_pretrained(root / task)
        experts[task] = str(root / task)
    write_prompts(root)
    return name, root, experts


def reference_logits(folder, x: torch.Tensor) -> torch.Tensor:
    """The ``transformers`` model's own class logits on the prompts, right-padded."""
    ids, mask = x[:, 0].long(), x[:, 1].long()
    order = torch.argsort(mask == 0, dim=1, stable=True)  # real tokens first, in order
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids.gather(1, order), attention_mask=mask.gather(1, order)).logits


def test_merge_at_each_expert_equals_that_expert_and_the_layout_names_the_mlps(family):
    name, root, experts = family
    loaded = HFSequenceClassifierPool(base=str(root / "base"), experts=experts).load()
    assert isinstance(loaded.encoder, FirstTokenFeatures)
    assert not any(".classifier." in n for n in loaded.task_vectors.names)  # heads are never merged
    prefix = f"lm.{name}.encoder.layer"
    assert list(loaded.layout.mlps) == [(f"{prefix}.{i}.intermediate.dense", f"{prefix}.{i}.output.dense")
                                        for i in range(2)]
    assert f"{prefix}.0.attention.self.query.weight" in loaded.layout.attention
    model = AdaMerging(PreloadedPool(loaded), clamp=False)
    src = TextSource(str(root / "data"), tokenizer=str(root / "base"), max_length=10)
    for k, task in enumerate(experts):
        with torch.no_grad():
            model.merged.coefficients.zero_()
            model.merged.coefficients[:, k] = 1.0
            x = src.dataset(task, "test").data[:6]
            ours = model.task_logits({task: x}, model.merged.merged_parameters())[task]
        torch.testing.assert_close(ours, reference_logits(experts[task], x), rtol=1e-5, atol=1e-5)


def test_every_registered_method_runs_on_an_encoder_only_classifier(family, tmp_path):
    """The registry's rows, each through compare on BERT (2 steps for learned rows); on RoBERTa
    (the same code path, a head of two layers) the rows whose merge reads the pool's layout, and
    Tinting, which needs one-linear heads, refuses it in one line."""
    name, root, experts = family
    loaded = HFSequenceClassifierPool(base=str(root / "base"), experts=experts).load()
    src = TextSource(str(root / "data"), tokenizer=str(root / "base"), max_length=10)
    dm = MultiTaskDataModule(src, batch_size=4, eval_batch_size=16)
    rows = registry.names()
    if name == "roberta":
        with pytest.raises(ValueError, match="tinting needs each head to be one linear layer"):
            compare(loaded, dm, tmp_path / "tinting", CompareSettings(steps=1, val_split=None),
                    ["tinting"], say=lambda s: None)
        rows = [r for r in rows if registry.get(r).build in (WEMoE, TwinMerging, AdaRank)]
    results = compare(loaded, dm, tmp_path, CompareSettings(steps=2, val_split=None), rows, say=lambda s: None)
    assert list(results["methods"]) == rows
    for row, found in results["methods"].items():
        assert set(found["per_task"]) == set(CLASSES) and all(0 <= a <= 100 for a in found["per_task"].values()), row
