"""The trainer of image classifiers: eql_d2's Trainer (resumable loader, atomic
checkpoints, per-iteration seeding, signals) with classification data and evaluation."""

import itertools

from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.utils import comm

from ..data.classification import ClassificationDatasetMapper
from ..data.train_loader import ResumableTrainLoader, check_image_files
from .trainer import Trainer

__all__ = ["ClassificationTrainer"]


class ClassificationTrainer(Trainer):
    """:class:`~eql_d2.engine.Trainer` for :class:`~eql_d2.modeling.meta_arch.ImageClassifier`
    on the datasets of :mod:`eql_d2.data.classification`.

    Training batches come from the same
    :class:`~eql_d2.data.train_loader.ResumableTrainLoader` as the detectors' (so
    ``--resume`` continues the sample stream and every augmentation draw exactly), with
    :class:`~eql_d2.data.classification.ClassificationDatasetMapper`; evaluation batches
    ``TEST.IMS_PER_BATCH`` images per process.
    """

    @classmethod
    def build_train_dataset(cls, cfg):
        return list(itertools.chain.from_iterable(
            DatasetCatalog.get(name) for name in cfg.DATASETS.TRAIN))

    @classmethod
    def build_train_loader(cls, cfg):
        """The resumable loader over DATASETS.TRAIN (uniform sampling); image files are
        checked to exist first (DATALOADER.CHECK_IMAGE_FILES)."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise ValueError(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r}: "
                             "image classifiers train with 'TrainingSampler' (repeat factors "
                             "are defined by the categories of detection annotations)")
        dicts = cls.build_train_dataset(cfg)
        if cfg.DATALOADER.CHECK_IMAGE_FILES:
            check_image_files((d["file_name"] for d in dicts if "file_name" in d),
                              cfg.DATASETS.TRAIN)
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return ResumableTrainLoader(
            dicts, ClassificationDatasetMapper(cfg, True),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH, seed=seed,
            aspect_ratio_grouping=False, num_workers=cfg.DATALOADER.NUM_WORKERS,
            max_failed_images=cfg.DATALOADER.MAX_FAILED_IMAGES,
            rank=comm.get_rank(), world_size=comm.get_world_size())

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            DatasetCatalog.get(dataset_name), mapper=ClassificationDatasetMapper(cfg, False),
            batch_size=cfg.TEST.IMS_PER_BATCH, num_workers=cfg.DATALOADER.NUM_WORKERS)
