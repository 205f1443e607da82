"""Optimizer construction: detectron2's, plus gradient clipping by the norm of the whole
model's gradient (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"``)."""

from .build import FULL_MODEL, build_optimizer  # noqa: F401
