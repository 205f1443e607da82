"""ROI heads for two-stage detectors trained with EQL / EQLv2 and LVIS image-level labels."""

from .fast_rcnn import EQLFastRCNNOutputLayers, exclude_entries  # noqa: F401
from .roi_heads import (EQLROIHeads, ImageLabelHeads, attach_image_labels,  # noqa: F401
                        needs_image_labels)
from .cascade import EQLCascadeROIHeads  # noqa: F401
