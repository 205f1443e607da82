import logging
import os
import weakref

from detectron2.data import DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.engine import (AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase,
                               create_ddp_model)
from detectron2.engine import hooks as d2_hooks
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import load_category_metadata
from ..data.compact import (CompactDataset, compact_detection_dataset, compact_training_sets,
                            prepare_compact)
from ..evaluation import build_evaluator
from ..data.dataset_mapper import ImageLabelDatasetMapper
from ..data.mosaic import MosaicMixUpMapper, build_train_augmentations, no_augmentation_iters
from ..data.train_loader import ResumableTrainLoader, check_image_files, repeat_factor_epoch
from ..modeling.roi_heads import needs_image_labels
from ..solver import build_optimizer, resolve_epoch_schedule
from ..solver.schedules import build_lr_scheduler
from .checkpoint import AtomicCheckpointer
from .ema import CHECKPOINT_KEY as EMA_KEY
from .ema import ModelEMA, ModelEMAHook, NoAugmentationPhase
from .hooks import RegimeIndicatorWriter, SeedEachIteration, StopOnSignal

__all__ = ["Trainer", "prepare_datasets", "check_num_classes", "wrap_distributed",
           "NUM_CLASSES_KEYS"]

# Which config key holds the number of foreground classes, per meta-architecture.
NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "DecoupledRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "EFLRetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "ATSS": "MODEL.ATSS.NUM_CLASSES",
    "EFLFCOS": "MODEL.FCOS.NUM_CLASSES",
    "PAA": "MODEL.PAA.NUM_CLASSES",
}


def _cfg_get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_num_classes(cfg):
    """Raise ValueError when the model's class count disagrees with a configured dataset.

    Reads the datasets' metadata as it stands and loads nothing: a training set whose
    metadata was not loaded (inference, see :func:`prepare_datasets`) is not checked.
    """
    key = NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    if key is None:
        return
    value = _cfg_get(cfg, key)
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        meta = MetadataCatalog.get(name)
        classes = meta.get("thing_classes")
        if classes is not None and len(classes) != value:
            source = meta.get("json_file", "its metadata")
            raise ValueError(
                f"{key} = {value}, but dataset '{name}' ({source}) has {len(classes)} categories; "
                f"set {key} {len(classes)}"
            )


def prepare_datasets(cfg, *, training=True):
    """Generate Synthetic-LT if needed and load the category metadata of the datasets used.

    training=True: DATASETS.TRAIN and DATASETS.TEST. Runs before the model is built, because
    losses such as EQL read class frequencies from the training sets' metadata (their JSON
    must exist then).
    training=False (evaluation, inference): DATASETS.TEST only. The training sets are not
    loaded, generated, or required to be registered: a trained model takes what it needs
    from its checkpoint (EQL's frequencies) and config.

    With DATALOADER.COMPACT_DATASET, training sets in the LVIS format are converted into
    their compact form (:mod:`eql_d2.data.compact`) if it is absent or stale, and their
    category metadata comes from it.

    On several processes per machine, local rank 0 generates and converts, and the others
    wait, then map what it wrote.
    """
    names = list(cfg.DATASETS.TEST)
    if training:
        names = list(cfg.DATASETS.TRAIN) + names
    compact = (compact_training_sets(cfg) if training else None) or []

    def prepare():
        # the other ranks map what local rank 0 converted (their metadata comes from it
        # even when the metadata cache could not be written)
        for loader in compact:
            prepare_compact(loader)
        for name in names:
            load_category_metadata(name)

    if comm.get_local_rank() == 0:
        prepare()
    comm.synchronize()
    prepare()
    check_num_classes(cfg)


