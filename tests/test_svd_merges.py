"""SVD-based merges (TSV-M, Iso-C, Iso-CTS) and their shared SVD step: the merges equal direct
transcriptions of the official steps; TSV-M of mutually orthogonal full-rank task matrices is their
sum and its K components sum to it; Iso-C has a flat spectrum on the sum's singular vectors;
Iso-CTS at common fraction 1.0 is Iso-C; the randomized truncated SVD gives the full-SVD merge on
low-rank-plus-noise task vectors; float32 failures fall back to float64; thin matrices keep one
direction per task; the on-disk cache and the in-process memo are reused and invalidated."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from adamerge.engine import svd as svd_step
from adamerge.engine.task_vectors import TaskVectors
from adamerge.methods import svd_merges as sm


@pytest.fixture(autouse=True)
def _fresh_memo():
    svd_step.clear_memo()
    yield
    svd_step.clear_memo()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pool(shapes: dict[str, tuple[int, ...]], k: int = 3, seed: int = 0,
         scale: float = 0.1) -> tuple[TaskVectors, dict[str, torch.Tensor]]:
    """Random task vectors (``[k, *shape]`` each) and a random base."""
    g = gen(seed)
    names = list(shapes)
    tensors = [scale * torch.randn(k, *shapes[n], generator=g) for n in names]
    base = {n: torch.randn(*shapes[n], generator=g) for n in names}
    return TaskVectors([f"task{i}" for i in range(k)], names, tensors), base


def vector_tolerance(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[..., k]``: how far float32 singular vectors of ``x`` may turn from the exact ones, by
    Wedin's bound: about ``c eps ||x|| / gap`` radians, ``gap`` the distance of each singular value
    to its neighbours (``c``: 16 sqrt(max(m, n)), a float32 SVD's backward error). A tolerance from
    the spectrum, not from one machine's figure: near-equal singular values allow more."""
    s = torch.linalg.svdvals(x.double())
    padded = torch.cat([s[..., :1] + s[..., :1], s, s[..., -1:] * 0], dim=-1)
    gaps = torch.minimum(padded[..., :-2] - padded[..., 1:-1], padded[..., 1:-1] - padded[..., 2:])[..., :k]
    c = 16 * max(x.shape[-2:]) ** 0.5 * torch.finfo(torch.float32).eps
    return (c * s[..., :1] / gaps.clamp_min(1e-30)).clamp(max=2.0)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-4) -> None:
    """``a`` equals ``b`` to ``rtol`` of ``b``'s largest entry."""
    scale = float(b.abs().max()) + 1e-12
    torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=rtol * scale)


# ------------------------------------------------------------------- the official steps, verbatim
def official_tsv_m(tau: torch.Tensor) -> torch.Tensor:
    """TSVM_utils.py L320-375 step by step (float64): zero [m, r] / [r] / [r, n] buffers, task i's
    top int(r / K) triplets in block i, polar factors of U and V^T from a second SVD."""
    k_tasks, m, n = tau.shape
    r = min(m, n)
    k = int(r * (1 / k_tasks))
    su, ss, sv = (torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64),
                  torch.zeros(r, n, dtype=torch.float64))
    for i in range(k_tasks):
        u, s, v = torch.linalg.svd(tau[i].double(), full_matrices=False)
        su[:, i * k:(i + 1) * k], ss[i * k:(i + 1) * k], sv[i * k:(i + 1) * k] = u[:, :k], s[:k], v[:k]
    uu, _, vu = torch.linalg.svd(su, full_matrices=False)
    uv, _, vv = torch.linalg.svd(sv, full_matrices=False)
    return (uu @ vu) @ torch.diag(ss) @ (uv @ vv)


