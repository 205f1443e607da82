import weakref

from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.utils import comm

from ..data import load_category_metadata
from ..evaluation import build_evaluator
from .checkpoint import AtomicCheckpointer

__all__ = ["Trainer", "prepare_datasets", "check_num_classes", "NUM_CLASSES_KEYS"]

# Which config key holds the number of foreground classes, per meta-architecture.
NUM_CLASSES_KEYS = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "ImageLabelRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "EFLRetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "ATSS": "MODEL.ATSS.NUM_CLASSES",
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

    On several processes per machine, local rank 0 generates and the others wait.
    """
    names = list(cfg.DATASETS.TEST)
    if training:
        names = list(cfg.DATASETS.TRAIN) + names
    if comm.get_local_rank() == 0:
        for name in names:
            load_category_metadata(name)
    comm.synchronize()
    for name in names:
        load_category_metadata(name)
    check_num_classes(cfg)


class Trainer(DefaultTrainer):
    """DefaultTrainer with LVIS/COCO evaluators by dataset type and atomic checkpoints."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        # DefaultTrainer.__init__ made self.checkpointer just before calling build_hooks;
        # replace it here so the checkpoint hooks hold the atomic one.
        self.checkpointer = AtomicCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    def train(self):
        """Train, then return the final evaluation results (DefaultTrainer returns them
        only when TEST.EXPECTED_RESULTS is set)."""
        results = super().train()
        if results is None:
            results = getattr(self, "_last_eval_results", None)
        return results
