"""No network: local files are checked first, a download that cannot happen fails at once in one
line saying how to give the file, cached files are used, and FusionBench's Hugging Face fine-tunes
convert in bulk. Nothing here reaches a network: the CLI runs with the hub switched off or pointed
at a closed local port, and the in-process tests refuse every socket connection."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from adamerge.commands.main import main
from adamerge.io.offline import OfflineError
from adamerge.models.clip import create_clip
from conftest import tiny_clip

ROOT = Path(__file__).resolve().parents[1]
TINY = "adamerge-test-offline-clip"
HUB_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "NO_PROXY", "no_proxy",
            *(f"{s}_PROXY" for s in ("HTTP", "HTTPS", "ALL")), *(f"{s}_proxy" for s in ("http", "https", "all")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny open_clip config, its whole-model file and two image-tower experts."""
    root = tmp_path_factory.mktemp("offline")
    clip, base = tiny_clip(root, TINY)
    experts = {}
    for i, task in enumerate(("mnist", "eurosat")):
        experts[task] = root / f"{task}.safetensors"
        save_file({k: v + 0.01 * (i + 1) for k, v in clip.visual.state_dict().items()}, str(experts[task]))
    return {"root": root, "clip": clip, "base": base, "experts": experts}


def closed_port() -> int:
    """A local TCP port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection (and name lookup) in this process is refused and recorded; the
    hub address is a closed local port, proxies point there too."""
    attempts = []

    def refuse(*args, **kwargs):
        where = args[1] if args and isinstance(args[0], socket.socket) else args
        attempts.append(str(where[0]) if isinstance(where, tuple) and where else str(where))
        raise ConnectionRefusedError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in HUB_VARS:
        monkeypatch.delenv(var, raising=False)
    dead = f"http://127.0.0.1:{closed_port()}"
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "HF_ENDPOINT"):
        monkeypatch.setenv(var, dead)
    return attempts


def fit_config(path: Path, experts: dict, pretrained: str = "openai", data_paths: dict | None = None) -> Path:
    cfg = {"model": {"pool": {"class_path": "adamerge.models.OpenCLIPPool", "init_args": {
               "model": "ViT-B-32", "pretrained": pretrained, "experts": {t: str(p) for t, p in experts.items()}}}},
           "data": {"source": {"class_path": "adamerge.data.HFSource", "init_args": {
               "tasks": list(experts), "model": "ViT-B-32", "pretrained": pretrained,
               "paths": {t: str(p) for t, p in (data_paths or {}).items()}}}},
           "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_progress_bar": False}}
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------- (1) one fast line, no retries
def test_fit_without_network_fails_fast_in_one_line(tmp_path):
    """`adamerge fit` of a CLIP config with the `openai` tag and nothing cached, once with
    HF_HUB_OFFLINE=1 and once with the hub unreachable: an error line naming the download (model,
    tag, hub repo, file) and how to give a local file, within seconds, with no retry warnings
    (before: 48 retry warnings over 54 s)."""
    experts = {t: tmp_path / f"{t}.safetensors" for t in ("mnist", "eurosat")}
    for p in experts.values():
        p.write_bytes(b"")  # only their existence is checked before the failure
    cfg = fit_config(tmp_path / "cfg.yaml", experts)
    base = {k: v for k, v in os.environ.items() if k not in HUB_VARS}
    home = tmp_path / "home"  # empty: no open_clip, hub or datasets cache
    base.update(HOME=str(home), HF_HOME=str(home / "hf"), XDG_CACHE_HOME=str(home / "cache"),
                ADAMERGE_CACHE=str(home / "adamerge"), PYTHONPATH=str(ROOT))
    dead = f"http://127.0.0.1:{closed_port()}"
    cases = {"HF_HUB_OFFLINE": {"HF_HUB_OFFLINE": "1"},
             "unreachable": {**{v: dead for v in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy",
                                                  "http_proxy", "all_proxy")}, "HF_ENDPOINT": dead}}
    for name, extra in cases.items():
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "adamerge", "fit", "--config", str(cfg),
                               "--trainer.default_root_dir", str(tmp_path / name)],
                              cwd=tmp_path, env={**base, **extra}, capture_output=True, text=True, timeout=120)
        took, err = time.monotonic() - start, proc.stderr
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode != 0, err[-2000:]
        # the retry count below is the check of "no retries"; the time only catches a hang (about
        # 9 s per case on 2 free cores, so the bound holds on a loaded machine too)
        assert took < 90, f"{name}: failed after {took:.0f} s\n{err[-2000:]}"
        assert sum("retry" in ln.lower() for ln in lines) < 3, err[-2000:]
        assert [ln for ln in lines if "error" in ln.lower()] == lines[-1:], err[-2000:]
        last = lines[-1]
        assert last.startswith("adamerge fit: error: open_clip model ViT-B-32 with pretrained tag 'openai'"), last
        for part in ("timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin",
                     "pretrained: /path/to/", "docs/offline.md"):
            assert part in last, last
        assert ("HF_HUB_OFFLINE=1 is set" if name == "HF_HUB_OFFLINE" else f"{dead} is unreachable") in last, last