def official_iso_cts(tau: torch.Tensor, fraction: float = 0.8) -> torch.Tensor:
    """iso.py L50-102 step by step (float64): task blocks first, then the common block, polar
    factors, flat spectrum (mean over all r)."""
    k_tasks, m, n = tau.shape
    r, tau = min(m, n), tau.double()
    common = int(r * fraction)
    common = r - round((r - common) / k_tasks) * k_tasks
    p = int((r - common) / k_tasks)
    u, s, v = torch.linalg.svd(tau.sum(0), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], v[:common]
    cu, cs, cv = (torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64),
                  torch.zeros(r, n, dtype=torch.float64))
    for i in range(k_tasks):
        a, b, d = torch.linalg.svd(tau[i] - uc @ uc.T @ tau[i], full_matrices=False)
        cu[:, i * p:(i + 1) * p], cs[i * p:(i + 1) * p], cv[i * p:(i + 1) * p] = a[:, :p], b[:p], d[:p]
    cu[:, k_tasks * p:], cs[k_tasks * p:], cv[k_tasks * p:] = uc, sc, vc
    a, _, b = torch.linalg.svd(cu, full_matrices=False)
    c, _, d = torch.linalg.svd(cv, full_matrices=False)
    return cs.mean() * (a @ b) @ (c @ d)


@pytest.mark.parametrize("shape,k", [((40, 24), 3), ((24, 24), 3), ((17, 50), 5)])
def test_tsv_m_and_iso_cts_follow_the_official_steps(shape, k):
    tv, base = pool({"w": shape, "b": (shape[0],)}, k=k)
    tau = tv.tensors[0]
    merged = sm.tsv_m(tv, base, scaling=0.7)
    close(merged["w"] - base["w"], 0.7 * official_tsv_m(tau))
    close(merged["b"], base["b"] + 0.7 * tv.tensors[1].mean(0), rtol=1e-6)  # non-matrices: the mean
    close(sm.iso_cts_deltas(tv)["w"], official_iso_cts(tau))


# ------------------------------------------------------------------- TSV-M
def test_tsv_m_of_orthogonal_full_rank_tasks_is_their_sum():
    k_tasks, m, n, rank = 3, 15, 12, 4  # r = 12, floor(r / K) = 4 = each task's rank
    g = gen(1)
    left = torch.linalg.qr(torch.randn(m, k_tasks * rank, generator=g)).Q
    right = torch.linalg.qr(torch.randn(n, k_tasks * rank, generator=g)).Q
    taus = torch.stack([(left[:, i * rank:(i + 1) * rank] * torch.linspace(2, 1, rank))
                        @ right[:, i * rank:(i + 1) * rank].T for i in range(k_tasks)])
    tv = TaskVectors(["a", "b", "c"], ["w"], [taus])
    base = {"w": torch.randn(m, n, generator=g)}
    close(sm.tsv_m(tv, base)["w"], base["w"] + taus.sum(0), rtol=1e-5)
    close(sm.tsv_m(tv, base, scaling=0.5)["w"], base["w"] + 0.5 * taus.sum(0), rtol=1e-5)


def test_tsv_m_components_sum_to_the_merge():
    tv, base = pool({"w": (20, 14), "v": (9, 30), "b": (20,), "conv": (4, 3, 2, 2)}, k=4)
    comps = sm.tsv_m_task_vectors(tv)
    assert comps.task_names == tv.task_names and comps.names == tv.names
    assert [t.shape for t in comps.tensors] == [t.shape for t in tv.tensors]
    assert comps.meta["transform"].startswith("tsv_m")
    delta = sm.tsv_m_deltas(tv)
    for name, t in zip(comps.names, comps.tensors):
        close(t.sum(0), delta[name], rtol=1e-5)
    # each component has its task's rank floor(r / K) (here 14 // 4 = 3)
    assert int(torch.linalg.matrix_rank(comps.tensors[0][1], rtol=1e-4)) == 3


def test_thin_matrices_keep_one_direction_per_task(caplog):
    tv, base = pool({"w": (5, 2)}, k=3)  # r = 2 < K = 3: floor(r / K) = 0
    with caplog.at_level(logging.INFO, logger="adamerge.methods.svd_merges"):
        comps = sm.tsv_m_task_vectors(tv)
        delta = sm.tsv_m_deltas(tv)["w"]
    assert "keep 1 direction per task" in caplog.text
    assert all(int(torch.linalg.matrix_rank(c, rtol=1e-4)) == 1 for c in comps.tensors[0])
    close(comps.tensors[0].sum(0), delta, rtol=1e-5)
    assert float(delta.norm()) > 0.1 * float(tv.tensors[0].norm(dim=(1, 2)).min())


