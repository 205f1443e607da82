"""ResumableTrainLoader: batches are a function of (seed, iteration) — the same when
resumed, split across ranks, or mapped by workers — and checkpoints describe the stream."""

import itertools
import logging
import random

import numpy as np
import pytest
import torch

from eql_d2.data.train_loader import (CeilRepeatFactorTrainingSampler, ResumableTrainLoader,
                                     global_batches)

NUM_IMAGES = 23


class RandomAugment:
    """Picklable mapper whose output records the image and draws from every global RNG."""

    def __call__(self, d):
        return {"image_id": d["image_id"], "np": float(np.random.rand()),
                "py": random.random(), "torch": float(torch.rand(1))}


def _dicts():
    return [{"file_name": f"img{i}.jpg", "image_id": i, "width": 40 + (i % 3) * 20,
             "height": 50} for i in range(NUM_IMAGES)]


def _loader(**kwargs):
    args = dict(total_batch_size=4, seed=3, aspect_ratio_grouping=True)
    args.update(kwargs)
    return ResumableTrainLoader(_dicts(), RandomAugment(), **args)


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def _rfs_factors():
    return torch.tensor([1.0 + (i % 4) * 0.6 for i in range(NUM_IMAGES)])


@pytest.mark.parametrize("sampler,rounding", [("TrainingSampler", "stochastic"),
                                               ("RepeatFactorTrainingSampler", "stochastic"),
                                               ("RepeatFactorTrainingSampler", "ceil")])
def test_resumed_loader_continues_the_uninterrupted_stream(sampler, rounding):
    rf = _rfs_factors() if sampler != "TrainingSampler" else None
    args = dict(sampler=sampler, repeat_factors=rf, repeat_rounding=rounding)
    whole = _take(_loader(**args), 12)
    resumed = _loader(**args)
    resumed.start_iter = 7
    assert _take(resumed, 5) == whole[7:]


def test_ceil_rounding_repeats_each_image_exactly_ceil_r_times_every_epoch():
    # integer, just-above-integer, fractional and float32-exact factors
    factors = torch.tensor([1.0, 1.001, 1.5, 2.0, 2.25, 3.999, 1.0, 4.0])
    expected = [1, 2, 2, 2, 3, 4, 1, 4]
    epoch = sum(expected)
    stream = CeilRepeatFactorTrainingSampler(factors, seed=7)._infinite_indices()
    epochs = [list(itertools.islice(stream, epoch)) for _ in range(5)]
    for indices in epochs:
        assert [indices.count(i) for i in range(len(factors))] == expected
    # shuffled anew each epoch, not one fixed order
    assert len({tuple(e) for e in epochs}) > 1


def test_stochastic_rounding_is_detectron2s_and_differs_from_ceil():
    factors = torch.full((200,), 1.5)
    loader = _loader(sampler="RepeatFactorTrainingSampler", repeat_factors=factors[:NUM_IMAGES])
    ceil = _loader(sampler="RepeatFactorTrainingSampler", repeat_factors=factors[:NUM_IMAGES],
                   repeat_rounding="ceil")
    # the first epoch of ceil rounding holds every image exactly twice: 46 samples
    first = [i for i in itertools.islice(ceil._index_stream(), 2 * NUM_IMAGES)]
    assert sorted(first) == sorted(list(range(NUM_IMAGES)) * 2)
    # detectron2's rounding gives 1 or 2 copies per image in an epoch, so its first 46
    # samples reach into a second epoch and some image appears a third time or only once
    stochastic = list(itertools.islice(loader._index_stream(), 2 * NUM_IMAGES))
    counts = [stochastic.count(i) for i in range(NUM_IMAGES)]
    assert counts != [2] * NUM_IMAGES


def test_repeat_rounding_is_checked_and_part_of_the_stream_state():
    with pytest.raises(ValueError, match="DATALOADER.REPEAT_ROUNDING 'floor'"):
        _loader(sampler="RepeatFactorTrainingSampler", repeat_factors=_rfs_factors(),
                repeat_rounding="floor")
    ceil = _loader(sampler="RepeatFactorTrainingSampler", repeat_factors=_rfs_factors(),
                   repeat_rounding="ceil")
    stochastic = _loader(sampler="RepeatFactorTrainingSampler", repeat_factors=_rfs_factors())
    with pytest.raises(ValueError, match="DATALOADER.REPEAT_ROUNDING is 'stochastic'"):
        ceil.load_state_dict(stochastic.state_dict())
    # a checkpoint from before the key existed was written with stochastic rounding
    old = stochastic.state_dict()
    del old["repeat_rounding"]
    stochastic.load_state_dict(old)
    with pytest.raises(ValueError, match="REPEAT_ROUNDING"):
        ceil.load_state_dict(old)


def test_workers_map_exactly_what_the_training_process_maps():
    assert _take(_loader(num_workers=2), 6) == _take(_loader(num_workers=0), 6)


def test_mapping_leaves_the_training_process_rngs_alone():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    _take(_loader(), 3)
    after = float(torch.rand(1)), float(np.random.rand()), random.random()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    assert after == (float(torch.rand(1)), float(np.random.rand()), random.random())


def test_ranks_split_every_global_batch_without_repeats_or_gaps():
    single = _take(_loader(), 10)
    ranks = [_take(_loader(rank=r, world_size=2), 10) for r in (0, 1)]
    for k in range(10):
        assert ranks[0][k] + ranks[1][k] == single[k]
    # resumed with another number of processes: the same samples, split anew
    resumed = [_loader(rank=r, world_size=4) for r in range(4)]
    for loader in resumed:
        loader.start_iter = 6
    parts = [_take(loader, 4) for loader in resumed]
    for k in range(4):
        assert [x["image_id"] for r in range(4) for x in parts[r][k]] == \
            [x["image_id"] for x in single[6 + k]]


def test_aspect_ratio_groups_are_pure_and_positions_unique():
    landscape = np.array([d["width"] > d["height"] for d in _dicts()])
    stream = iter(torch.randperm(NUM_IMAGES).tolist() * 5)
    batches = list(itertools.islice(global_batches(stream, 4, landscape), 20))
    positions = [p for b in batches for _, p in b]
    assert len(positions) == len(set(positions))
    for b in batches:
        assert len(b) == 4 and len({bool(landscape[i]) for i, _ in b}) == 1


def test_checkpoint_state_refuses_another_stream_and_takes_the_seed(caplog):
    state = _loader(seed=11).state_dict()
    loader = _loader(seed=99)
    loader.load_state_dict(state)
    assert loader.seed == 11
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH"):
        _loader(total_batch_size=8).load_state_dict(state)
    with pytest.raises(ValueError, match="DATALOADER.SAMPLER_TRAIN"):
        _loader(sampler="RepeatFactorTrainingSampler",
                repeat_factors=_rfs_factors()).load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        _loader(rank=1, world_size=2).load_state_dict(state)
    assert "Resuming a run of 1 processes with 2" in caplog.text