# ----------------------------------------------------------- (2) local files before any download
def test_local_files_are_checked_before_any_download(tmp_path, monkeypatch, no_network, capsys):
    """A missing expert, local dataset folder or pretrained file is named at parse time, before
    open_clip or datasets are asked for anything (the dataset folder was checked only after the
    pretrained weights' download)."""
    import datasets
    import open_clip
    downloads = []
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: downloads.append(("open_clip", a)))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: downloads.append(("datasets", a)))
    experts = {t: tmp_path / f"{t}.safetensors" for t in ("mnist", "eurosat")}
    for p in experts.values():
        p.write_bytes(b"")
    cases = {
        "expert": (dict(experts={**experts, "eurosat": tmp_path / "gone.safetensors"}), "gone.safetensors"),
        "dataset folder": (dict(experts=experts, data_paths={"mnist": tmp_path / "no_mnist"}), "no_mnist"),
        "pretrained file": (dict(experts=experts, pretrained=str(tmp_path / "missing" / "open_clip_model.bin")),
                            "open_clip_model.bin"),
    }
    for name, (kwargs, missing) in cases.items():
        cfg = fit_config(tmp_path / f"{name}.yaml", **kwargs)
        code = main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 1 and missing in err and "not" in err, (name, err)
        assert downloads == [] and no_network == [], (name, downloads, no_network)