def test_exclude_averages_matching_matrices():
    tv, base = pool({"enc.w": (8, 6), "text_projection": (6, 6)}, k=2)
    out = sm.tsv_m(tv, base)  # default exclude: *text_projection*
    close(out["text_projection"], base["text_projection"] + tv.tensors[1].mean(0), rtol=1e-6)
    out = sm.iso_c(tv, base, exclude=["enc.*"])
    close(out["enc.w"], base["enc.w"] + tv.tensors[0].mean(0), rtol=1e-6)
    assert not torch.allclose(out["text_projection"], base["text_projection"] + tv.tensors[1].mean(0))


# ------------------------------------------------------------------- Iso-C / Iso-CTS
def test_iso_c_has_a_flat_spectrum_on_the_sums_singular_vectors():
    tv, base = pool({"w": (18, 11), "b": (18,)}, k=3)
    out = sm.iso_c(tv, base, scaling=1.3)
    delta = (out["w"] - base["w"]) / 1.3
    total = tv.tensors[0].sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    sv = torch.linalg.svdvals(delta)
    close(sv, torch.full_like(sv, float(s.mean())), rtol=1e-5)  # one distinct singular value
    close(u.T @ delta @ vh.T, float(s.mean()) * torch.eye(11), rtol=1e-5)  # the sum's vectors, signs paired
    close(out["b"], base["b"] + 1.3 * tv.tensors[1].mean(0), rtol=1e-6)


def test_iso_cts_with_the_whole_common_space_is_iso_c():
    tv, base = pool({"w": (16, 12), "v": (10, 20), "b": (16,)}, k=3)
    a, b = sm.iso_cts(tv, base, common_fraction=1.0, scaling=0.8), sm.iso_c(tv, base, scaling=0.8)
    for n in tv.names:
        close(a[n] - base[n], b[n] - base[n], rtol=1e-5)
    assert not torch.allclose(sm.iso_cts(tv, base, common_fraction=0.5)["w"], b["w"], atol=1e-3)


def test_iso_cts_sizes_follow_the_official_rounding():
    assert sm.iso_cts_sizes(768, 8, 0.8) == (616, 19)  # int(614.4) = 614; round(19.25) = 19
    assert sm.iso_cts_sizes(16, 8, 0.8) == (16, 0)     # round(0.5) = 0 (half to even)
    assert sm.iso_cts_sizes(12, 8, 0.0) == (4, 1)      # official would give common = -4: floored
    with pytest.raises(ValueError, match="common_fraction"):
        sm.iso_cts(*pool({"w": (4, 4)}), common_fraction=1.5)
    with pytest.raises(ValueError, match="solver"):
        sm.tsv_m(*pool({"w": (4, 4)}), solver="exact")


# ------------------------------------------------------------------- the SVD step
def test_gram_solver_equals_the_full_svd_and_falls_back_where_it_cannot(caplog):
    g = torch.Generator().manual_seed(3)
    for shape in ((3, 40, 24), (3, 24, 40)):  # tall and wide: the Gram matrix of the smaller side
        x = torch.randn(*shape, generator=g)
        u, s, v = svd_step.top_svd(x, 5, "gram")
        fu, fs, fv = svd_step.top_svd(x, 5, "full")
        close(s, fs, rtol=1e-5)
        close(u @ torch.diag_embed(s) @ v.mT, fu @ torch.diag_embed(fs) @ fv.mT, rtol=1e-5)
        # the same vectors, up to sign, each within the float32 SVD's accuracy for its gap
        theta = vector_tolerance(x, 5)
        bound = torch.maximum(theta[..., :, None], theta[..., None, :]).double() + 1e-6
        assert bool((((u.mT @ fu).abs().double() - torch.eye(5)).abs() <= bound).all())
        assert u.dtype == torch.float32 and u.shape == fu.shape and v.shape == fv.shape
    # the TSV-M merge through it equals the official float32 SVD's, and is closer to float64
    tv, base = pool({"w": (30, 18), "v": (18, 30)}, k=3)
    tv64 = TaskVectors(tv.task_names, tv.names, [t.double() for t in tv.tensors])
    for name in ("w", "v"):
        gram, full = sm.tsv_m(tv, base, solver="gram")[name], sm.tsv_m(tv, base, solver="full")[name]
        exact = official_tsv_m(tv64.tensors[tv.names.index(name)]) + base[name].double()
        close(gram, full, rtol=1e-5)
        assert float((gram.double() - exact).norm()) <= 2 * float((full.double() - exact).norm()) + 1e-9
    # rank-deficient task matrices (rank 2 < k = 6): the Gram route would divide by zero
    low = torch.randn(3, 20, 2, generator=g) @ torch.randn(3, 2, 18, generator=g)
    with caplog.at_level(logging.INFO, logger="adamerge.engine.svd"):
        u, s, v = svd_step.top_svd(low, 6, "gram", "w")
    assert "using the full SVD" in caplog.text and "'w'" in caplog.text
    assert bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all())
    close(u @ torch.diag_embed(s) @ v.mT, low, rtol=1e-4)


