"""``adamerge eval``: lm-evaluation-harness on an exported merged LM and on the live merged model.

Offline: the built-in tiny text suite (a 2-layer Llama, LoRA and full experts, cached under
``$ADAMERGE_CACHE``) and custom lm_eval tasks written to a temp folder (``dataset_path: json`` over
the suite's own prompts), so lm_eval reads nothing from the hub. The LoRA run is shaped like the
MergeBench configs: ``HFLanguageModelPool`` with an ``open_ended`` tasks file (no label words: the
vocabulary is the head) and the ``entropy`` objective.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adamerge.commands.main import main
from adamerge.data.text import load_tasks_file
from adamerge.suites.text import ensure_text_suite, get_text_spec, load_prompts, load_tasks

ROOT = Path(__file__).resolve().parents[1]
TASKS = "suite_topic_mc,suite_topic_ll"
PROMPTS = 24  # topic test prompts each lm_eval task scores
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@pytest.fixture(scope="module")
def suite() -> Path:
    """The tiny suite with full experts too (its LoRA experts serve the LoRA pool: one build)."""
    return ensure_text_suite(get_text_spec("tiny", full_experts=True), progress=None)


@pytest.fixture(scope="module")
def lm_tasks(suite, tmp_path_factory) -> Path:
    """A folder of two lm_eval tasks over the suite's ``topic`` test prompts: multiple choice over
    the label words (acc), and the log-likelihood of the right word (perplexity: a continuous score)."""
    folder = tmp_path_factory.mktemp("lm_tasks")
    words = load_tasks(suite)["topic"]["labels"]
    rows = load_prompts(suite, "topic", "test")[:PROMPTS]
    data = folder / "topic.jsonl"
    data.write_text("".join(json.dumps({**r, "answer": words[r["label"]]}) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "doc_to_text": "{{prompt}}"}
    specs = {"suite_topic_mc": {"output_type": "multiple_choice", "doc_to_choice": words, "doc_to_target": "label",
                                "metric_list": [{"metric": "acc"}]},
             "suite_topic_ll": {"output_type": "loglikelihood", "doc_to_target": " {{answer}}",  # no delimiter added
                                "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]}}
    for name, spec in specs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **spec}))
    return folder


def lora_config(suite: Path, folder: Path) -> Path:
    """A MergeBench-shaped config on the suite: HFLanguageModelPool with open_ended tasks."""
    tasks = {t: {"open_ended": True} for t in ("topic", "last", "min")}
    (folder / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    pool = {"class_path": "adamerge.models.HFLanguageModelPool",
            "init_args": {"base": str(suite / "base"), "experts": {t: str(suite / "experts" / t) for t in tasks},
                          "tasks_file": str(folder / "tasks.yaml")}}
    source = {"class_path": "adamerge.data.TextSource",
              "init_args": {"root": str(suite / "data"), "tokenizer": str(suite / "base"),
                            "tasks_file": str(folder / "tasks.yaml"), "max_length": 32}}
    return write_config(folder, pool, source)


def full_config(suite: Path, folder: Path) -> Path:
    """The suite's pool with its fully fine-tuned experts (label words, verbaliser heads)."""
    spec = {"suite": "tiny", "overrides": {"full_experts": True}}
    return write_config(folder, {"class_path": "adamerge.suites.TextSuitePool", "init_args": {**spec, "full_experts": True}},
                        {"class_path": "adamerge.suites.TextSuiteSource", "init_args": spec})


def write_config(folder: Path, pool: dict, source: dict) -> Path:
    config = {"seed_everything": 0,
              "model": {"pool": pool, "granularity": "layerwise", "prior": 0.3, "lr": 0.05},
              "data": {"source": source, "batch_size": 8, "adapt_split": "test", "eval_split": "test"},
              "trainer": {"max_steps": 3, "limit_val_batches": 0, "accelerator": "cpu", "devices": 1,
                          "logger": False, "enable_progress_bar": False, "enable_model_summary": False},
              "checkpoint": {"save_last": True}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def runs(suite, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """kind -> (config, checkpoint, export folder): a 3-step fit and its export, per expert kind."""
    out = {}
    for kind, make in (("lora", lora_config), ("full", full_config)):
        folder = tmp_path_factory.mktemp(f"run_{kind}")
        config = make(suite, folder)
        assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(folder / "run")]) == 0
        ckpt = folder / "run" / "checkpoints" / "last.ckpt"
        assert main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--out", str(folder / "export")]) == 0
        out[kind] = (config, ckpt, folder / "export")
    return out


