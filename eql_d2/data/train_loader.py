"""Training data loader whose batches depend only on (seed, iteration): exact resume.

detectron2's training loader keeps its position and randomness in the running processes
(the sampler's generator, one RNG per data-loader worker), so ``--resume`` starts the
sample stream again from its beginning and augments differently. Here:

- The global sample stream is the one of detectron2's ``TrainingSampler`` or
  ``RepeatFactorTrainingSampler``, or of a class-level sampler (:func:`class_aware_indices`,
  :func:`class_balanced_indices`), for one seed. Every rank computes the same stream; it is
  indices only, so skipping to any point is cheap (LVIS v1, 16 images x 180k iterations:
  2.9M indices).
- Global batch k is the next ``SOLVER.IMS_PER_BATCH`` samples of that stream (with
  ``DATALOADER.ASPECT_RATIO_GROUPING``: the k-th bucket of landscape or portrait images to
  fill up, by the dataset's ``width`` / ``height``). Rank r trains on the r-th equal slice
  of it, so one process with 4 images per batch and two with 2 each see the same images.
- The sample at stream position p is read and augmented with python, numpy and torch RNGs
  seeded from (seed, p), whichever process or worker maps it; the RNG state of the
  training process is restored afterwards.

A resumed run therefore continues with exactly the batches the uninterrupted run would have
produced, for any ``DATALOADER.NUM_WORKERS``. :meth:`ResumableTrainLoader.state_dict` is
what a checkpoint stores.

Images that fail to load (missing or corrupt file) during training are logged and replaced
by another sample chosen from (seed, p), so the replacement is the same on resume; after
more than ``max_failed_images`` failures in a process, training stops with an error naming
them. :func:`check_image_files` finds missing files before training starts.
"""

import contextlib
import logging
import os
import random
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.utils.data as torchdata
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler

from .compact import CompactDataset

__all__ = ["ResumableTrainLoader", "CeilRepeatFactorTrainingSampler", "check_image_files",
           "derive_seed", "seeded_rngs", "SAMPLERS", "CLASS_SAMPLERS", "REPEAT_ROUNDINGS",
           "SEED_TRAIN_STEP", "class_image_lists", "class_aware_indices",
           "class_balanced_indices", "TrainingImages"]

logger = logging.getLogger(__name__)

# DATALOADER.SAMPLER_TRAIN values that pick a class first, then an image containing it
CLASS_SAMPLERS = ("ClassAwareSampler", "ClassBalancedSampler")
SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler") + CLASS_SAMPLERS
# DATALOADER.REPEAT_ROUNDING: detectron2's stochastic rounding, or ceil(r) copies per epoch
REPEAT_ROUNDINGS = ("stochastic", "ceil")

# First word of every derived seed: keeps the streams of different uses independent.
SEED_AUGMENT, SEED_REPLACE, SEED_TRAIN_STEP, SEED_LOADER = 1, 2, 3, 4

# Errors of reading / decoding an image file (PIL raises OSError for truncated files and
# SyntaxError for some malformed headers; a missing file is a FileNotFoundError).
_IMAGE_ERRORS = (OSError, SyntaxError)

