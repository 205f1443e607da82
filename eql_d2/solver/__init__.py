"""Optimizer and schedule: detectron2's, plus gradient clipping by the norm of the whole
model's gradient (``SOLVER.CLIP_GRADIENTS.CLIP_TYPE "full_model"``), weight decay by
parameter name (``SOLVER.PARAM_WEIGHT_DECAY``), schedules counted in epochs
(``SOLVER.EPOCHS``) and YOLOX's schedule (``SOLVER.LR_SCHEDULER_NAME "YOLOXWarmCosineLR"``)."""

from .build import (FULL_MODEL, build_optimizer, epoch_length,  # noqa: F401
                    resolve_epoch_schedule, set_param_weight_decay)
from .schedules import build_lr_scheduler  # noqa: F401