# ------------------------------------------------------------------ (3) FusionBench in bulk
def test_fusionbench_bulk_convert_equals_single_file_convert(tiny, tmp_path, capsys):
    """A folder of downloaded FusionBench repos (a `--local-dir` folder and the hub cache layout;
    transformers' CLIPVisionModel weights with and without the `vision_model.` prefix, safetensors
    and .bin) -> one image tower per task, each equal to `adamerge convert SRC OUT`, computing
    what the Hugging Face model computes; an `experts:` block on stdout."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, hidden_act="quick_gelu")
    src = tmp_path / "fusionbench"
    models = {}
    for seed, task in enumerate(("mnist", "stanford-cars")):
        torch.manual_seed(seed)
        models[task] = CLIPVisionModel(config).eval()
    # `hf download tanganke/clip-vit-base-patch32_mnist --local-dir ...`: transformers >= 5 keys
    local = src / "clip-vit-base-patch32_mnist"
    local.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in models["mnist"].state_dict().items()}, str(local / "model.safetensors"))
    # the hub cache: refs/main -> a snapshot; FusionBench's own files have the vision_model. prefix
    cache = src / "models--tanganke--clip-vit-base-patch32_stanford-cars"
    (cache / "snapshots" / "0123abcd").mkdir(parents=True)
    (cache / "snapshots" / "old").mkdir()
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0123abcd")
    state = {f"vision_model.{k}": v for k, v in models["stanford-cars"].state_dict().items()}
    torch.save(state, cache / "snapshots" / "0123abcd" / "pytorch_model.bin")
    torch.save({k: v + 1 for k, v in state.items()}, cache / "snapshots" / "old" / "pytorch_model.bin")
    (src / "models--timm--vit_base_patch32_clip_224.openai").mkdir()  # not a FusionBench repo: ignored

    out = tmp_path / "experts"
    common = ["--model", TINY, "--pretrained", str(tiny["base"])]
    assert main(["convert", "--fusionbench", str(src), "--out", str(out), *common]) == 0
    captured = capsys.readouterr()
    assert "[1/2] stanford_cars" in captured.err and "[2/2] mnist" in captured.err, captured.err
    block = yaml.safe_load(captured.out)
    assert block == {"experts": {"stanford_cars": str(out / "stanford_cars.safetensors"),
                                 "mnist": str(out / "mnist.safetensors")}}
    assert sorted(p.name for p in out.iterdir()) == ["mnist.safetensors", "stanford_cars.safetensors"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    visual = tiny["clip"].visual
    for task, file in (("mnist", local / "model.safetensors"),
                       ("stanford_cars", cache / "snapshots" / "0123abcd" / "pytorch_model.bin")):
        single = tmp_path / f"single_{task}.safetensors"
        assert main(["convert", str(file), str(single), *common]) == 0
        bulk, one = load_file(str(out / f"{task}.safetensors")), load_file(str(single))
        assert set(bulk) == set(one) == set(visual.state_dict())
        for k in one:
            assert torch.equal(bulk[k], one[k]), (task, k)
        # the converted tower computes the Hugging Face model's pooled output (then the base's proj)
        hf = models["stanford-cars" if task == "stanford_cars" else "mnist"]
        import copy
        tower = copy.deepcopy(visual)
        tower.load_state_dict(bulk)
        with torch.no_grad():
            want = hf(pixel_values=x).pooler_output @ bulk["proj"]
            torch.testing.assert_close(tower(x), want, atol=1e-5, rtol=1e-4)
    # the single-file form is unchanged; a wrong combination is refused
    with pytest.raises(SystemExit):
        main(["convert", str(local / "model.safetensors"), "--fusionbench", str(src)])
    capsys.readouterr()


# ------------------------------------------------------- (4) cached / local files work offline
def test_cached_and_local_weights_work_without_network(tiny, tmp_path, monkeypatch, no_network):
    """A pretrained tag whose file is in the hub cache loads with no connection at all (open_clip
    alone asks the hub first and retries); a local file works too; a tag not cached fails in one
    line; so do a dataset id and a transformers hub id, naming the option that gives local files."""
    from open_clip.pretrained import _PRETRAINED, _pcfg
    monkeypatch.setitem(_PRETRAINED, TINY, {"offline_test": _pcfg(hf_hub="adamerge-test/tiny-clip/", quick_gelu=True)})
    hub = tmp_path / "hub"
    snap = hub / "models--adamerge-test--tiny-clip" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (hub / "models--adamerge-test--tiny-clip" / "refs").mkdir()
    (hub / "models--adamerge-test--tiny-clip" / "refs" / "main").write_text("ab" * 20)
    torch.save(tiny["clip"].state_dict(), snap / "open_clip_pytorch_model.bin")
    want = tiny["clip"].state_dict()

    start = time.monotonic()
    for pretrained in ("offline_test", str(tiny["base"])):
        clip = create_clip(TINY, pretrained, cache_dir=str(hub))
        assert all(torch.equal(v, want[k]) for k, v in clip.state_dict().items()), pretrained
    assert no_network == [] and time.monotonic() - start < 20

    with pytest.raises(OfflineError) as exc:  # not cached: the probe of the (closed) hub port fails
        create_clip(TINY, "offline_test", cache_dir=str(tmp_path / "empty"))
    msg = str(exc.value)
    assert "\n" not in msg and "adamerge-test/tiny-clip" in msg and "'offline_test'" in msg and "is unreachable" in msg
    assert set(no_network) <= {"127.0.0.1"}, no_network  # one probe of the (closed) local hub address
    no_network.clear()
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        create_clip(TINY, "no-such-tag")

    from adamerge.data.hf import HFSource
    from adamerge.models.hf import HFCausalLMPool
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match=r"ylecun/mnist.*not in the local cache, and HF_HUB_OFFLINE=1 is set.*paths: "):
        HFSource(["mnist"], model=TINY, pretrained=None, image_cache="none",
                 hf_cache_dir=str(tmp_path / "ds")).raw("mnist", "test")
    (tmp_path / "lora").mkdir()
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"yes": {"labels": [" no", " yes"]}}))
    pool = HFCausalLMPool(base="adamerge-test/no-such-model", experts={"yes": str(tmp_path / "lora")},
                          tasks_file=str(tasks))
    with pytest.raises(OfflineError, match=r"base 'adamerge-test/no-such-model'.*`base: DIR`"):
        pool.load()
    assert no_network == []


# ------------------------------------------------ (5) language-model experts named by hub id
COMMIT, NEWER = "c0" * 20, "d1" * 20


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory):
    """A tiny Llama base with full experts (one sharded) and two LoRA adapters, local folders."""
    import peft
    import transformers
    from test_streamed_loading import build_world
    world = build_world(tmp_path_factory.mktemp("hub_lm"), shard="40KB")
    world["lora"] = {}
    for i, task in enumerate(("parity", "count")):
        torch.manual_seed(30 + i)
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                              init_lora_weights=False)
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(world["root"] / "base"), cfg)
        model.save_pretrained(world["root"] / f"lora_{task}")
        world["lora"][task] = str(world["root"] / f"lora_{task}")
    return world


def hub_cache(monkeypatch, hub: Path) -> Path:
    """``hub`` as the Hugging Face hub cache of this test (huggingface_hub reads HF_HUB_CACHE on import)."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def cache_repo(hub: Path, repo_id: str, folder: str | None, commit: str = COMMIT, files: tuple = ()) -> Path:
    """A snapshot of ``folder`` (or only ``files`` of it) in the hub cache layout:
    ``models--org--name/snapshots/<commit>/`` and ``refs/main`` naming the commit."""
    import shutil
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in Path(folder).iterdir() if folder else ():
        if not files or f.name in files:
            shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_experts_by_hub_id_come_from_the_hub_cache_without_network(lm_world, tmp_path, monkeypatch, no_network,
                                                                  caplog):
    """Full experts named by hub id (one of them sharded) are read from their cached snapshot with
    no connection at all, streamed or loaded, giving the task vectors of the same local folders;
    the task-vector file records each hub expert's id and commit, and is rewritten when a newer
    commit is cached."""
    import logging
    from adamerge.io.tensor_stack import read_stack
    from adamerge.models.hf import HFLanguageModelPool
    hub = hub_cache(monkeypatch, tmp_path / "hub")
    local = lm_world["experts"]
    ids = {"parity": "adamerge-test/llama-parity", "count": "adamerge-test/llama-count"}
    for task, repo in ids.items():
        cache_repo(hub, repo, local[task])
    experts = {**local, **ids}
    kw = {"base": str(lm_world["root"] / "base"), "tasks_file": lm_world["tasks_file"]}
    path = tmp_path / "tv.safetensors"
    for stream in (None, str(path)):
        want = HFLanguageModelPool(experts=local, **kw).load().task_vectors
        got = HFLanguageModelPool(experts=experts, task_vector_file=stream, **kw).load().task_vectors
        assert got.task_names == want.task_names and got.names == want.names
        assert all(torch.equal(a, b) for a, b in zip(got.tensors, want.tensors)), stream
    assert no_network == []
    _, meta = read_stack(path)
    assert json.loads(meta["experts"]) == {t: ids.get(t, str(Path(p).resolve())) for t, p in local.items()}
    assert json.loads(meta["expert_revisions"]) == {t: COMMIT for t in ids}
    assert not any(str(hub.resolve()) in f for f in json.loads(meta["sources"]))  # no mtime for hub files
    caplog.set_level(logging.INFO, logger="adamerge.engine.task_vectors")
    cache_repo(hub, ids["parity"], local["parity"], commit=NEWER)  # refs/main moves to a newer commit
    HFLanguageModelPool(experts=experts, task_vector_file=str(path), **kw).load()
    assert "(expert_revisions changed)" in caplog.text
    assert json.loads(read_stack(path)[1]["expert_revisions"])["parity"] == NEWER


