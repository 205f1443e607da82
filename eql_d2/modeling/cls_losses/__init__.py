"""Classification losses of eql_d2's heads, in one registry (see :mod:`.base`)."""

from .base import (CLS_LOSS_REGISTRY, HEAD_DEFAULTS, ClassificationLoss,  # noqa: F401
                   add_cls_loss_configs, build_cls_loss, cls_loss_class, losses_for_head, resolve_loss_name)
from .baselines import QFL, Focal, SigmoidCE, SoftmaxCE  # noqa: F401
from .efl import EFL, EQFL  # noqa: F401
from .class_balanced import ClassBalanced  # noqa: F401
from .group_softmax import BAGS  # noqa: F401
from .eql import EQL, EQLv2  # noqa: F401
from .federated import Federated  # noqa: F401
from .seesaw import NormedLinear, Seesaw  # noqa: F401
from .head import head_classification_loss  # noqa: F401
from .seql import SEQL  # noqa: F401