def test_lowrank_merge_matches_the_full_one_on_low_rank_plus_noise(monkeypatch):
    # floor(72 / 4) = 18 kept of a rank-24 signal + 1% noise. The kept directions must be signal:
    # the polar factors mix every kept direction into the others whatever its singular value, so
    # arbitrary noise directions (rank < 18) would move the merge by percents.
    k_tasks, m, n, rank = 4, 90, 72, 24
    g = gen(3)
    taus = torch.stack([torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
                        + 0.01 * torch.randn(m, n, generator=g) for _ in range(k_tasks)])
    tv = TaskVectors([f"t{i}" for i in range(k_tasks)], ["w"], [taus])
    calls = []
    real = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **kw: calls.append(kw["q"]) or real(*a, **kw))
    state = torch.random.get_rng_state()
    low = sm.tsv_m_deltas(tv, solver="lowrank")["w"]
    assert calls == [svd_step.lowrank_columns(18, 72)] == [36]  # q = 2k
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    full = sm.tsv_m_deltas(tv, solver="full")["w"]
    assert float((low - full).norm() / full.norm()) < 1e-3
    svd_step.clear_memo()
    assert torch.equal(sm.tsv_m_deltas(tv, solver="lowrank")["w"], low)  # seeded: deterministic


def test_float32_failure_falls_back_to_float64(monkeypatch, caplog):
    tv, base = pool({"w": (12, 9)}, k=3)
    expected = sm.tsv_m(tv, base, solver="full")["w"]
    svd_step.clear_memo()
    real, failed = torch.linalg.svd, []

    def flaky(x, *args, **kwargs):
        if x.dtype == torch.float32 and not failed:
            failed.append(tuple(x.shape))
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    with caplog.at_level(logging.INFO, logger="adamerge.engine.svd"):
        got = sm.tsv_m(tv, base, solver="full")["w"]
    assert failed == [(3, 12, 9)]  # the batched per-task SVD
    assert "recomputing in float64" in caplog.text and "'w'" in caplog.text
    close(got, expected, rtol=1e-5)
    bad = tv.tensors[0].clone()
    bad[0, 0, 0] = float("nan")
    failed.clear()
    with pytest.raises(ValueError, match="non-finite"):
        svd_step.svd(bad, "w")


def test_wide_matrices_are_decomposed_through_their_transpose(monkeypatch, caplog):
    x = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))  # K=3 wide 5x11
    real, shapes = torch.linalg.svd, []

    def record(a, *args, **kwargs):
        shapes.append(tuple(a.shape))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", record)
    u, s, vh = svd_step.svd(x, "w")
    assert shapes == [(3, 11, 5)]  # LAPACK sees the tall transpose
    assert (u.shape, s.shape, vh.shape) == ((3, 5, 5), (3, 5), (3, 5, 11))
    close(u @ torch.diag_embed(s) @ vh, x, rtol=1e-5)
    torch.testing.assert_close(u.mT @ u, torch.eye(5).expand(3, 5, 5), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.mT, torch.eye(5).expand(3, 5, 5), rtol=0, atol=1e-5)
    assert bool((s[:, :-1] >= s[:, 1:]).all())
    shapes.clear()

    def fails_in_float32(a, *args, **kwargs):
        shapes.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", fails_in_float32)
    with caplog.at_level(logging.INFO, logger="adamerge.engine.svd"):
        u, s, vh = svd_step.svd(x, "w")
    assert shapes == [torch.float32, torch.float64] and "(3, 5, 11)" in caplog.text  # the caller's shape
    close(u @ torch.diag_embed(s) @ vh, x, rtol=1e-5)


