"""Learning-rate schedules detectron2 lacks, selected by ``SOLVER.LR_SCHEDULER_NAME``.

``"YOLOXWarmCosineLR"`` is YOLOX's ``yoloxwarmcos``: with W = ``SOLVER.WARMUP_ITERS``, N =
``SOLVER.MAX_ITER``, C the iterations of the last ``INPUT.MOSAIC.NO_AUG_EPOCHS``, lr_0 =
``SOLVER.BASE_LR``, lr_e = ``SOLVER.BASE_LR_END`` (YOLOX: 0.05 lr_0) and w =
``SOLVER.WARMUP_FACTOR`` (YOLOX: 0), the rate of iteration k is

- k <= W: lr_0 (w + (1 - w) (k / W)^2), a quadratic warm-up;
- k >= N - C: lr_e;
- otherwise: lr_e + (lr_0 - lr_e) (1 + cos(pi (k - W) / (N - W - C))) / 2.

detectron2's ``WarmupCosineLR`` warms up linearly and has no constant end. As for every
detectron2 schedule, iteration k trains with the rate of k (YOLOX's loop uses k + 1).
Any other name goes to detectron2's ``build_lr_scheduler``.
"""

import math

from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.lr_scheduler import LRMultiplier
from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["YOLOXWarmCosineParamScheduler", "build_lr_scheduler", "SCHEDULERS"]

SCHEDULERS = ("YOLOXWarmCosineLR",)


class YOLOXWarmCosineParamScheduler(ParamScheduler):
    """The multiplier of the base rate at iteration k of `max_iter` (module doc), as an fvcore
    ``ParamScheduler`` of ``where = k / max_iter``."""

    def __init__(self, max_iter: int, warmup_iters: int, warmup_factor: float,
                 end_factor: float, constant_iters: int):
        if max_iter <= 0:
            raise ValueError(f"SOLVER.MAX_ITER must be positive, got {max_iter}")
        if not 0 <= warmup_iters + constant_iters <= max_iter:
            raise ValueError(
                f"YOLOXWarmCosineLR: SOLVER.WARMUP_ITERS ({warmup_iters}) and the constant "
                f"last iterations ({constant_iters}, INPUT.MOSAIC.NO_AUG_EPOCHS) must be >= 0 "
                f"and add up to at most SOLVER.MAX_ITER ({max_iter})")
        self.max_iter, self.warmup_iters = int(max_iter), int(warmup_iters)
        self.warmup_factor, self.end_factor = float(warmup_factor), float(end_factor)
        self.constant_iters = int(constant_iters)

    def at(self, k: int) -> float:
        """The multiplier of iteration `k`."""
        if k <= self.warmup_iters and self.warmup_iters > 0:
            return self.warmup_factor + (1 - self.warmup_factor) * (k / self.warmup_iters) ** 2
        if k >= self.max_iter - self.constant_iters:
            return self.end_factor
        span = self.max_iter - self.warmup_iters - self.constant_iters
        return self.end_factor + 0.5 * (1 - self.end_factor) * (
            1 + math.cos(math.pi * (k - self.warmup_iters) / span))

    def __call__(self, where: float) -> float:
        # detectron2's LRMultiplier passes k / max_iter: k comes back exactly
        return self.at(round(where * self.max_iter))


def build_lr_scheduler(cfg, optimizer, *, constant_iters: int = 0):
    """The scheduler ``SOLVER.LR_SCHEDULER_NAME`` names: ``YOLOXWarmCosineLR`` (with
    `constant_iters` last iterations at ``BASE_LR_END``), else detectron2's."""
    solver = cfg.SOLVER
    if solver.LR_SCHEDULER_NAME != "YOLOXWarmCosineLR":
        return d2_build_lr_scheduler(cfg, optimizer)
    if not 0 <= solver.BASE_LR_END <= solver.BASE_LR:
        raise ValueError(f"YOLOXWarmCosineLR: SOLVER.BASE_LR_END ({solver.BASE_LR_END}) must "
                         f"lie in [0, SOLVER.BASE_LR = {solver.BASE_LR}]")
    end = solver.BASE_LR_END / solver.BASE_LR if solver.BASE_LR > 0 else 0.0
    multiplier = YOLOXWarmCosineParamScheduler(solver.MAX_ITER, solver.WARMUP_ITERS,
                                               solver.WARMUP_FACTOR, end, constant_iters)
    return LRMultiplier(optimizer, multiplier=multiplier, max_iter=solver.MAX_ITER)
