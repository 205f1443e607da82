"""ResumableTrainLoader: batches are a function of (seed, iteration) — the same when
resumed, split across ranks, or mapped by workers — and checkpoints describe the stream."""

import itertools
import logging
import random

import numpy as np
import pytest
import torch

from eql_d2.data.train_loader import (CLASS_SAMPLERS, CeilRepeatFactorTrainingSampler,
                                     ResumableTrainLoader, class_aware_indices,
                                     class_balanced_indices, class_image_lists, global_batches)

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


# ------------------------------------------------------------- class-level samplers

# one category per image: the class an image was drawn for is its category
CLASS_SIZES = [1, 2, 5, 15, 40]  # images per category: a long tail over 63 images


def _class_dicts(sizes=CLASS_SIZES):
    dicts, cat = [], []
    for c, n in enumerate(sizes):
        cat += [c] * n
    for i, c in enumerate(cat):
        dicts.append({"file_name": f"img{i}.jpg", "image_id": i, "width": 40 + (i % 3) * 20,
                      "height": 50, "annotations": [{"category_id": c}]})
    return dicts, np.array(cat)


def _class_loader(sampler, **kwargs):
    args = dict(total_batch_size=4, seed=3, aspect_ratio_grouping=True, sampler=sampler)
    args.update(kwargs)
    return ResumableTrainLoader(_class_dicts()[0], RandomAugment(), **args)


def _bound(n, p, z=6.0):
    """z standard deviations of a binomial(n, p) count: with z = 6 a count outside it has
    probability < 2e-9, so a test over a handful of counts fails by chance < 1e-8."""
    return z * np.sqrt(n * p * (1 - p))


def test_class_image_lists_follow_the_annotations():
    dicts = [{"annotations": [{"category_id": 2}, {"category_id": 0}, {"category_id": 2}]},
             {"annotations": []}, {"annotations": [{"category_id": 2}]}]
    lists = class_image_lists(dicts)
    assert [x.tolist() for x in lists] == [[0], [], [0, 2]]


def test_class_aware_sampling_visits_every_class_once_per_round():
    dicts, cat = _class_dicts()
    k = len(CLASS_SIZES)
    stream = class_aware_indices(class_image_lists(dicts), seed=5)
    samples = np.array(list(itertools.islice(stream, 200 * k)))
    # exactly uniform: each round of K samples holds each class once
    rounds = cat[samples].reshape(200, k)
    assert (np.sort(rounds, axis=1) == np.arange(k)).all()
    # within a class the images come in shuffled passes: after m passes over a class of
    # s images, each of them was drawn m times
    for c, s in enumerate(CLASS_SIZES):
        drawn = samples[cat[samples] == c][: s * (200 // s)]
        assert (np.bincount(drawn, minlength=len(cat))[cat == c] == 200 // s).all()


def test_class_balanced_sampling_draws_classes_and_images_uniformly():
    dicts, cat = _class_dicts()
    k, n = len(CLASS_SIZES), 20000
    samples = np.array(list(itertools.islice(
        class_balanced_indices(class_image_lists(dicts), seed=5), n)))
    counts = np.bincount(cat[samples], minlength=k)
    assert (np.abs(counts - n / k) <= _bound(n, 1 / k)).all(), counts
    # given its class, an image is uniform among the class's images
    c = k - 1
    members = np.flatnonzero(cat == c)
    per_image = np.bincount(samples[cat[samples] == c], minlength=len(cat))[members]
    m, p = counts[c], 1 / len(members)
    assert (np.abs(per_image - m * p) <= _bound(m, p)).all(), per_image
    # not class-aware rounds: i.i.d. draws repeat a class within K samples
    assert any(len(set(cat[samples[i:i + k]])) < k for i in range(0, 50 * k, k))


@pytest.mark.parametrize("sampler", CLASS_SAMPLERS)
def test_class_samplers_resume_exactly_and_split_ranks_without_repeat_or_gap(sampler):
    whole = _take(_class_loader(sampler), 12)
    resumed = _class_loader(sampler)
    resumed.start_iter = 7
    assert _take(resumed, 5) == whole[7:]
    ranks = [_take(_class_loader(sampler, rank=r, world_size=2), 12) for r in (0, 1)]
    for k in range(12):
        assert ranks[0][k] + ranks[1][k] == whole[k]
    resumed = [_class_loader(sampler, rank=r, world_size=4) for r in range(4)]
    for loader in resumed:
        loader.start_iter = 6
    parts = [_take(loader, 4) for loader in resumed]
    for k in range(4):
        assert [x for r in range(4) for x in parts[r][k]] == whole[6 + k]
    # one image per class-level draw: the stream's epoch is the number of training images
    assert _class_loader(sampler).images_per_epoch == len(_class_dicts()[0])


def test_class_samplers_are_checked():
    state = _class_loader("ClassAwareSampler").state_dict()
    with pytest.raises(ValueError, match="DATALOADER.SAMPLER_TRAIN"):
        _class_loader("ClassBalancedSampler").load_state_dict(state)
    empty = [dict(d, annotations=[]) for d in _dicts()]
    with pytest.raises(ValueError, match="ClassAwareSampler draws images by their categories"):
        ResumableTrainLoader(empty, RandomAugment(), total_batch_size=4, seed=0,
                             sampler="ClassAwareSampler")


def test_class_samplers_of_a_compact_dataset_equal_those_of_its_dicts(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

    from eql_d2.data import compact, register_lvis_format
    from test_compact_dataset import random_lvis, write

    name = "class_sampler_compact_train"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_lvis_format(name, write(tmp_path / "train.json", random_lvis(3, num_images=120,
                                                                          num_categories=20)),
                         str(tmp_path))
    ours = compact.compact_detection_dataset([name], filter_empty=True)
    theirs = get_detection_dataset_dicts([name], filter_empty=True)
    a, b = class_image_lists(ours), class_image_lists(theirs)
    assert len(a) == len(b) > 10 and all(np.array_equal(x, y) for x, y in zip(a, b))
    for sampler in CLASS_SAMPLERS:
        args = dict(total_batch_size=4, seed=5, sampler=sampler, aspect_ratio_grouping=True)
        streams = [ResumableTrainLoader(d, None, **args)._index_stream() for d in (ours, theirs)]
        assert list(itertools.islice(streams[0], 300)) == list(itertools.islice(streams[1], 300))
