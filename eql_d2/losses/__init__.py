"""Equalization losses for long-tailed classification and detection (pure PyTorch).

- :class:`EQLLoss`, :func:`tail_ratio`: equalization loss (Tan et al., CVPR 2020, eq. 6-8).
- :class:`SoftmaxEQLLoss`: softmax equalization loss (same paper, eq. 9-11).
- :class:`EQLv2Loss`: gradient-guided re-weighting with an objectness column (CVPR 2021).
- :class:`EqualizedFocalLoss`, :class:`EqualizedQualityFocalLoss`: EFL and EQFL
  (Li et al., CVPR 2022, eq. 2-6).
- :class:`SeesawLoss`: seesaw loss with an objectness branch (Wang et al., CVPR 2021).
- :class:`FederatedLoss`: sigmoid CE over sampled classes (Zhou et al., 2021).
- :class:`ClassBalancedLoss`, :func:`class_balanced_weights`: class-balanced loss (Cui et
  al., CVPR 2019); :class:`BalancedGroupSoftmaxLoss`, :func:`group_by_count`: balanced
  group softmax (BAGS, Li et al., CVPR 2020).
- Baselines: :class:`SigmoidCELoss`, :class:`FocalLoss`, :class:`QualityFocalLoss`,
  :class:`SoftmaxCELoss`.
- :class:`GradientStatistics`: the per-class gradient statistics EQLv2 and EFL keep, a base
  class for other gradient-guided losses.

One call convention: ``loss(logits, labels, [verified | quality,] avg_factor=None)``
returns the sum of the per-entry losses divided by ``avg_factor`` (a positive float or
one-element tensor); None divides by the number of rows N (the mean over rows).

The sigmoid and focal families run through a fused kernel (loss, gradient and gradient
statistics in one pass); set ``use_compile`` or ``EQL_D2_COMPILE_LOSSES`` to choose
torch.compile or eager (default: compile on CUDA only). Half-precision logits get the
gradient autocast would give them. A training step reads nothing back from the GPU:
input checks that need tensor values run on CPU tensors, and on GPU tensors only with
``EQL_D2_DEBUG_CHECKS=1``. Nothing here imports detectron2.
"""

from ._checks import DEBUG_CHECKS_ENV
from ._fused import COMPILE_ENV
from .class_balanced import (ClassBalancedLoss, class_balanced_background_weight,
                             class_balanced_weights)
from .group_softmax import BalancedGroupSoftmaxLoss, group_by_count
from .baselines import FocalLoss, QualityFocalLoss, SigmoidCELoss, SoftmaxCELoss
from .efl import EqualizedFocalLoss, EqualizedQualityFocalLoss
from .federated import FederatedLoss
from .eql import EQLLoss, tail_ratio
from .eqlv2 import EQLv2Loss
from .seesaw import SeesawLoss
from .seql import SoftmaxEQLLoss
from .statistics import GradientStatistics

__all__ = [
    "BalancedGroupSoftmaxLoss",
    "ClassBalancedLoss",
    "COMPILE_ENV",
    "DEBUG_CHECKS_ENV",
    "EQLLoss",
    "EQLv2Loss",
    "EqualizedFocalLoss",
    "EqualizedQualityFocalLoss",
    "FederatedLoss",
    "FocalLoss",
    "GradientStatistics",
    "QualityFocalLoss",
    "SeesawLoss",
    "SigmoidCELoss",
    "SoftmaxCELoss",
    "SoftmaxEQLLoss",
    "class_balanced_background_weight",
    "class_balanced_weights",
    "group_by_count",
    "tail_ratio",
]