def test_lora_adapters_by_hub_id_come_from_the_hub_cache(lm_world, tmp_path, monkeypatch, no_network):
    from adamerge.models.hf import HFLanguageModelPool
    hub = hub_cache(monkeypatch, tmp_path / "hub")
    cache_repo(hub, "adamerge-test/lora-parity", lm_world["lora"]["parity"])
    kw = {"base": str(lm_world["root"] / "base"), "tasks_file": lm_world["tasks_file"]}
    want = HFLanguageModelPool(experts=lm_world["lora"], **kw).load().task_vectors
    got = HFLanguageModelPool(experts={**lm_world["lora"], "parity": "adamerge-test/lora-parity"}, **kw).load()
    assert all(torch.equal(a, b) for a, b in zip(got.task_vectors.b, want.b))
    assert all(torch.equal(a, b) for a, b in zip(got.task_vectors.a, want.a)) and no_network == []
    with pytest.raises(ValueError, match="these are LoRA adapters.*drop task_vector_file"):  # known at load
        HFLanguageModelPool(experts={"parity": "adamerge-test/lora-parity"}, task_vector_file=str(tmp_path / "tv"),
                            **kw).load()


def test_an_expert_hub_id_not_cached_fails_in_one_line(lm_world, tmp_path, monkeypatch, no_network):
    """Not cached, or cached without its weights (a config only): one OfflineError line naming the
    id and how to give a local folder for its task, after one probe of the (closed) hub address, or
    none with HF_HUB_OFFLINE=1; a missing local-looking path is still refused when the pool is built."""
    from adamerge.models.hf import HFLanguageModelPool
    hub = hub_cache(monkeypatch, tmp_path / "hub")
    cache_repo(hub, "adamerge-test/config-only", lm_world["experts"]["count"], files=("config.json",))
    kw = {"base": str(lm_world["root"] / "base"), "tasks_file": lm_world["tasks_file"]}
    for repo in ("adamerge-test/absent", "adamerge-test/config-only"):
        for offline_flag in (False, True):
            if offline_flag:
                monkeypatch.setenv("HF_HUB_OFFLINE", "1")
            pool = HFLanguageModelPool(experts={**lm_world["experts"], "count": repo}, **kw)  # no check yet
            with pytest.raises(OfflineError) as exc:
                pool.load()
            msg = str(exc.value)
            assert "\n" not in msg and msg.startswith(f"expert {repo!r} (a Hugging Face hub id) "
                                                      "is not in the local cache, and "), msg
            assert ("HF_HUB_OFFLINE=1 is set" if offline_flag else "is unreachable") in msg, msg
            assert "`experts: {count: DIR}`" in msg and f"`hf download {repo} --local-dir DIR`" in msg, msg
            assert set(no_network) <= {"127.0.0.1"} and len(no_network) <= 1, no_network  # one probe at most
            no_network.clear()
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for gone in (str(tmp_path / "gone"), "./gone/expert", "org/name/sub"):
        with pytest.raises(FileNotFoundError, match=rf"expert folder\(s\) not found: \['{gone}'\]"):
            HFLanguageModelPool(experts={**lm_world["experts"], "count": gone}, **kw)