class Trainer(DefaultTrainer):
    """DefaultTrainer with LVIS/COCO evaluators by dataset type, atomic checkpoints, the
    resumable training loader and distributed training on CPU.

    - Several processes without CUDA: the model is wrapped in DistributedDataParallel
      without device ids (gloo), as torch requires for CPU modules; on CUDA as detectron2 does.
    - The training loader is :class:`~eql_d2.data.train_loader.ResumableTrainLoader`; the
      checkpoint's ``trainer`` entry carries its state (``data_stream``), and
      :class:`~eql_d2.engine.hooks.SeedEachIteration` seeds the RNGs of every iteration, so
      ``--resume`` continues the run it resumes (see README, "What --resume guarantees").
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__, except the DDP wrapper and the checkpointer.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # SOLVER.EPOCHS: the iterations (schedule, hooks, max_iter) follow from the sampler's
        # epoch; nothing built above reads them
        cfg = resolve_epoch_schedule(cfg, data_loader.images_per_epoch)
        # YOLOX's last epochs without Mosaic / MixUp (INPUT.MOSAIC.NO_AUG_EPOCHS), also the
        # constant end of its schedule
        self.no_aug_iters = no_augmentation_iters(cfg, data_loader.images_per_epoch)
        model = wrap_distributed(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer,
                                                 constant_iters=self.no_aug_iters)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        """detectron2's optimizer; ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"`` clips the
        norm of all gradients together (:func:`eql_d2.solver.build_optimizer`)."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer, constant_iters=0):
        """detectron2's schedulers and ``"YOLOXWarmCosineLR"``, whose last `constant_iters`
        iterations keep ``SOLVER.BASE_LR_END`` (:mod:`eql_d2.solver.schedules`)."""
        return build_lr_scheduler(cfg, optimizer, constant_iters=constant_iters)

    @classmethod
    def build_train_dataset(cls, cfg):
        """The dataset dicts of DATASETS.TRAIN, filtered as detectron2 filters them: a
        :class:`~eql_d2.data.compact.CompactDataset` over their compact form when
        :func:`~eql_d2.data.compact.compact_training_sets` says so, else detectron2's list."""
        if compact_training_sets(cfg) is not None:
            return compact_detection_dataset(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        return get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                           if cfg.MODEL.KEYPOINT_ON else 0),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)

    @classmethod
    def build_train_loader(cls, cfg):
        """The resumable loader over :meth:`build_train_dataset` with detectron2's
        DatasetMapper; image files are checked to exist first (DATALOADER.CHECK_IMAGE_FILES).
        A compact dataset gives its file names and repeat factors from its arrays, without
        building every dict."""
        dicts = cls.build_train_dataset(cfg)
        compact = isinstance(dicts, CompactDataset)
        if cfg.DATALOADER.CHECK_IMAGE_FILES:
            check_image_files(dicts.file_names() if compact else (d["file_name"] for d in dicts),
                              cfg.DATASETS.TRAIN)
        sampler = cfg.DATALOADER.SAMPLER_TRAIN
        if cfg.SOLVER.EPOCH_SAMPLER not in ("", "TrainingSampler", "RepeatFactorTrainingSampler"):
            raise ValueError(f"SOLVER.EPOCH_SAMPLER {cfg.SOLVER.EPOCH_SAMPLER!r} is not one of "
                             "'' (the training sampler's epoch), TrainingSampler, "
                             "RepeatFactorTrainingSampler")
        epoch_sampler = cfg.SOLVER.EPOCH_SAMPLER or sampler
        factors = None  # for the sampler, or for the epoch length alone
        if "RepeatFactorTrainingSampler" in (sampler, epoch_sampler):
            thresh, sqrt = cfg.DATALOADER.REPEAT_THRESHOLD, cfg.DATALOADER.REPEAT_SQRT
            factors = (
                dicts.repeat_factors(thresh, sqrt=sqrt) if compact else
                RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
                    dicts, thresh, sqrt=sqrt))
        # SOLVER.EPOCHS counted in another sampler's epoch than the training sampler's
        images_per_epoch = None
        if epoch_sampler != sampler:
            images_per_epoch = (
                repeat_factor_epoch(factors, cfg.DATALOADER.REPEAT_ROUNDING)
                if epoch_sampler == "RepeatFactorTrainingSampler" else float(len(dicts)))
        repeat_factors = factors if sampler == "RepeatFactorTrainingSampler" else None
        # A seed shared by every process: the configured one, else one drawn on rank 0
        # (a resumed run then takes the checkpoint's).
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        return ResumableTrainLoader(
            dicts, cls.build_train_mapper(cfg), total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            seed=seed, sampler=sampler, repeat_factors=repeat_factors,
            repeat_rounding=cfg.DATALOADER.REPEAT_ROUNDING,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            max_failed_images=cfg.DATALOADER.MAX_FAILED_IMAGES,
            rank=comm.get_rank(), world_size=comm.get_world_size(),
            images_per_epoch=images_per_epoch)

    @classmethod
    def build_train_mapper(cls, cfg):
        """The mapper the heads need: detectron2's DatasetMapper plus the LVIS image-level
        labels on the ground truth (:class:`~eql_d2.data.ImageLabelDatasetMapper`) when the
        ROI heads read them (:func:`~eql_d2.modeling.roi_heads.needs_image_labels`),
        detectron2's DatasetMapper otherwise; its augmentations are detectron2's plus
        ``INPUT.HSV``, and ``INPUT.MOSAIC.ENABLED`` wraps it in
        :class:`~eql_d2.data.mosaic.MosaicMixUpMapper`."""
        augmentations = build_train_augmentations(cfg)
        if needs_image_labels(cfg):
            if cfg.INPUT.MOSAIC.ENABLED:
                raise ValueError("INPUT.MOSAIC.ENABLED: a mosaic has no image-level labels, "
                                 "which these ROI heads read (MODEL.IMAGE_LABELS); train them "
                                 "without Mosaic")
            return ImageLabelDatasetMapper(cfg, True, num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                                           augmentations=augmentations)
        mapper = DatasetMapper(cfg, True, augmentations=augmentations)
        return MosaicMixUpMapper(cfg, mapper) if cfg.INPUT.MOSAIC.ENABLED else mapper

    @property
    def train_loader(self):
        return self._trainer.data_loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        hooks = super().build_hooks()
        loss = self.cfg.MODEL.CLS_LOSS
        if loss.REGIME_INDICATORS and loss.LOG_PERIOD > 0:
            train = self.cfg.DATASETS.TRAIN
            groups = MetadataCatalog.get(train[0]).get("class_frequency") if train else None
            hooks.append(RegimeIndicatorWriter(loss.LOG_PERIOD, self.cfg.OUTPUT_DIR, groups))
        hooks = self._yolox_recipe_hooks(hooks)
        # first, so that every other hook's before_step already sees the seeded RNGs
        return [SeedEachIteration(self.train_loader)] + hooks

    def _yolox_recipe_hooks(self, hooks):
        """MODEL_EMA: the EMA hook before the checkpointer (so checkpoints hold its update
        of their iteration, under "model_ema") and evaluations with the EMA weights;
        INPUT.MOSAIC.NO_AUG_EPOCHS with INPUT.MOSAIC.ENABLED:
        :class:`~eql_d2.engine.ema.NoAugmentationPhase`."""
        recipe = []
        mapper = self.train_loader.mapper
        if self.no_aug_iters > 0 and getattr(mapper, "multi_image", False):
            recipe.append(NoAugmentationPhase(self.max_iter - self.no_aug_iters, mapper))
        if self.cfg.MODEL_EMA.ENABLED:
            ema = ModelEMA(self.cfg.MODEL_EMA.DECAY, self.cfg.MODEL_EMA.RAMP_UPDATES)
            self.checkpointer.checkpointables[EMA_KEY] = ema
            recipe.append(ModelEMAHook(ema))

            def test_and_save_results():
                with ema.applied_to(self.model):
                    self._last_eval_results = self.test(self.cfg, self.model)
                return self._last_eval_results

            hooks = [d2_hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test_and_save_results)
                     if isinstance(h, d2_hooks.EvalHook) else h for h in hooks]
        first = next((i for i, h in enumerate(hooks) if isinstance(
            h, (d2_hooks.PeriodicCheckpointer, d2_hooks.EvalHook))), len(hooks))
        return hooks[:first] + recipe + hooks[first:]

    def state_dict(self):
        ret = super().state_dict()
        ret["data_stream"] = self.train_loader.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "data_stream" in state_dict:
            self.train_loader.load_state_dict(state_dict["data_stream"])
        else:
            logging.getLogger(__name__).warning(
                "The checkpoint has no training data-stream state (not written by eql_d2's "
                "Trainer): the sample stream starts again from its beginning")

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        self.train_loader.start_iter = self.start_iter
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if resume and self.start_iter >= self.max_iter and not os.path.isfile(final):
            # the run ended while writing model_final.pth: the last checkpoint holds the
            # same state (both are saved after the last iteration)
            self.checkpointer.save("model_final", iteration=self.iter)

    def train(self):
        """Train, then return the final evaluation results (DefaultTrainer returns them
        only when TEST.EXPECTED_RESULTS is set). A stop signal ends training at a
        checkpoint (:class:`~eql_d2.engine.hooks.StopOnSignal`, registered last)."""
        if not any(isinstance(h, StopOnSignal) for h in self._hooks):
            self.register_hooks([StopOnSignal()])
        results = super().train()
        if results is None:
            results = getattr(self, "_last_eval_results", None)
        return results


def wrap_distributed(model):
    """DistributedDataParallel over the process group when there are several processes:
    detectron2's wrapper on CUDA, no device ids for CPU modules (gloo)."""
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cuda":
        return create_ddp_model(model, broadcast_buffers=False)
    return create_ddp_model(model, broadcast_buffers=False, device_ids=None)
