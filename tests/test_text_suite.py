"""The offline text suite: deterministic data, one-token verbalisers, a cached build that plain
transformers / peft reload to the logits measured at build time, and experts that beat the base."""

import json

import pytest
import torch

from adamerge.suites import text as T


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: with a second thread busy elsewhere, torch's default two threads
    make every small matmul many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_data_is_deterministic_per_seed_task_and_split():
    spec = T.get_text_spec("demo", n_train=50, n_val=10, n_test=20)
    for task in T.TEXT_TASKS:
        a, b = T.task_prompts(spec, task), T.task_prompts(spec, task)
        assert a == b
        assert {s: len(r) for s, r in a.items()} == {"train": 50, "val": 10, "test": 20}
        labels = T.TEXT_TASKS[task].labels
        for row in a["train"]:
            assert row["prompt"].startswith(f"{task} ") and row["prompt"].endswith(f" {T.ANSWER}")
            assert 0 <= row["label"] < len(labels)
        assert a["train"][:10] != a["test"][:10]  # each split its own stream
        assert T.task_prompts(T.get_text_spec(spec, seed=1), task)["train"] != a["train"]
        # growing one split leaves the others as they were
        more = T.task_prompts(T.get_text_spec(spec, n_test=40), task)
        assert more["train"] == a["train"] and more["test"][:20] == a["test"]
    # every label occurs (labels are drawn uniformly)
    rows = T.task_prompts(T.get_text_spec("demo", n_train=400), "min")["train"]
    assert {r["label"] for r in rows} == set(range(10))


def test_labels_are_right():
    spec = T.get_text_spec("demo", n_train=100, n_val=1, n_test=1)
    for r in T.task_prompts(spec, "min")["train"]:
        digits = r["prompt"].split()[2:-1]
        assert r["label"] == min(map(int, digits))
    for r in T.task_prompts(spec, "last")["train"]:
        assert T.LETTERS[r["label"]] == r["prompt"].split()[-2]
    for r in T.task_prompts(spec, "count")["train"]:
        assert r["label"] == r["prompt"].split()[2:-1].count("a")
    for r in T.task_prompts(spec, "topic")["train"]:
        words = r["prompt"].split()[2:-1]
        votes = [sum(w in ws for w in words) for ws in T.TOPICS.values()]
        assert votes.index(max(votes)) == r["label"] and max(votes) >= 3


def test_every_verbaliser_word_is_one_token():
    tok = T.build_tokenizer(list(T.TEXT_TASKS))
    for task in T.TEXT_TASKS.values():
        ids = T.verbaliser_ids(tok, task.labels)
        assert len(set(ids)) == len(task.labels) and tok.unk_token_id not in ids
        assert tok.convert_ids_to_tokens(ids) == list(task.labels)
    with pytest.raises(ValueError, match="label word 'zebra' is not one token"):
        T.verbaliser_ids(tok, ["zebra"])
    with pytest.raises(ValueError, match="label word 'red car' is not one token"):
        T.verbaliser_ids(tok, ["red car"])
    # the tokenizer of a subset knows only the subset's words
    small = T.build_tokenizer(["min"])
    with pytest.raises(ValueError, match="'fruit'"):
        T.verbaliser_ids(small, T.TEXT_TASKS["topic"].labels)


def test_left_padding_and_position_ids():
    tok = T.build_tokenizer(["min", "last"])
    enc = T.model_inputs(tok, ["last : a ->", {"prompt": "min : 1 2 3 4 ->"}])
    ids, mask, pos = enc["input_ids"], enc["attention_mask"], enc["position_ids"]
    assert ids[0, :3].tolist() == [tok.pad_token_id] * 3 and ids[:, -1].tolist() == [tok.convert_tokens_to_ids("->")] * 2
    assert mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1] and pos[0, 3:].tolist() == list(range(5))
    assert ids[1, 0] == tok.bos_token_id and pos[1].tolist() == list(range(8))


def test_spec_checks_and_keys():
    assert T.get_text_spec("tiny").key() != T.get_text_spec("tiny", seed=1).key()
    assert T.get_text_spec("tiny", expert_lr=1).key() == T.get_text_spec("tiny", expert_lr=1.0).key()
    assert T.get_text_spec("tiny").key().startswith("text-")
    with pytest.raises(ValueError, match="unknown task 'topci' in the text suites; did you mean 'topic'"):
        T.get_text_spec("tiny", tasks=["topci"])
    with pytest.raises(ValueError, match="unknown text suite fields \\['lora_rnak'\\]"):
        T.get_text_spec("tiny", lora_rnak=4)
    with pytest.raises(ValueError, match="'expert_steps' expects a int, got 1.5"):
        T.get_text_spec("tiny", expert_steps=1.5)
    with pytest.raises(ValueError, match="generic_fraction must be in \\[0, 1\\), got 1.0"):
        T.get_text_spec("tiny", generic_fraction=1.0)
    with pytest.raises(ValueError, match="unknown text suite 'demoo'"):
        T.get_text_spec("demoo")


