"""ImageLabelRCNN: the name earlier configs used for R-CNN with the EQL heads."""

import logging

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

__all__ = ["ImageLabelRCNN"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class ImageLabelRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN``, kept so that configs naming ``ImageLabelRCNN`` keep working.

    Image-level labels now travel with the data (:class:`~eql_d2.data.ImageLabelDatasetMapper`
    puts them on the ground truth, the EQL heads read them from the proposals), so the
    meta-architecture adds nothing: set ``MODEL.META_ARCHITECTURE GeneralizedRCNN``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        logger.warning("MODEL.META_ARCHITECTURE 'ImageLabelRCNN' is GeneralizedRCNN now (the "
                       "image-level labels come with the data): set MODEL.META_ARCHITECTURE "
                       "'GeneralizedRCNN'")
