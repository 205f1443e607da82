"""Training and evaluation loop: detectron2's DefaultTrainer with LVIS-aware pieces."""

from .checkpoint import AtomicCheckpointer  # noqa: F401
from .trainer import Trainer, check_num_classes, prepare_datasets  # noqa: F401
from .hooks import EXIT_STOPPED, TrainingStopped  # noqa: F401
from .launch import add_launch_arguments, check_same_config, launch  # noqa: F401
from .classification import ClassificationTrainer  # noqa: F401