def test_an_expert_hub_id_downloads_config_and_weights_only(lm_world, tmp_path, monkeypatch):
    """With a network (faked: no request leaves), a hub expert is fetched with snapshot_download
    restricted to its config and safetensors weights; a repo without safetensors is fetched again
    for its pytorch_model.bin; a repo with neither is named in one line."""
    import fnmatch
    import shutil
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from adamerge.io import offline
    from adamerge.models.hf import HFLanguageModelPool
    parity = Path(lm_world["experts"]["parity"])
    repos = {"org/has-bin": tmp_path / "remote" / "bin", "org/empty": tmp_path / "remote" / "empty"}
    for folder in repos.values():  # what the hub holds: a README and tokenizer files besides the weights
        folder.mkdir(parents=True)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(lm_world["root"] / "base" / name if name != "config.json" else parity / name, folder / name)
        (folder / "README.md").write_text("an expert")
    torch.save(load_file(str(parity / "model.safetensors")), repos["org/has-bin"] / "pytorch_model.bin")
    calls = []

    def snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        """The files of the repo matching ``allow_patterns`` added to its one cached snapshot."""
        snap = tmp_path / "cache" / repo_id / COMMIT
        if local_files_only:
            if not snap.is_dir():
                raise LocalEntryNotFoundError("not cached")
            return str(snap)
        calls.append((repo_id, tuple(allow_patterns)))
        snap.mkdir(parents=True, exist_ok=True)
        for f in repos[repo_id].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy2(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(offline, "network_problem", lambda *a, **k: None)
    kw = {"base": str(lm_world["root"] / "base"), "tasks_file": lm_world["tasks_file"]}
    loaded = HFLanguageModelPool(experts={"parity": "org/has-bin"}, **kw).load()
    want = HFLanguageModelPool(experts={"parity": str(parity)}, **kw).load()
    assert all(torch.equal(a, b) for a, b in zip(loaded.task_vectors.tensors, want.task_vectors.tensors))
    assert [c[0] for c in calls] == ["org/has-bin"] * 2 and "model.safetensors" in calls[0][1]
    assert sorted(f.name for f in (tmp_path / "cache" / "org/has-bin" / COMMIT).iterdir()) == [
        "config.json", "pytorch_model.bin"]  # neither the README nor the tokenizer
    calls.clear()
    HFLanguageModelPool(experts={"parity": "org/has-bin"}, **kw).load()
    assert calls == []  # cached now: no download
    with pytest.raises(FileNotFoundError, match=r"^expert 'org/empty' \(a Hugging Face hub id\): hub repo "
                                                r"'org/empty' has no usable set of the files expected \(config.json, "):
        HFLanguageModelPool(experts={"parity": "org/empty"}, **kw).load()
