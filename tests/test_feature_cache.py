"""The per-image feature cache of the methods that read the experts' features (Surgery, Tinting,
pseudo-labels): on a miss it computes the stream's batch in hand, from the images in hand, with
the experts' weights formed once while they fit the memory budget; a resumed run (empty cache)
recomputes the same units, so it sees bitwise the same features."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from adamerge import MultiTaskDataModule, Surgery
from adamerge.data.datamodule import AdaptationStream, image_of
from adamerge.engine.expert_features import FeatureCache
from adamerge.models.pool import PreloadedPool
from adamerge.suites.synthetic import SuitePool, SuiteSource
from test_adamerging import trainer


def test_stream_units_are_the_first_pass_batches():
    """Each rank's share of every first-pass batch is one unit; the pass's leftover images (n not
    a multiple of the batch) are the last unit, without the next pass's images."""
    data = {"a": TensorDataset(torch.zeros(37, 1)), "b": TensorDataset(torch.zeros(20, 1))}
    for world in (1, 2):
        for rank in range(world):
            stream = AdaptationStream(data, batch_size=8, seed=3, rank=rank, world_size=world)
            units = stream.units()
            for pos, (task, ds) in enumerate(data.items()):
                n, share = len(ds), 8 // world
                for step in range(n // 8):
                    mine = stream.indices(pos, n, step)[rank * share:(rank + 1) * share]
                    assert all(units(task, i) == mine for i in mine)
                order = [int(i) for i in stream.permutation(pos, n, 0)]
                assert units(task, order[-1]) == order[(n - 1) // share * share:]
                covered = sorted(i for first in order[::share] for i in units(task, first))
                assert covered == list(range(n))  # the units partition the task's images


def _cache(pool, datasets, stream) -> FeatureCache:
    loaded = pool.load()
    load = lambda task, idx: torch.stack([image_of(datasets[task][i]) for i in idx])
    return FeatureCache.experts(loaded.encoder, loaded.task_vectors, load,
                                {t: len(d) for t, d in datasets.items()}, units=stream.units())


def test_a_miss_computes_the_batch_in_hand_and_a_resumed_cache_the_same_features():
    pool = PreloadedPool(SuitePool("tiny").load())
    source = SuiteSource("tiny")
    tasks = pool.load().task_vectors.task_names
    datasets = {t: source.dataset(t, "test") for t in tasks}
    stream = AdaptationStream(datasets, batch_size=16, seed=0)
    first_pass = min(len(d) for d in datasets.values()) // 16
    steps = first_pass + 3  # into the second pass: images seen before come back
    straight = _cache(pool, datasets, stream)
    served = {}
    for step in range(steps):
        for t, (x, idx) in stream.batch(step).items():
            served[(step, t)] = straight(t, idx, images=x)
        if step == first_pass - 1:
            # the first pass: every miss was exactly the batch in hand, taken from the batch
            assert straight.images_computed == (step + 1) * 16 * len(tasks)
            assert straight.images_loaded == 0
    # a run resumed at the last step starts with an empty cache: the second pass's images are
    # recomputed with the first-pass batch they came in, bitwise as the uninterrupted run saw them
    resumed = _cache(pool, datasets, stream)
    for t, (x, idx) in stream.batch(steps - 1).items():
        assert torch.equal(resumed(t, idx, images=x), served[(steps - 1, t)])
    assert resumed.images_loaded > 0  # those units were read again: not the batch in hand


def test_formed_expert_weights_are_kept_within_the_memory_budget():
    loaded = SuitePool("tiny").load()
    load = lambda task, idx: torch.zeros(len(idx), 3, 16, 16)
    sizes = {t: 4 for t in loaded.task_vectors.task_names}
    t = loaded.task_vectors.task_names[0]
    kept = FeatureCache.experts(loaded.encoder, loaded.task_vectors, load, sizes)
    assert kept.params_for(t, torch.device("cpu")) is kept.params_for(t, torch.device("cpu"))
    formed = FeatureCache.experts(loaded.encoder, loaded.task_vectors, load, sizes, keep_bytes=0)
    first, again = formed.params_for(t, torch.device("cpu")), formed.params_for(t, torch.device("cpu"))
    assert first is not again and all(torch.equal(first[n], again[n]) for n in first)


def test_surgery_fit_computes_each_first_pass_batch_once_from_the_batch_in_hand(tmp_path):
    """Under ``fit`` the caches (the experts' and the fixed merge's) use the stream's units: in the
    first pass each step computes exactly its batch, no image is read twice."""
    pool = PreloadedPool(SuitePool("tiny").load())
    model = Surgery(pool)
    dm = MultiTaskDataModule(SuiteSource("tiny"), batch_size=16)
    steps = 5
    trainer(tmp_path, steps).fit(model, dm)
    k = len(model.task_names)
    for cache in (model.experts, model.features_part._merged):
        assert cache.images_computed == steps * 16 * k and cache.images_loaded == 0
