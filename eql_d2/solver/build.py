"""detectron2's optimizer with one more gradient-clipping type.

detectron2's ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "norm"`` clips every parameter tensor to
``CLIP_VALUE`` on its own. The EFL and EQLv2 authors' code (mmcv's / United-Perception's
``clip_grad_norm_`` over all parameters) clips the norm of the gradient of the whole model:
with thousands of tensors each below 35 the global norm can be far above it, so the two are
different constraints. ``"full_model"`` is the authors' form.
"""

import torch
from detectron2.solver import build as d2_build

__all__ = ["FULL_MODEL", "build_optimizer", "clip_full_model"]

FULL_MODEL = "full_model"
CLIP_TYPES = ("value", "norm", FULL_MODEL)


def clip_full_model(max_norm: float, norm_type: float = 2.0):
    """A global clipper: scales all gradients together so that their joint ``norm_type``
    norm is at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_`` over every tensor)."""
    def clip(params):
        torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type)
    return clip


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's ``build_optimizer`` (SGD, its parameter groups and clipping types), with
    ``CLIP_TYPE "full_model"`` clipping the norm of all gradients at once before each step.

    With DistributedDataParallel the gradients are already averaged over processes when the
    optimizer steps, so every process clips by the same factor; under AMP, detectron2's
    trainer unscales them before the step."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.CLIP_TYPE not in CLIP_TYPES:
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip.CLIP_TYPE!r} is not one of "
                         f"{', '.join(CLIP_TYPES)}")
    if not (clip.ENABLED and clip.CLIP_TYPE == FULL_MODEL):
        return d2_build.build_optimizer(cfg, model)
    if not clip.CLIP_VALUE > 0:
        raise ValueError("SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be positive for CLIP_TYPE "
                         f"full_model, got {clip.CLIP_VALUE}")
    unclipped = cfg.clone()
    unclipped.defrost()
    unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = d2_build.build_optimizer(unclipped, model)
    optimizer.__class__ = d2_build._generate_optimizer_class_with_gradient_clipping(
        type(optimizer), global_clipper=clip_full_model(clip.CLIP_VALUE, clip.NORM_TYPE))
    return optimizer
