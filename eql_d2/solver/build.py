"""detectron2's optimizer with one more gradient-clipping type.

detectron2's ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "norm"`` clips every parameter tensor to
``CLIP_VALUE`` on its own. The EFL and EQLv2 authors' code (mmcv's / United-Perception's
``clip_grad_norm_`` over all parameters) clips the norm of the gradient of the whole model:
with thousands of tensors each below 35 the global norm can be far above it, so the two are
different constraints. ``"full_model"`` is the authors' form.

``SOLVER.PARAM_WEIGHT_DECAY`` sets the weight decay of parameters chosen by name (the enhanced
YOLOX of the EFL paper decays the last classification layer's bias by 1e-4 and no other
bias): :func:`set_param_weight_decay`.
"""

import fnmatch
import logging
import math

import torch
from detectron2.solver import build as d2_build

__all__ = ["FULL_MODEL", "build_optimizer", "clip_full_model", "epoch_length",
           "resolve_epoch_schedule", "set_param_weight_decay"]

logger = logging.getLogger(__name__)

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
        return set_param_weight_decay(d2_build.build_optimizer(cfg, model), model,
                                      cfg.SOLVER.PARAM_WEIGHT_DECAY)
    if not clip.CLIP_VALUE > 0:
        raise ValueError("SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be positive for CLIP_TYPE "
                         f"full_model, got {clip.CLIP_VALUE}")
    unclipped = cfg.clone()
    unclipped.defrost()
    unclipped.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = set_param_weight_decay(d2_build.build_optimizer(unclipped, model), model,
                                       cfg.SOLVER.PARAM_WEIGHT_DECAY)
    optimizer.__class__ = d2_build._generate_optimizer_class_with_gradient_clipping(
        type(optimizer), global_clipper=clip_full_model(clip.CLIP_VALUE, clip.NORM_TYPE))
    return optimizer


def set_param_weight_decay(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                           overrides) -> torch.optim.Optimizer:
    """``SOLVER.PARAM_WEIGHT_DECAY``: the parameters whose full name (``model.named_parameters``)
    matches a pattern (fnmatch) of a [pattern, weight decay] pair move, before any step, into
    a group of their own with that weight decay and their group's other settings; the first
    matching pair counts. A pair that is malformed or matches no parameter is an error naming
    it. Returns ``optimizer``."""
    pairs = []
    for entry in overrides:
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2
                or not isinstance(entry[0], str) or isinstance(entry[1], bool)
                or not isinstance(entry[1], (int, float)) or entry[1] < 0):
            raise ValueError("SOLVER.PARAM_WEIGHT_DECAY entries are [pattern, weight decay >= 0] "
                             f"pairs, got {entry!r}")
        pairs.append((entry[0], float(entry[1])))
    if not pairs:
        return optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    used = set()
    groups = []
    for group in optimizer.param_groups:
        split = {}
        for param in group["params"]:
            decay = None
            for pattern, value in pairs:
                if fnmatch.fnmatchcase(names.get(id(param), ""), pattern):
                    decay = value
                    used.add(pattern)
                    break
            split.setdefault(decay, []).append(param)
        for decay, params in split.items():
            settings = {k: v for k, v in group.items() if k != "params"}
            if decay is not None:
                settings["weight_decay"] = decay
            groups.append({**settings, "params": params})
    unused = [pattern for pattern, _ in pairs if pattern not in used]
    if unused:
        raise ValueError(f"SOLVER.PARAM_WEIGHT_DECAY: {unused} match no trainable parameter of "
                         f"the model (names such as {next(iter(names.values()), '')!r})")
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer


def epoch_length(num_images_per_epoch: float, batch_size: int) -> int:
    """Iterations of one epoch: ceil(images per epoch / images per batch)."""
    return math.ceil(num_images_per_epoch / batch_size)


def resolve_epoch_schedule(cfg, num_images_per_epoch: float):
    """A copy of ``cfg`` whose SOLVER.MAX_ITER, STEPS and WARMUP_ITERS come from
    ``SOLVER.EPOCHS``, ``EPOCH_STEPS`` and ``WARMUP_EPOCHS`` (when ``SOLVER.EPOCHS > 0``),
    with ``num_images_per_epoch`` the length of the sampler's epoch (the training images, or
    with repeat factor sampling its expanded list; see
    :attr:`~eql_d2.data.train_loader.ResumableTrainLoader.images_per_epoch`).

    Each epoch count times the iterations per epoch, rounded; the warm-up is the longer of
    WARMUP_ITERS and WARMUP_EPOCHS (United-Perception's rule). ``cfg`` itself is unchanged
    (``SOLVER.EPOCHS 0``: returned as is)."""
    solver = cfg.SOLVER
    if solver.EPOCHS <= 0:
        if solver.EPOCH_STEPS or solver.WARMUP_EPOCHS > 0:
            raise ValueError("SOLVER.EPOCH_STEPS / WARMUP_EPOCHS are set but SOLVER.EPOCHS is "
                             "0: set SOLVER.EPOCHS to count the schedule in epochs")
        return cfg
    if list(solver.EPOCH_STEPS) != sorted(solver.EPOCH_STEPS) or any(
            not 0 < e < solver.EPOCHS for e in solver.EPOCH_STEPS):
        raise ValueError(f"SOLVER.EPOCH_STEPS {tuple(solver.EPOCH_STEPS)} must increase and lie "
                         f"inside (0, SOLVER.EPOCHS = {solver.EPOCHS})")
    per_epoch = epoch_length(num_images_per_epoch, solver.IMS_PER_BATCH)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.MAX_ITER = round(solver.EPOCHS * per_epoch)
    cfg.SOLVER.STEPS = tuple(round(e * per_epoch) for e in solver.EPOCH_STEPS)
    cfg.SOLVER.WARMUP_ITERS = max(solver.WARMUP_ITERS, round(solver.WARMUP_EPOCHS * per_epoch))
    cfg.freeze()
    logger.info("Schedule in epochs: %g images per epoch at batch %d = %d iterations per epoch; "
                "SOLVER.EPOCHS %g -> MAX_ITER %d, EPOCH_STEPS %s -> STEPS %s, WARMUP_ITERS %d",
                num_images_per_epoch, solver.IMS_PER_BATCH, per_epoch, solver.EPOCHS,
                cfg.SOLVER.MAX_ITER, tuple(solver.EPOCH_STEPS), cfg.SOLVER.STEPS,
                cfg.SOLVER.WARMUP_ITERS)
    return cfg
