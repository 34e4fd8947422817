"""AdaMerging on transformed task vectors (``preprocess``): the transform is applied, recorded in
the fingerprint (checkpoints of another transform are refused) and checked."""

import pytest
import torch

from adamerge.methods import AdaMerging
from adamerge.methods.checkpoint_guard import check_checkpoint
from adamerge.methods.preprocess import preprocess, transform_names
from adamerge.methods.sparsify import dare_task_vectors
from adamerge.methods.static import ties_task_vectors
from adamerge.methods.svd_merges import tsv_m_task_vectors
from conftest import RandomPool


def test_every_transform_is_reachable_and_recorded():
    tv = RandomPool().load().task_vectors
    assert transform_names() == ["ties", "dare", "breadcrumbs", "consensus", "tsv_m"]
    for name in transform_names():
        out = preprocess(tv, name)
        assert out.names == tv.names and out.meta["transform"].startswith(name)
    with pytest.raises(ValueError, match="unknown options \\['q'\\]"):
        preprocess(tv, "dare", {"q": 1})
    with pytest.raises(ValueError, match="preprocess 'dar'"):
        preprocess(tv, "dar")


def test_adamerging_learns_on_the_transformed_vectors():
    pool = RandomPool()
    tv = pool.load().task_vectors
    dare = AdaMerging(pool, preprocess="dare", preprocess_options={"p": 0.3, "seed": 1})
    want = dare_task_vectors(tv, p=0.3, seed=1)
    for got, ref in zip(dare.merged.task_vectors.tensors, want.tensors):
        assert torch.equal(got, ref)
    trim = AdaMerging(pool, trim=0.2)  # the ++ spelling: the same as preprocess ties keep 0.2
    same = AdaMerging(pool, preprocess="ties", preprocess_options={"keep": 0.2})
    assert trim.fingerprint == same.fingerprint
    assert torch.equal(trim.merged.task_vectors.tensors[0], ties_task_vectors(tv, 0.2).tensors[0])
    plain = AdaMerging(pool)
    saved = {"state_dict": plain.state_dict()}
    plain.on_save_checkpoint(saved)
    check_checkpoint(saved, plain.fingerprint, tuple(plain.merged.coefficients.shape), "plain.ckpt")
    with pytest.raises(ValueError, match="different model pool.*transform"):  # plain run, DARE vectors
        check_checkpoint(saved, dare.fingerprint, tuple(dare.merged.coefficients.shape), "plain.ckpt")
    tsv = AdaMerging(pool, preprocess="tsv_m")
    for got, ref in zip(tsv.merged.task_vectors.tensors, tsv_m_task_vectors(tv).tensors):
        torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="give one"):
        AdaMerging(pool, trim=0.2, preprocess="dare")
    with pytest.raises(ValueError, match="without preprocess"):
        AdaMerging(pool, preprocess_options={"p": 0.1})
