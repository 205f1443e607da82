"""Meta-architectures registered in detectron2's META_ARCH_REGISTRY."""

from .atss import ATSS, ATSSHead, atss_match  # noqa: F401
from .decoupled import DecoupledRCNN, LWSLinear, freeze_except  # noqa: F401
from .dense_loss import DenseClassificationLoss  # noqa: F401
from .fcos import EFLFCOS  # noqa: F401
from .paa import PAA, PAAHead  # noqa: F401
from .yolox import YOLOX, YOLOXHead, simota_match  # noqa: F401
from .retinanet import EFLRetinaNet  # noqa: F401
from .classifier import ImageClassifier  # noqa: F401