def test_cache_is_read_back_and_keyed_by_the_task_vectors(tmp_path, monkeypatch):
    tv, base = pool({"w": (12, 10), "b": (12,)}, k=3)
    first = sm.iso_cts(tv, base, cache_dir=tmp_path)
    files = list((tmp_path / "svd").glob("*.safetensors"))
    assert len(files) == 1
    svd_step.clear_memo()

    def broken(*args, **kwargs):
        raise AssertionError("the SVD ran although the cache holds the merge")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    again = sm.iso_cts(tv, base, cache_dir=tmp_path)  # read from the file
    for n in tv.names:
        torch.testing.assert_close(again[n], first[n])
    other = TaskVectors(tv.task_names, tv.names, [tv.tensors[0] * 1.5, tv.tensors[1]])
    with pytest.raises(AssertionError, match="the SVD ran"):  # another fingerprint: a miss
        sm.iso_cts(other, base, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="the SVD ran"):  # other parameters: a miss
        sm.iso_cts(tv, base, common_fraction=0.5, cache_dir=tmp_path)
    # same norms (so the same file name), other content: the stored probe refuses the file
    shuffled = TaskVectors(tv.task_names, tv.names, [tv.tensors[0].flip(1), tv.tensors[1]])
    same = svd_step.cache_path(shuffled, "iso_cts", {}, tmp_path)
    assert same == svd_step.cache_path(tv, "iso_cts", {}, tmp_path)
    with pytest.raises(AssertionError, match="the SVD ran"):
        sm.iso_cts(shuffled, base, cache_dir=tmp_path)


def test_repeated_calls_reuse_the_merge_until_the_task_vectors_change(monkeypatch):
    tv, base = pool({"w": (12, 10)}, k=3)
    real, calls = torch.linalg.svd, []
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    sweep = [sm.tsv_m(tv, base, scaling=s, solver="full")["w"] for s in (0.5, 1.0, 1.5)]  # a scaling search
    assert len(calls) == 3  # one batched per-task SVD and two polar factors, once
    close(sweep[2] - base["w"], 3 * (sweep[0] - base["w"]), rtol=1e-5)
    tv.tensors[0].mul_(2)  # in place: the memo must not serve the old merge
    sm.tsv_m(tv, base, solver="full")
    assert len(calls) == 6


def test_cached_components_and_a_corrupt_cache_file(tmp_path, monkeypatch):
    tv, base = pool({"w": (12, 10), "b": (12,)}, k=3)
    comps = sm.tsv_m_task_vectors(tv, cache_dir=tmp_path)
    (path,) = (tmp_path / "svd").glob("*.safetensors")
    real = torch.linalg.svd
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: pytest.fail("the SVD ran on a cache hit"))
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **kw: pytest.fail("the SVD ran on a cache hit"))
    again = sm.tsv_m_task_vectors(tv, cache_dir=tmp_path)  # [K, *shape] tensors read back
    for a, b in zip(again.tensors, comps.tensors):
        torch.testing.assert_close(a, b)
    monkeypatch.setattr(torch.linalg, "svd", real)
    monkeypatch.setattr(torch.linalg, "eigh", real_eigh)
    path.write_bytes(b"not a safetensors file")
    redone = sm.tsv_m_task_vectors(tv, cache_dir=tmp_path)  # unreadable: recomputed and rewritten
    torch.testing.assert_close(redone.tensors[0], comps.tensors[0])
    assert path.stat().st_size > 100


def test_bench_svd_reports_both_methods_against_the_straightforward_code(capsys):
    """``adamerge bench --svd`` (narrow shapes): exact variants match the straightforward SVDs."""
    from adamerge.commands.main import main
    assert main(["bench", "--svd", "--blocks", "1", "--tasks", "3", "--width", "48", "--solvers", "full"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["config"]["width"] == 48 and set(res) >= {"tsv_m", "iso_cts"}
    for method in ("tsv_m", "iso_cts"):
        assert res[method]["straightforward"]["seconds"] >= 0
        assert res[method]["full"]["rel_dev"] < 1e-4 and "ratio" in res[method]["full"]