# Key under which a mapped sample carries the failures that preceded it back to the
# training process (workers cannot log to the trainer's failure count).
_FAILED_KEY = "_eql_d2_failed_images"


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from non-negative integers; different tuples give independent streams
    (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Seed python's, numpy's and torch's (CPU) global RNGs for the block, then restore them."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def check_image_files(file_names: Iterable[str], dataset_names: Sequence[str]) -> None:
    """Raise FileNotFoundError listing the first missing of `file_names` (the dataset dicts'
    ``file_name``) and their count."""
    missing, total = [], 0
    for file_name in file_names:
        total += 1
        if not os.path.isfile(file_name):
            missing.append(file_name)
    if missing:
        shown = "\n  ".join(missing[:10])
        raise FileNotFoundError(
            f"{len(missing)} of {total} training images of {list(dataset_names)} "
            f"do not exist (first {min(len(missing), 10)}):\n  {shown}\n"
            "Fix the image root or the files; set DATALOADER.CHECK_IMAGE_FILES False to skip "
            "this check.")


def global_batches(indices: Iterator[int], batch_size: int,
                   landscape: Optional[np.ndarray] = None) -> Iterator[List[Tuple[int, int]]]:
    """Consecutive global batches of ``(dataset index, stream position)`` pairs.

    landscape [num images] bool or None: when given, images are grouped by orientation and
    a batch is emitted whenever one orientation's bucket is full (detectron2's
    aspect-ratio grouping, applied to the global stream).
    """
    if landscape is None:
        position = 0
        while True:
            ids = [next(indices) for _ in range(batch_size)]
            yield [(i, position + k) for k, i in enumerate(ids)]
            position += batch_size
    buckets: Tuple[list, list] = ([], [])
    for position, i in enumerate(indices):
        bucket = buckets[int(landscape[i])]
        bucket.append((i, position))
        if len(bucket) == batch_size:
            yield list(bucket)
            bucket.clear()


class CeilRepeatFactorTrainingSampler(RepeatFactorTrainingSampler):
    """detectron2's repeat-factor sampler with a fixed epoch: every image of repeat factor r
    appears exactly ceil(r) times per epoch (the expanded image list of mmdetection's
    ``ClassBalancedDataset`` and United-Perception's sampler, which the EFL and EQLv2 papers
    trained with), shuffled anew each epoch by detectron2's generator. detectron2's own
    rounding is stochastic: floor(r) + Bernoulli(frac(r)) copies, ceil(r) only on average
    for integers."""

    def _get_epoch_indices(self, generator):
        copies = torch.ceil(self._int_part + self._frac_part).to(torch.int64)
        return torch.repeat_interleave(torch.arange(len(copies)), copies)


def class_image_lists(dataset_dicts) -> List[np.ndarray]:
    """For each category (0-based, as detectron2's dicts number them), the sorted dataset
    indices of the images with an annotation of it; from the annotations of a list of dicts
    or the arrays of a :class:`~eql_d2.data.compact.CompactDataset`. Categories without an
    image are left out of the list's non-empty entries (and so never drawn)."""
    if isinstance(dataset_dicts, CompactDataset):
        positions, categories = dataset_dicts.image_categories()
    else:
        pairs = sorted({(i, a["category_id"]) for i, d in enumerate(dataset_dicts)
                        for a in d.get("annotations", ())})
        positions = np.array([p for p, _ in pairs], dtype=np.int64)
        categories = np.array([c for _, c in pairs], dtype=np.int64)
    num_classes = int(categories.max()) + 1 if len(categories) else 0
    order = np.lexsort((positions, categories))
    bounds = np.searchsorted(categories[order], np.arange(num_classes + 1))
    return [positions[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def class_aware_indices(class_images: Sequence[np.ndarray], seed: int) -> Iterator[int]:
    """Class-aware sampling (Shen et al., ECCV 2016, sec. 3.3): the classes that have images
    are visited in rounds, each round a new random order of all of them, and each visit
    takes the next image of that class's list, which is reshuffled whenever it is used up
    (the EQLv2 authors' ``CASDataset`` for cRT and LWS). Every round of K classes holds each
    class exactly once. Infinite; a function of `seed` only."""
    rng = np.random.default_rng(seed)
    classes = [c for c, images in enumerate(class_images) if len(images)]
    if not classes:
        raise ValueError("class-aware sampling: no training image has an annotation")
    queues = {c: iter(()) for c in classes}
    while True:
        for c in rng.permutation(classes):
            nxt = next(queues[c], None)
            if nxt is None:
                queues[c] = iter(rng.permutation(class_images[c]).tolist())
                nxt = next(queues[c])
            yield nxt


def class_balanced_indices(class_images: Sequence[np.ndarray], seed: int,
                           chunk: int = 4096) -> Iterator[int]:
    """Class-balanced sampling as cRT uses it (Kang et al., ICLR 2020, eq. 1 with q = 0):
    each sample draws a class uniformly among those with images, then one of its images
    uniformly, independently of every other sample. Infinite; a function of `seed` only."""
    rng = np.random.default_rng(seed)
    lists = [images for images in class_images if len(images)]
    if not lists:
        raise ValueError("class-balanced sampling: no training image has an annotation")
    sizes = np.array([len(x) for x in lists], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(lists)
    while True:
        cls = rng.integers(len(lists), size=chunk)
        pick = (rng.random(chunk) * sizes[cls]).astype(np.int64)
        yield from flat[starts[cls] + np.minimum(pick, sizes[cls] - 1)].tolist()


class _RankBatches:
    """Batch sampler: this rank's slice of every global batch, from batch ``start`` on."""

    def __init__(self, stream_fn, total_batch_size, landscape, rank, world_size, start):
        self.stream_fn = stream_fn
        self.total_batch_size = total_batch_size
        self.landscape = landscape
        self.per_rank = total_batch_size // world_size
        self.rank = rank
        self.start = start

    def __iter__(self):
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        batches = global_batches(self.stream_fn(), self.total_batch_size, self.landscape)
        for k, batch in enumerate(batches):
            if k >= self.start:
                # the iteration goes with each sample: multi-image mappers change with it
                yield [(i, p, k) for i, p in batch[lo:hi]]


class TrainingImages:
    """The training set as a multi-image mapper sees it (``mapper.multi_image``, e.g.
    :class:`~eql_d2.data.mosaic.MosaicMixUpMapper`): ``images[i]`` is the i-th dataset dict,
    and :meth:`draw` an index drawn with numpy's global RNG (seeded per sample by the loader)
    as the sampler weights images: uniformly, or with repeat factor sampling in proportion to
    each image's copies per epoch (r, or ceil(r) with "ceil" rounding), so every image of a
    mosaic follows the distribution of the sampled one."""

    def __init__(self, dataset, weights=None):
        self._dataset = dataset
        self._cumulative = (None if weights is None
                            else np.cumsum(np.asarray(weights, dtype=np.float64)))

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, index):
        return self._dataset[index]

    def draw(self) -> int:
        if self._cumulative is None:
            return int(np.random.randint(len(self._dataset)))
        u = np.random.uniform(0.0, self._cumulative[-1])
        return int(min(np.searchsorted(self._cumulative, u, side="right"),
                       len(self._cumulative) - 1))


class _SeededMapDataset(torchdata.Dataset):
    """Maps ``(dataset index, stream position, iteration)`` to a model input, with RNGs
    seeded from the position, replacing samples whose image cannot be read. A mapper with
    ``multi_image = True`` is called as ``mapper(record, images=, iteration=)`` with the
    :class:`TrainingImages` and the sample's iteration."""

    def __init__(self, dataset, mapper, seed, max_attempts, images=None):
        self.dataset = dataset
        self.mapper = mapper
        self.seed = seed
        self.max_attempts = max_attempts
        self.images = images

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        # an image whose size is not its dataset entry's cannot be trained on either (its
        # boxes would be misplaced): detectron2's mapper raises SizeMismatchError for it
        from detectron2.data.detection_utils import SizeMismatchError

        index, position, iteration = item
        failures = []
        for attempt in range(self.max_attempts):
            record = self.dataset[index]
            try:
                with seeded_rngs(derive_seed(SEED_AUGMENT, self.seed, position, attempt)):
                    if getattr(self.mapper, "multi_image", False):
                        data = self.mapper(record, images=self.images, iteration=iteration)
                    else:
                        data = self.mapper(record)
            except (*_IMAGE_ERRORS, SizeMismatchError) as e:
                failures.append((record.get("file_name", f"dataset index {index}"),
                                 f"{type(e).__name__}: {e}"))
                index = derive_seed(SEED_REPLACE, self.seed, position, attempt) % len(self.dataset)
                continue
            if failures:
                data[_FAILED_KEY] = failures
            return data
        listed = "\n  ".join(f"{f}: {e}" for f, e in failures)
        raise RuntimeError(
            f"{len(failures)} training images in a row failed to load (stream position "
            f"{position}), more than DATALOADER.MAX_FAILED_IMAGES = {self.max_attempts - 1}:"
            f"\n  {listed}")


def repeat_factor_epoch(repeat_factors: torch.Tensor, rounding: str) -> float:
    """Images in one epoch of repeat factor sampling: sum(ceil(r)) with "ceil" rounding,
    the expectation sum(r) with detectron2's "stochastic" rounding."""
    if rounding == "ceil":
        return float(torch.ceil(repeat_factors).sum())
    return float(repeat_factors.sum())


class ResumableTrainLoader:
    """Iterable of training batches (lists of model inputs) for one rank; see module doc.

    Args:
        dataset_dicts: detectron2 dataset dicts (``width`` / ``height`` used for grouping),
            a list or a :class:`~eql_d2.data.compact.CompactDataset` (whose arrays give the
            orientations, and which data-loader workers share as it is).
        mapper: callable dict -> model input (detectron2's ``DatasetMapper``).
        total_batch_size: images per global batch, divisible by ``world_size``.
        seed: seed of the sample stream and of every derived RNG (non-negative).
        sampler: "TrainingSampler", "RepeatFactorTrainingSampler", "ClassAwareSampler"
            (:func:`class_aware_indices`) or "ClassBalancedSampler"
            (:func:`class_balanced_indices`); the last two read each image's categories from
            the dicts' annotations (images without any are never drawn).
        repeat_factors: [num images] tensor for ``RepeatFactorTrainingSampler``.
        repeat_rounding: "stochastic" (detectron2's) or "ceil"
            (:class:`CeilRepeatFactorTrainingSampler`), for ``RepeatFactorTrainingSampler``.
        aspect_ratio_grouping: group batches by orientation.
        num_workers: data-loader worker processes (0: map in this process).
        max_failed_images: failures tolerated in this process before training stops.
        rank, world_size: this process's place in the job.
        images_per_epoch: the length of an epoch when it is not the sampler's own (see
            :attr:`images_per_epoch`; ``SOLVER.EPOCH_SAMPLER``); None: the sampler's.
    """

    def __init__(self, dataset_dicts, mapper, *, total_batch_size: int, seed: int,
                 sampler: str = "TrainingSampler", repeat_factors=None,
                 repeat_rounding: str = "stochastic",
                 aspect_ratio_grouping: bool = True, num_workers: int = 0,
                 max_failed_images: int = 20, rank: int = 0, world_size: int = 1,
                 images_per_epoch: Optional[float] = None):
        if sampler not in SAMPLERS:
            raise ValueError(f"DATALOADER.SAMPLER_TRAIN {sampler!r} is not supported by the "
                             f"resumable loader; use one of {', '.join(SAMPLERS)}")
        if (sampler == "RepeatFactorTrainingSampler") != (repeat_factors is not None):
            raise ValueError("repeat_factors go with RepeatFactorTrainingSampler only")
        if repeat_rounding not in REPEAT_ROUNDINGS:
            raise ValueError(f"DATALOADER.REPEAT_ROUNDING {repeat_rounding!r} is not one of "
                             f"{', '.join(REPEAT_ROUNDINGS)}")
        if total_batch_size <= 0 or total_batch_size % world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH = {total_batch_size} must be a positive "
                             f"multiple of the number of processes ({world_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if not dataset_dicts:
            raise ValueError("the training dataset is empty")
        self.num_images = len(dataset_dicts)
        self.total_batch_size = int(total_batch_size)
        self.sampler = sampler
        self.repeat_factors = repeat_factors
        # the stream of TrainingSampler does not depend on it: kept as "stochastic" there, so
        # resuming such a run never depends on the key
        self.repeat_rounding = (repeat_rounding if sampler == "RepeatFactorTrainingSampler"
                                else "stochastic")
        self.num_workers = int(num_workers)
        self.max_failed_images = int(max_failed_images)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.landscape = None
        compact = isinstance(dataset_dicts, CompactDataset)
        if aspect_ratio_grouping:
            if compact:
                self.landscape = dataset_dicts.landscape()
            elif all("width" in d and "height" in d for d in dataset_dicts):
                self.landscape = np.array([d["width"] > d["height"] for d in dataset_dicts])
            else:
                logger.warning("Some training dataset dicts lack width/height: batches are "
                               "not grouped by aspect ratio")
        # a list is serialized like detectron2's loader does it, so that workers share the
        # dicts without copy-on-read; a compact dataset is shared as it is (a file map)
        self.class_images = None
        if sampler in CLASS_SAMPLERS:
            self.class_images = class_image_lists(dataset_dicts)
            if not any(len(images) for images in self.class_images):
                raise ValueError(f"DATALOADER.SAMPLER_TRAIN {sampler} draws images by their "
                                 "categories, but no training image has an annotation")
        self._dataset = (DatasetFromList(dataset_dicts, copy=False, serialize=False) if compact
                         else DatasetFromList(list(dataset_dicts), copy=False, serialize=True))
        self._mapper = mapper
        self.start_iter = 0
        self.failed_images: List[Tuple[str, str]] = []
        if images_per_epoch is not None and not images_per_epoch > 0:
            raise ValueError(f"images_per_epoch must be positive, got {images_per_epoch}")
        self._images_per_epoch = images_per_epoch

    def _index_stream(self):
        """The global, infinite index stream (detectron2's sampler, before rank slicing)."""
        if self.sampler == "TrainingSampler":
            return TrainingSampler(self.num_images, seed=self.seed)._infinite_indices()
        if self.sampler == "ClassAwareSampler":
            return class_aware_indices(self.class_images, self.seed)
        if self.sampler == "ClassBalancedSampler":
            return class_balanced_indices(self.class_images, self.seed)
        sampler = (CeilRepeatFactorTrainingSampler if self.repeat_rounding == "ceil"
                   else RepeatFactorTrainingSampler)
        return sampler(self.repeat_factors, seed=self.seed)._infinite_indices()

    @property
    def images_per_epoch(self) -> float:
        """Samples in one epoch of the stream: the training images (also for the class
        samplers, whose stream has no epochs of its own), or with repeat factor sampling
        sum(ceil(r)) ("ceil" rounding) or the expectation sum(r) ("stochastic"); the
        constructor's ``images_per_epoch`` when given."""
        if self._images_per_epoch is not None:
            return float(self._images_per_epoch)
        if self.sampler != "RepeatFactorTrainingSampler":
            return float(self.num_images)
        return repeat_factor_epoch(self.repeat_factors, self.repeat_rounding)

    @property
    def mapper(self):
        """The mapper every sample goes through (set before iterating: workers copy it)."""
        return self._mapper

    @property
    def image_weights(self) -> Optional[torch.Tensor]:
        """Relative frequency of each image in the sampler's epoch, for the extra images of
        multi-image mappers: None (uniform) except with repeat factor sampling, where it is
        each image's copies per epoch (r, or ceil(r) with "ceil" rounding). The class-level
        samplers have no per-image weight: their extra images are drawn uniformly."""
        if self.sampler != "RepeatFactorTrainingSampler":
            return None
        if self.repeat_rounding == "ceil":
            return torch.ceil(self.repeat_factors)
        return self.repeat_factors

    def state_dict(self) -> Dict:
        """What a checkpoint needs to continue this stream (positions come from the
        trainer's iteration)."""
        return {"seed": self.seed, "sampler": self.sampler,
                "repeat_rounding": self.repeat_rounding, "num_images": self.num_images,
                "total_batch_size": self.total_batch_size, "world_size": self.world_size,
                "num_failed_images": len(self.failed_images)}

    def load_state_dict(self, state: Dict) -> None:
        """Continue the stream of a checkpoint: take its seed after checking that it
        describes the same stream. A different number of processes keeps the stream
        (global batches are split anew) but not the per-rank random draws: warned."""
        # checkpoints written before the key existed used detectron2's stochastic rounding
        state = dict({"repeat_rounding": "stochastic"}, **state)
        for key, ours in (("sampler", self.sampler), ("repeat_rounding", self.repeat_rounding),
                          ("num_images", self.num_images),
                          ("total_batch_size", self.total_batch_size)):
            if state.get(key) != ours:
                name = {"sampler": "DATALOADER.SAMPLER_TRAIN",
                        "repeat_rounding": "DATALOADER.REPEAT_ROUNDING",
                        "num_images": "number of training images (DATASETS.TRAIN)",
                        "total_batch_size": "SOLVER.IMS_PER_BATCH"}[key]
                raise ValueError(
                    f"Cannot resume the training sample stream: the checkpoint's {name} is "
                    f"{state.get(key)!r}, this run's is {ours!r}. Resume with the original "
                    "setting, or start a new run (without --resume) from the checkpoint's "
                    "weights (MODEL.WEIGHTS).")
        if state.get("world_size") != self.world_size:
            logger.warning(
                "Resuming a run of %s processes with %s: the sample stream continues where it "
                "stopped, but per-process random draws (e.g. proposal sampling) differ from "
                "the original run's", state.get("world_size"), self.world_size)
        if int(state["seed"]) != self.seed:
            logger.info("Training sample stream: seed %d from the checkpoint (this run's "
                        "was %d)", int(state["seed"]), self.seed)
        self.seed = int(state["seed"])

    def __iter__(self):
        batches = _RankBatches(self._index_stream, self.total_batch_size, self.landscape,
                               self.rank, self.world_size, self.start_iter)
        dataset = _SeededMapDataset(self._dataset, self._mapper, self.seed,
                                    max_attempts=self.max_failed_images + 1,
                                    images=TrainingImages(self._dataset, self.image_weights))
        # Worker seeds come from this generator, not from the training process's torch RNG.
        generator = torch.Generator()
        generator.manual_seed(derive_seed(SEED_LOADER, self.seed, self.rank, self.start_iter))
        loader = torchdata.DataLoader(dataset, batch_sampler=batches,
                                      num_workers=self.num_workers,
                                      collate_fn=trivial_batch_collator, generator=generator)
        for batch in loader:
            for data in batch:
                self._record_failures(data.pop(_FAILED_KEY, ()))
            yield batch

    def _record_failures(self, failures):
        for file_name, error in failures:
            self.failed_images.append((file_name, error))
            logger.warning("Training image could not be read and was replaced by another "
                           "sample (%d so far, limit DATALOADER.MAX_FAILED_IMAGES = %d): %s (%s)",
                           len(self.failed_images), self.max_failed_images, file_name, error)
        if len(self.failed_images) > self.max_failed_images:
            listed = "\n  ".join(f"{f}: {e}" for f, e in self.failed_images[:50])
            raise RuntimeError(
                f"{len(self.failed_images)} training images failed to load, more than "
                f"DATALOADER.MAX_FAILED_IMAGES = {self.max_failed_images}:\n  {listed}")

