"""FusionBench's text AdaMerging recipe as options (issue 31): the entropy of the batch-mean logits
(``entropy_of_mean``, over the whole vocabulary ``vocab_entropy_of_mean``), Flan-T5's first decoder
input (``decoder_start``), GPT-2's right padding (equivalent to ours) and the configs
``configs/fusionbench/text_*_layerwise.yaml``; tiny random models, no network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import yaml

import transformers

from adamerge.commands.main import main
from adamerge.engine.objectives import entropy, entropy_of_mean
from adamerge.methods import AdaMerging
from adamerge.methods.adamerging import OBJECTIVES
from adamerge.models.hf import FirstTokenSeq2Seq, HFLanguageModelPool, HFSequenceClassifierPool, LastTokenFeatures
from adamerge.models.pool import PreloadedPool
from adamerge.data.text import TextSource
from test_hf_lora import make_tokenizer
from test_hf_models import gpt2cls, t5  # noqa: F401  (module fixtures: tiny T5 / GPT-2 pools)

ROOT = Path(__file__).resolve().parents[1]


def hand_entropy_of_mean(logits):
    p = torch.softmax(logits.double().mean(0), -1)
    return -(p * p.log()).sum()


def test_entropy_of_mean_is_the_entropy_of_the_batch_mean_logits():
    # two confident examples that disagree: each entropy is small, the mean prediction is 50/50
    logits = torch.tensor([[6.0, 0.0], [0.0, 6.0], [3.0, 1.0]])
    torch.testing.assert_close(entropy_of_mean(logits), hand_entropy_of_mean(logits).float())
    torch.testing.assert_close(entropy(logits, batch_mean=True), entropy_of_mean(logits))
    assert float(entropy_of_mean(logits)) > float(entropy(logits)) + 0.3
    # one example: the two agree
    torch.testing.assert_close(entropy_of_mean(logits[:1]), entropy(logits[:1]))
    assert {"entropy_of_mean", "vocab_entropy_of_mean"} <= set(OBJECTIVES)


def batch_of(model, tasks, src, n=6):
    images = {t: src.dataset(t, "test").data[:n] for t in tasks}
    return images, {t: None for t in tasks}, model.merged.merged_parameters()


def test_objectives_on_a_t5_pool_read_the_label_words_or_the_whole_vocabulary(t5):  # noqa: F811
    root, experts = t5
    pool = HFLanguageModelPool(base=str(root / "base"), experts=experts, tasks_file=str(root / "tasks.json"))
    src = TextSource(str(root / "data"), tokenizer=str(root / "base"), max_length=10)
    loaded = pool.load()
    losses = {}
    for name in ("entropy", "entropy_of_mean", "vocab_entropy_of_mean"):
        model = AdaMerging(PreloadedPool(loaded), granularity="layerwise", clamp=False, objective=name)
        assert model.loss_name == name
        images, indices, params = batch_of(model, list(experts), src)
        with torch.no_grad():
            losses[name] = model.task_losses(images, indices, params)
            vocab = {t: model.merged(x, params=params) for t, x in images.items()}  # [B, V]
    for t, z in vocab.items():
        words = model.heads[t](z)  # [B, C]: the label-word columns
        assert z.shape[1] > words.shape[1]
        torch.testing.assert_close(losses["entropy_of_mean"][t], hand_entropy_of_mean(words).float())
        torch.testing.assert_close(losses["vocab_entropy_of_mean"][t], hand_entropy_of_mean(z).float())
        torch.testing.assert_close(losses["entropy"][t], entropy(words))
        assert not torch.allclose(losses["entropy_of_mean"][t], losses["entropy"][t])
        assert not torch.allclose(losses["vocab_entropy_of_mean"][t], losses["entropy_of_mean"][t])


def test_vocab_entropy_of_mean_is_refused_where_features_are_not_vocabulary_logits(gpt2cls):  # noqa: F811
    root, lora, _ = gpt2cls
    pool = HFSequenceClassifierPool(base=str(root / "base"), experts={"parity": lora["parity"], "yesno": lora["yesno"]})
    model = AdaMerging(pool, granularity="layerwise", objective="vocab_entropy_of_mean")
    src = TextSource(str(root / "data"), tokenizer=str(root / "base"), max_length=10)
    images, indices, params = batch_of(model, ["parity", "yesno"], src)
    with pytest.raises(ValueError, match="vocab_entropy_of_mean needs a language-model pool|use entropy_of_mean"):
        model.task_losses(images, indices, params)
    # entropy_of_mean works on class logits (FusionBench's GPT-2 classifiers)
    model = AdaMerging(pool, granularity="layerwise", objective="entropy_of_mean")
    with torch.no_grad():
        got = model.task_losses(images, indices, params)
        for t, x in images.items():
            torch.testing.assert_close(got[t], hand_entropy_of_mean(model.heads[t](model.merged(x, params=params))).float())


# ------------------------------------------------------------------ Flan-T5: first decoder input
def test_decoder_start_feeds_that_token_id(t5):  # noqa: F811
    root, experts = t5
    src = TextSource(str(root / "data"), tokenizer=str(root / "base"), max_length=10)
    x = src.dataset("count", "test").data[:5]
    kwargs = dict(base=str(root / "base"), experts=experts, tasks_file=str(root / "tasks.json"))
    default = HFLanguageModelPool(**kwargs).load().encoder
    ones = HFLanguageModelPool(**kwargs, decoder_start=1).load().encoder
    assert isinstance(ones, FirstTokenSeq2Seq) and (default.start, ones.start) == (0, 1)
    lm = ones.lm
    with torch.no_grad():
        theirs = lm(input_ids=x[:, 0], attention_mask=x[:, 1],  # FusionBench: torch.ones(B, 1)
                    decoder_input_ids=torch.ones(5, 1, dtype=torch.long)).logits[:, 0]
        torch.testing.assert_close(ones(x), theirs)
        torch.testing.assert_close(FirstTokenSeq2Seq(lm, start=1)(x), theirs)
        assert not torch.allclose(default(x), theirs)
    with pytest.raises(ValueError, match="decoder_start must be a token id"):
        HFLanguageModelPool(**kwargs, decoder_start=-1)
    with pytest.raises(ValueError, match="decoder_start must be a token id"):
        FirstTokenSeq2Seq(lm, start=lm.config.vocab_size)


def test_decoder_start_is_refused_without_a_decoder(gpt2cls):  # noqa: F811
    root, lora, _ = gpt2cls
    pool = HFSequenceClassifierPool(base=str(root / "base"), experts={"parity": lora["parity"]}, decoder_start=1)
    with pytest.raises(ValueError, match="decoder_start is the first decoder input of encoder-decoder LMs"):
        pool.load()


# ------------------------------------------------------------------ GPT-2: right padding
def test_gpt2_left_padding_reads_what_fusionbench_right_padding_reads(tmp_path):
    tok, vocab = make_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=3,
                                  pad_token_id=tok.pad_token_id)
    model = transformers.GPT2ForSequenceClassification(cfg).eval()
    words = [w for w in tok.get_vocab() if not w.startswith("<")]
    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)) for n in (3, 9, 5, 1, 12)]
    tok.padding_side = "left"
    left = tok(prompts, padding="max_length", max_length=16, return_tensors="pt")
    tok.padding_side = "right"
    right = tok(prompts, padding="max_length", max_length=16, return_tensors="pt")
    assert not torch.equal(left["input_ids"], right["input_ids"])
    with torch.no_grad():
        # ours: left-padded, the last position, positions over real tokens
        ours = model.score(LastTokenFeatures(model)(torch.stack([left["input_ids"], left["attention_mask"]], 1)))
        # FusionBench (gpt2_layer_wise_adamerging.py:227-254): right-padded, default position ids,
        # the position before the first pad token (pad_token_id, hard-coded 50256 = GPT-2's there)
        ids, pad = right["input_ids"], tok.pad_token_id
        hidden = model.transformer(ids, attention_mask=right["attention_mask"], position_ids=None).last_hidden_state
        logits = model.score(hidden)
        lengths = (torch.eq(ids, pad).int().argmax(-1) - 1) % ids.shape[-1]
        theirs = logits[torch.arange(ids.shape[0]), lengths]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ configs
@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection (and name lookup) is refused; HF libraries told to stay offline."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args[1:] if args else kwargs}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("name, pool, objective", [
    ("text_gpt2_glue_layerwise.yaml", "adamerge.models.HFSequenceClassifierPool", "entropy_of_mean"),
    ("text_flan-t5-base_glue_layerwise.yaml", "adamerge.models.HFLanguageModelPool", "vocab_entropy_of_mean"),
])
def test_fusionbench_text_configs_validate_offline(name, pool, objective, capsys, no_network):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / "fusionbench" / name), "--print_config"])
    assert exc.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"].get("init_args", printed["model"])
    assert model["pool"]["class_path"] == pool
    assert (model["objective"], model["prior"], model["clamp"], model["granularity"]) == (objective, 0.3, False, "layerwise")
    args = model["pool"]["init_args"]
    assert args["decoder_start"] == (1 if "flan-t5" in name else None)
    tasks = yaml.safe_load((ROOT / args["tasks_file"]).read_text())
    assert list(args["experts"]) == list(tasks) == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2"]
    assert (printed["data"]["batch_size"], printed["trainer"]["max_steps"]) == ((4, 1000) if "flan-t5" in name else (16, 1000))
    assert model["lr"] == (1e-3 if "flan-t5" in name else 1e-4)
