"""Converting the papers' authors' checkpoints into eql_d2 models (see :mod:`.convert`)."""

from .convert import (FORMATS, TORCHVISION_PIXEL_MEAN, TORCHVISION_PIXEL_STD, Conversion,
                      ConversionError, box_coding_notes, convert_state_dict, detect_format,
                      input_settings, source_state_dict)

__all__ = ["FORMATS", "TORCHVISION_PIXEL_MEAN", "TORCHVISION_PIXEL_STD", "Conversion",
           "ConversionError", "box_coding_notes", "convert_state_dict", "detect_format",
           "input_settings", "source_state_dict"]
