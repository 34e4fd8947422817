"""SMILE upscaling: per-token routed low-rank SVD experts of the task vectors, training-free."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from adamerge.engine.task_vectors import TaskVectors
from adamerge.exported import ExportedModel
from adamerge.methods import registry
from adamerge.methods.smile import Smile, SmileLinear, smile_factors, smile_routing
from adamerge.methods.twin import find_linears
from adamerge.models.pool import LoadedPool, PreloadedPool
from conftest import RandomPool, images

ROUTED = ["blocks.0.qkv", "blocks.0.proj", "blocks.0.fc1", "blocks.0.fc2", "proj"]


def linear_only_pool() -> LoadedPool:
    """RandomPool's experts with every task vector outside the routed linear layers set to zero:
    each expert differs from the base only where SMILE routes."""
    loaded = RandomPool().load()
    tv = loaded.task_vectors
    keep = [n.rpartition(".")[0] in ROUTED for n in tv.names]
    tensors = [t if k else torch.zeros_like(t) for t, k in zip(tv.tensors, keep)]
    return LoadedPool(loaded.encoder, TaskVectors(list(tv.task_names), list(tv.names), tensors), loaded.heads,
                      loaded.expert_state)


def expert_params(loaded: LoadedPool, k: int) -> dict[str, torch.Tensor]:
    base = dict(loaded.encoder.named_parameters())
    tv = loaded.task_vectors
    return {n: base[n] + tau[k] for n, tau in zip(tv.names, tv.tensors)}


def fusionbench_layer(x: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, ws: list[torch.Tensor],
                      bs: list[torch.Tensor], gate_k: int, k: int, top_k: int) -> torch.Tensor:
    """FusionBench's ``SmileMoELinear.forward`` (fusion_bench/models/smile_moe/linear_from_module.py
    L244-303, with SmileGate L17-80 and SmileCompressedLinear L82-145) transcribed in float64."""
    x, w0, b0 = x.double(), w0.double(), b0.double()
    diffs = [w.double() - w0 for w in ws]
    svds = [torch.linalg.svd(d, full_matrices=True) for d in diffs]
    gate = torch.cat([vh[:gate_k] for _, _, vh in svds])            # [K g, D]: v[:, :g].T per expert
    tokens = x.reshape(-1, x.shape[-1])
    logits = (tokens @ gate.T).view(tokens.shape[0], len(ws), -1).norm(p=2, dim=2)
    weights = torch.softmax(logits, dim=1)
    weights, chosen = torch.topk(weights, top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros(tokens.shape[0], w0.shape[0], dtype=torch.float64)
    for e, ((u, s, vh), b) in enumerate(zip(svds, bs)):
        rows, slot = torch.where(chosen == e)
        if rows.numel() == 0:
            continue
        svh = s[:k, None] * vh[:k]                                  # (s * v).T
        expert = F.linear(F.linear(tokens[rows], svh), u[:, :k], b.double() - b0)
        out.index_add_(0, rows, expert * weights[rows, slot, None])
    return (tokens @ w0.T + b0 + out).reshape(*x.shape[:-1], -1)


def test_the_row_is_fusionbench_config_and_training_free():
    method = registry.get("smile")
    assert method.build is Smile and method.kind == "learned"
    d = method.defaults()
    assert (d["k"], d["gate_k"], d["top_k"], d["layers"]) == (128, 1, 1, "linear")
    model = method.build(PreloadedPool(RandomPool().load()))
    assert model.trainable_parameters() == []
    assert "training-free" in model.refusal("fit") and "training-free" in model.refusal("online")
    assert model.refusal("export") is None and registry.row_of(model)[0] == "smile"


@pytest.mark.parametrize("k", [0, 16])  # 0: FusionBench's "full expert"; 16 >= min(H, D) of every layer
def test_a_router_fixed_on_one_task_at_full_rank_gives_that_expert(k):
    loaded = linear_only_pool()
    model = Smile(PreloadedPool(loaded), k=k)
    assert model.smile_layers == ROUTED and find_linears(loaded.encoder) == ROUTED
    assert all(type(m) is nn.Linear for n, m in loaded.encoder.named_modules() if n in ROUTED)  # pool untouched
    x = images(5)
    params = model.merged.merged_parameters()
    base = dict(loaded.encoder.named_parameters())
    for n in params:  # nothing outside the routing moves: the pretrained weights
        assert torch.equal(params[n], base[n]), n
    for t in range(len(loaded.task_vectors.task_names)):
        for layer in model.routed_layers().values():
            layer.route = lambda tokens, t=t: F.one_hot(torch.full((tokens.shape[0],), t), 3).float()
        with torch.no_grad():
            got = model.merged(x, params=params)
            want = functional_call(loaded.encoder, expert_params(loaded, t), (x,), strict=False)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gate_k,k,top_k", [(1, 128, 1), (2, 3, 2), (3, 2, 3)])
def test_one_layer_equals_a_float64_transcription_of_fusionbench(gate_k, k, top_k):
    g = torch.Generator().manual_seed(gate_k * 10 + top_k)
    h, d, num = 7, 5, 3
    w0, b0 = torch.randn(h, d, generator=g), torch.randn(h, generator=g)
    ws = [w0 + 0.3 * torch.randn(h, d, generator=g) for _ in range(num)]
    bs = [b0 + 0.1 * torch.randn(h, generator=g) for _ in range(num)]
    x = torch.randn(4, 6, d, generator=g)  # [B, N, D]: every token routed on its own
    f = smile_factors(torch.stack([w - w0 for w in ws]), k, gate_k)
    bias = torch.stack([b - b0 for b in bs])
    layer = SmileLinear(nn.Linear(d, h).requires_grad_(False), f, bias, num, top_k)
    layer.weight.copy_(w0)
    layer.bias.copy_(b0)
    want = fusionbench_layer(x, w0, b0, ws, bs, gate_k, min(k, min(h, d)), top_k)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_a_token_in_one_task_vectors_top_direction_is_routed_to_it():
    # rank-1 task vectors with orthonormal input directions: token v_b scores only on expert b
    d, h = 6, 4
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0]
    deltas = torch.stack([torch.outer(torch.randn(h, generator=torch.Generator().manual_seed(i)), basis[:, i])
                          for i in range(3)])
    f = smile_factors(deltas, 1, 1)
    r = smile_routing(basis[:, :3].T * 5.0, f["gate"], 3, 1)
    assert torch.equal(r, torch.eye(3))
    soft = smile_routing(basis[:, :3].T, f["gate"], 3, 2)  # top 2 renormalised: the winner first
    assert torch.allclose(soft.sum(-1), torch.ones(3)) and (soft.argmax(-1) == torch.arange(3)).all()
    assert ((soft > 0).sum(-1) == 2).all()
    one = smile_routing(torch.randn(5, d), f["gate"][:1], 1, 1)  # one expert: weight 1
    assert torch.equal(one, torch.ones(5, 1))


def test_export_by_method_rebuilds_the_routed_model(tmp_path, capsys):
    from test_contract import cli, write_config
    config = write_config("adamerging_layerwise", tmp_path)  # another row's config: the pool and data
    out = tmp_path / "export"
    code, err = cli(capsys, "export", "--config", config, "--method", "smile", "--hparam", "gate_k=2",
                    "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["row"] == "smile" and manifest["checkpoint"] is None and "smile.safetensors" in manifest["files"]
    from adamerge.commands.export import build_from_config
    model, dm = build_from_config([str(config)])
    smile = Smile(PreloadedPool(model.loaded), gate_k=2).eval()
    x = torch.stack([dm.dataset(smile.task_names[0], "test")[i][0] for i in range(6)])
    exported = ExportedModel.from_folder(out)
    params = smile.merged.merged_parameters()
    for task in smile.eval_tasks:
        with torch.no_grad():
            want = smile.task_logits({task: x}, params)[task]
        torch.testing.assert_close(exported(x, task), want, rtol=1e-5, atol=1e-5)
    # a row that learns is still refused without its checkpoint, in one line
    code, err = cli(capsys, "export", "--config", config, "--out", tmp_path / "no-ckpt")
    assert code == 1 and "--ckpt_path" in err and len(err.strip().splitlines()) == 1


def test_a_layer_no_expert_moved_stays_plain_and_copies_carry_their_experts():
    """FusionBench skips a layer whose weight task vectors are all zero (its experts' bias differences
    would otherwise be added by a gate with nothing to score); a deep copy routes with its own buffers,
    which never enter the state dict."""
    import copy
    loaded = RandomPool().load()
    tv = loaded.task_vectors
    tensors = [torch.zeros_like(t) if n == "blocks.0.fc2.weight" else t for n, t in zip(tv.names, tv.tensors)]
    loaded = LoadedPool(loaded.encoder, TaskVectors(list(tv.task_names), list(tv.names), tensors), loaded.heads,
                        loaded.expert_state)
    model = Smile(PreloadedPool(loaded))
    assert "blocks.0.fc2" not in model.smile_layers and type(model.merged.module.blocks[0].fc2) is nn.Linear
    assert not any(k.endswith((".gate", ".a", ".b", ".expert_bias")) for k in model.merged.module.state_dict())
    twin = copy.deepcopy(model.merged.module)
    layer, copied = model.routed_layers()["blocks.0.fc1"], twin.blocks[0].fc1
    assert copied.a is not layer.a and torch.equal(copied.a, layer.a)
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model.merged.module(x), rtol=0, atol=0)


def test_mlp_routes_only_the_layouts_mlps():
    model = Smile(PreloadedPool(RandomPool().load()), layers="mlp")
    assert model.smile_layers == ["blocks.0.fc1", "blocks.0.fc2"]
    assert type(model.merged.module.get_submodule("blocks.0.qkv")) is nn.Linear


def test_fit_is_refused_in_one_line_before_any_svd(tmp_path, capsys, monkeypatch):
    import adamerge.methods.smile as smile_module
    from test_contract import cli, write_config
    monkeypatch.setattr(smile_module, "smile_factors", lambda *a, **k: pytest.fail("SVDs ran before the refusal"))
    code, err = cli(capsys, "fit", "--config", write_config("smile", tmp_path), "--trainer.default_root_dir",
                    tmp_path / "run")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "Smile is training-free" in lines[0] and "nothing to fit" in lines[0]


def test_bad_settings_are_named():
    p = PreloadedPool(RandomPool().load())
    with pytest.raises(ValueError, match="model.top_k must be >= 1"):
        Smile(p, top_k=0)
    with pytest.raises(ValueError, match="model.gate_k must be >= 1"):
        Smile(p, gate_k=0)
    with pytest.raises(ValueError, match=r"layers \['nope'\] have no task vector"):
        Smile(p, layers=["nope"])
