"""detectron2 components of eql_d2, registered in detectron2's registries on import."""

from . import backbone  # noqa: F401  (ResNet-FPN with the EFL authors' P6 / P7)
from . import cls_losses  # noqa: F401  (the classification-loss registry)
from . import meta_arch  # noqa: F401  (ATSS, EFLRetinaNet, EFLFCOS)
from . import roi_heads  # noqa: F401  (EQLROIHeads)
