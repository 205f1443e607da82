"""ROI heads for two-stage detectors trained with EQL / EQLv2 and LVIS image-level labels."""

from ..category_frequency import category_frequencies, frequency_groups  # noqa: F401
from .fast_rcnn import EQLFastRCNNOutputLayers, exclude_entries  # noqa: F401
from .roi_heads import EQLROIHeads, attach_image_labels  # noqa: F401
from .cascade import EQLCascadeROIHeads  # noqa: F401