def scores(path: Path) -> dict[tuple[str, str], float]:
    results = json.loads(path.read_text())["results"]
    return {(t, k): v for t, m in results.items() for k, v in m.items() if isinstance(v, float) and "stderr" not in k}


def weight_files(*roots: Path) -> set[Path]:
    return {p for r in roots for p in r.rglob("*") if p.suffix in WEIGHT_SUFFIXES}


def test_open_ended_tasks_have_vocabulary_heads(suite, runs, tmp_path):
    """``open_ended: true``: no label words, the head is the whole vocabulary; the LoRA run trained on it."""
    from adamerge.models.hf import HFLanguageModelPool, VocabularyHead
    config = yaml.safe_load(runs["lora"][0].read_text())
    loaded = HFLanguageModelPool(**config["model"]["pool"]["init_args"]).load()
    vocab = loaded.encoder.lm.get_output_embeddings().weight.shape[0]
    assert {type(h) for h in loaded.heads.values()} == {VocabularyHead}
    assert all(h.num_classes == vocab for h in loaded.heads.values())
    x = torch.randn(2, vocab)
    assert torch.equal(loaded.heads["topic"](x), x)
    state = torch.load(runs["lora"][1], weights_only=True)["state_dict"]
    lam = next(v for k, v in state.items() if k.endswith("coefficients"))
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))  # entropy over the vocabulary moved them
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: {open_ended: true, labels: [x]}\n")
    with pytest.raises(ValueError, match="is open_ended .*drop its 'labels'"):
        load_tasks_file(bad)
    bad.write_text("a: {template: '{x}'}\n")
    with pytest.raises(ValueError, match="needs 'labels'.*or open_ended: true"):
        load_tasks_file(bad)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_export_and_live_model_get_the_same_lm_eval_scores(kind, suite, runs, lm_tasks, tmp_path, monkeypatch, capsys):
    """lm_eval on the exported hf/ folder and on the live merged model: the same scores; for LoRA
    experts the live path writes no weights (the merge is formed in memory)."""
    config, ckpt, export = runs[kind]
    common = ["--tasks", TASKS, "--include_path", str(lm_tasks), "--batch_size", "8", "--device", "cpu",
              "--bootstrap_iters", "0"]
    assert main(["eval", "--export", str(export), "--tokenizer", str(suite / "base"), *common,
                 "--output", str(tmp_path / "export.json")]) == 0
    table = capsys.readouterr().out
    assert "suite_topic_ll" in table and "perplexity" in table and "suite_topic_mc" in table
    monkeypatch.chdir(tmp_path)
    before = weight_files(tmp_path, runs[kind][0].parent, suite)
    if kind == "lora":  # nothing may write a model: every writer of weights fails the test
        import safetensors.torch
        import transformers

        def refuse(*args, **kwargs):
            raise AssertionError("the live LoRA merge wrote model weights")
        monkeypatch.setattr(safetensors.torch, "save_file", refuse)
        monkeypatch.setattr(torch, "save", refuse)
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", refuse)
    assert main(["eval", "--config", str(config), "--ckpt_path", str(ckpt), *common,
                 "--output", str(tmp_path / "live.json")]) == 0
    assert weight_files(tmp_path, runs[kind][0].parent, suite) == before
    exported, live = scores(tmp_path / "export.json"), scores(tmp_path / "live.json")
    assert set(exported) == set(live) and ("suite_topic_ll", "perplexity,none") in live
    for key, value in exported.items():
        assert live[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the merge is in both: the base model alone scores another perplexity
    assert main(["eval", "--export", str(suite / "base"), *common, "--tasks", "suite_topic_ll",
                 "--output", str(tmp_path / "base.json")]) == 0
    base = scores(tmp_path / "base.json")[("suite_topic_ll", "perplexity,none")]
    assert base != pytest.approx(live[("suite_topic_ll", "perplexity,none")], rel=1e-3)


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adamerge eval: error: "), captured.err[-2000:]
    return err[0]


def test_bad_inputs_fail_in_one_line(suite, runs, lm_tasks, tmp_path, monkeypatch, capsys):
    config, ckpt, export = runs["lora"]
    tasks = ["--tasks", "suite_topic_mc", "--include_path", str(lm_tasks)]
    assert "export folder does not exist" in one_line_error(capsys, ["eval", "--export", str(tmp_path / "nope"), *tasks])
    assert "no Hugging Face model (hf/config.json)" in one_line_error(capsys, ["eval", "--export", str(tmp_path), *tasks])
    assert "--include_path folder does not exist" in one_line_error(
        capsys, ["eval", "--export", str(export), "--tasks", "x", "--include_path", str(tmp_path / "none")])
    assert "--config needs --ckpt_path" in one_line_error(capsys, ["eval", "--config", str(config), *tasks])
    assert "give --export FOLDER" in one_line_error(capsys, ["eval", "--export", str(export), "--config", str(config),
                                                            "--ckpt_path", str(ckpt), *tasks])
    assert "no tokenizer in the export folder; give --tokenizer" in one_line_error(capsys, ["eval", "--export", str(export), *tasks])
    err = one_line_error(capsys, ["eval", "--export", str(export), "--tasks", "suite_topic_mcq", "--include_path", str(lm_tasks)])
    assert "unknown lm_eval task 'suite_topic_mcq'" in err and "did you mean 'suite_topic_mc'" in err
    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA device here" in one_line_error(
            capsys, ["eval", "--export", str(export), *tasks, "--device", "cuda"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert "pip install 'adamerge[eval]'" in one_line_error(capsys, ["eval", "--export", str(export), *tasks])


def test_help_does_not_import_lm_eval():
    """``adamerge --help`` and ``adamerge eval --help`` stay fast: lm_eval loads only when eval runs."""
    code = ("import sys; from adamerge.commands.main import main; main(['--help'])\n"
            "try:\n    main(['eval', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'lm_eval' not in sys.modules, 'lm_eval imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval      score a merged language model with lm_eval" in out.stdout and "--include_path" in out.stdout


def test_mergebench_configs_name_the_five_domains():
    """configs/mergebench/: one layer-wise AdaMerging config per MergeBench base model, its five
    experts by hub id (MergeBench/<model>_<domain>), a bfloat16 base, streamed task vectors in the
    run folder, how to shard it in the header; open_ended prompts from MergeBench/<domain>_val."""
    from adamerge.models.hf import HFLanguageModelPool
    domains = ["instruction", "math", "multilingual", "coding", "safety"]
    found = sorted(p.name for p in (ROOT / "configs" / "mergebench").glob("*.yaml"))
    assert found == [f"{m}_layerwise.yaml" for m in ("gemma-2-2b", "gemma-2-9b", "llama-3.1-8b", "llama-3.2-3b")]
    specs = load_tasks_file(ROOT / "configs" / "tasks" / "mergebench.yaml")
    assert list(specs) == domains
    for domain, spec in specs.items():
        assert spec["open_ended"] and spec["dataset"]["path"] == f"MergeBench/{domain}_val"
        assert spec["template"].endswith("### Response:\n")
    for name in found:
        text = (ROOT / "configs" / "mergebench" / name).read_text()
        cfg = yaml.safe_load(text)
        pool = cfg["model"]["pool"]["init_args"]
        model, run = pool["base"].split("/")[-1], f"runs/mergebench/{name.removesuffix('.yaml')}"
        assert model.lower() == name.removesuffix("_layerwise.yaml")
        assert pool["experts"] == {d: f"MergeBench/{model}_{d}" for d in domains}
        assert pool["dtype"] == "bfloat16" and "task_vector_dtype" not in cfg["model"]
        assert pool["task_vector_file"] == f"{run}/task_vectors.safetensors" and f"--trainer.default_root_dir {run}" in text
        assert "trainer.strategy: {class_path: adamerge.ShardedMergeStrategy}" in text and "trainer.devices: N" in text
        assert f"hf download MergeBench/{model}_math" in text and "gsm8k_cot" in text and "ifeval" in text
        assert (cfg["model"]["objective"], cfg["model"]["granularity"]) == ("entropy", "layerwise")
        assert cfg["trainer"]["limit_val_batches"] == 0 and cfg["data"]["adapt_split"] == "train"
        # the pool takes the hub ids as they are (nothing is fetched before load)
        built = HFLanguageModelPool(**{**pool, "tasks_file": str(ROOT / pool["tasks_file"])})
        assert built.experts == pool["experts"] and built.dtype == "bfloat16"