# ------------------------------------------------------------------------ a built suite
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``tiny`` built once through the default cache (``$ADAMERGE_CACHE``, a temp folder here)."""
    cache = tmp_path_factory.mktemp("text-cache")
    messages = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADAMERGE_CACHE", str(cache))
        spec = T.get_text_spec("tiny")
        folder = T.ensure_text_suite(spec, progress=messages.append)
        yield spec, folder, cache, messages


def test_suite_layout(built):
    spec, folder, cache, messages = built
    assert folder == cache / "suites" / spec.key()
    assert any("building text suite" in m for m in messages)
    assert sorted(p.name for p in folder.iterdir()) == ["base", "data", "experts", "suite.json", "tasks.json"]
    assert (folder / "base" / "model.safetensors").is_file() and (folder / "base" / "tokenizer.json").is_file()
    for t in spec.tasks:
        assert {p.name for p in (folder / "experts" / t).iterdir()} >= {"adapter_config.json",
                                                                       "adapter_model.safetensors"}
        assert T.load_prompts(folder, t, "test") == T.task_prompts(spec, t)["test"]
    assert T.load_tasks(folder) == {t: {"labels": list(T.TEXT_TASKS[t].labels),
                                        "description": T.TEXT_TASKS[t].description} for t in spec.tasks}
    record = json.loads((folder / "suite.json").read_text())
    assert record["key"] == spec.key() and tuple(record["spec"]["tasks"]) == spec.tasks
    assert [p.name for p in (cache / "suites").iterdir()] == [spec.key()]  # no temporary folder left
    with pytest.raises(ValueError, match="unknown task 'count' in .*text-.* \\(known: last, min, topic\\)"):
        T.load_prompts(folder, "count", "test")


def test_cached_suite_is_reused(built):
    spec, folder, cache, _ = built
    files = [p for p in folder.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    messages = []
    assert T.ensure_text_suite(spec, cache_dir=cache, progress=messages.append) == folder
    assert messages == []  # nothing built
    assert {p: p.stat().st_mtime_ns for p in files} == before
    # another spec is another folder
    assert T.text_suite_folder(T.get_text_spec(spec, seed=1), cache) != folder


def test_interrupted_build_leaves_no_suite(tmp_path, monkeypatch):
    def crash(kind, spec, out, build, progress):  # the (pinned) build, interrupted half-way
        (out / "tasks.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "build_pinned", crash)
    spec = T.get_text_spec("tiny", seed=7)
    with pytest.raises(KeyboardInterrupt):
        T.ensure_text_suite(spec, cache_dir=tmp_path, progress=None)
    assert list((tmp_path / "suites").iterdir()) == []


def test_reload_gives_the_build_time_logits_and_experts_beat_the_base(built):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, folder, _, _ = built
    record = json.loads((folder / "suite.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder / "base")
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    base = AutoModelForCausalLM.from_pretrained(folder / "base")
    assert all(isinstance(m, torch.nn.Linear) for n, m in base.named_modules() if n.endswith("_proj"))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    tasks = T.load_tasks(folder)
    for t in spec.tasks:
        rows = T.load_prompts(folder, t, "test")
        ids = T.verbaliser_ids(tok, tasks[t]["labels"])
        expert = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base"),
                                           folder / "experts" / t)
        with torch.no_grad():
            for name, model in (("base", base), ("expert", expert)):
                got = T.answer_logits(model, tok, rows[:T.FINGERPRINT_N], ids)
                assert torch.allclose(got, torch.tensor(record["fingerprint"][t][name]), atol=1e-4), (t, name)
                # a prompt's logits do not depend on the padding of its batch
                alone = torch.cat([T.answer_logits(model, tok, [r], ids) for r in rows[:3]])
                longer = rows[0]["prompt"] + " " + rows[0]["prompt"]
                padded = T.answer_logits(model, tok, rows[:3] + [longer], ids)[:3]
                assert torch.allclose(alone, padded, atol=1e-5)
        acc_base, acc_expert = T.accuracy(base, tok, folder, t), T.accuracy(expert, tok, folder, t)
        assert acc_base == pytest.approx(record["accuracy"][t]["base"])
        assert acc_expert == pytest.approx(record["accuracy"][t]["expert"])
        assert acc_expert >= acc_base + 0.25, (t, acc_base, acc_expert)
        assert acc_base <= 2.0 / len(tasks[t]["labels"]) + 0.1, (t, acc_base)  # near chance
        # the hand-merged task vector is the adapter
        delta = T.lora_task_vector(folder, t)
        assert set(delta) == {n for n in base_state if n.endswith("_proj.weight")}
        base.load_state_dict({k: v + delta.get(k, 0) for k, v in base_state.items()})
        with torch.no_grad():
            assert torch.allclose(T.answer_logits(base, tok, rows[:16], ids),
                                  T.answer_logits(expert, tok, rows[:16], ids), atol=1e-4)
        base.load_state_dict(base_state)


def test_fit_and_test_the_text_config(built, tmp_path, capsys):
    """``adamerge fit`` on configs/text_tiny_layerwise.yaml (the suite's pool and source by
    class path); the suite pool's unseen tasks and the source's common padded length."""
    from pathlib import Path

    from adamerge.commands.main import main
    spec, folder, cache, _ = built
    config = str(Path(__file__).resolve().parents[1] / "configs" / "text_tiny_layerwise.yaml")
    common = ["--config", config, "--model.pool.init_args.cache_dir", str(cache),
              "--data.source.init_args.cache_dir", str(cache), "--trainer.logger", "false"]
    assert main(["fit", *common, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "3",
                 "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    lam = next(v for k, v in state.items() if k.endswith("coefficients"))
    assert lam.shape == (14, 3) and not torch.allclose(lam, torch.full_like(lam, 0.3))  # 2 layers x 7 LoRA weights
    pool = T.TextSuitePool("tiny", cache_dir=str(cache), unseen_tasks=["min"])
    assert pool.tasks == ["topic", "last"] and pool.load().unseen_heads.keys() == {"min"}
    with pytest.raises(ValueError, match="task 'mni'"):
        T.TextSuitePool("tiny", tasks=["mni"])
    source = T.TextSuiteSource("tiny", cache_dir=str(cache))
    lengths = {source.dataset(t, s).data.shape[-1] for t in spec.tasks for s in ("val", "test")}
    assert len(lengths) == 1  # one padded length for every task: one forward per step
