"""Exponential moving average of a model's weights (YOLOX's ``ModelEMA``) and the hooks of
YOLOX's training recipe: the EMA update and its use for evaluation, and the switch to the
last epochs without Mosaic / MixUp.

The average covers every floating-point parameter and buffer (BatchNorm statistics too);
integer buffers (BatchNorm's ``num_batches_tracked``) are copied. After update u::

    ema <- d_u * ema + (1 - d_u) * weights,   d_u = DECAY * (1 - exp(-u / RAMP_UPDATES))

so early updates follow the weights closely. The state (weights and u) is a checkpointable
of the trainer's checkpointer, saved in every checkpoint under ``"model_ema"`` and restored
by ``--resume``. Evaluations during and after training run with the EMA weights in the
model (:meth:`ModelEMA.applied_to`); ``train_net.py --eval-only`` with
``MODEL_EMA.ENABLED`` loads the ``"model_ema"`` weights of MODEL.WEIGHTS
(:func:`load_ema_for_evaluation`), so it reproduces the final evaluation of training.
d2go's ``MODEL_EMA`` (``USE_EMA_WEIGHTS_FOR_EVAL_ONLY``) behaves the same way.
"""

import contextlib
import logging
import math
from typing import Dict, Optional

import torch
from detectron2.engine import HookBase

from .checkpoint import load_weights

__all__ = ["ModelEMA", "ModelEMAHook", "NoAugmentationPhase", "load_ema_for_evaluation",
           "load_prediction_weights", "CHECKPOINT_KEY"]

logger = logging.getLogger(__name__)

# Entry of a checkpoint that holds the EMA state.
CHECKPOINT_KEY = "model_ema"


def _unwrap(model):
    return getattr(model, "module", model)  # DDP


class ModelEMA:
    """The moving average of a model's state dict (see the module doc).

    Args:
        decay: DECAY, the decay the ramp tends to.
        ramp_updates: RAMP_UPDATES; 0 uses `decay` from the first update.
    """

    def __init__(self, decay: float = 0.9998, ramp_updates: float = 2000.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MODEL_EMA.DECAY must lie in [0, 1), got {decay}")
        if ramp_updates < 0:
            raise ValueError(f"MODEL_EMA.RAMP_UPDATES must be >= 0, got {ramp_updates}")
        self.decay = float(decay)
        self.ramp_updates = float(ramp_updates)
        self.updates = 0
        self.weights: Dict[str, torch.Tensor] = {}

    def decay_at(self, updates: int) -> float:
        """d_u of update number `updates` (1 for the first)."""
        if self.ramp_updates == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.ramp_updates))

    def reset(self, model) -> None:
        """Start the average at `model`'s current weights (update count 0)."""
        self.weights = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model) -> None:
        """One update towards `model`'s current weights."""
        self.updates += 1
        d = self.decay_at(self.updates)
        current = _unwrap(model).state_dict()
        floats = [k for k, v in self.weights.items() if v.is_floating_point()]
        averaged = [self.weights[k] for k in floats]
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, [current[k].detach() for k in floats], alpha=1.0 - d)
        for k, v in self.weights.items():
            if not v.is_floating_point():
                v.copy_(current[k])

    def to(self, device) -> "ModelEMA":
        self.weights = {k: v.to(device) for k, v in self.weights.items()}
        return self

    def check_fits(self, model, where: str) -> None:
        """Raise ValueError naming the keys when the average is not of `model`'s state."""
        ours = {k: tuple(v.shape) for k, v in self.weights.items()}
        theirs = {k: tuple(v.shape) for k, v in _unwrap(model).state_dict().items()}
        if ours == theirs:
            return
        missing = sorted(set(theirs) - set(ours))
        extra = sorted(set(ours) - set(theirs))
        shaped = sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])
        raise ValueError(f"{where}: the EMA weights do not fit the model (missing {missing[:5]}, "
                         f"not in the model {extra[:5]}, other shape {shaped[:5]})")

    def state_dict(self) -> Dict:
        return {"decay": self.decay, "ramp_updates": self.ramp_updates,
                "updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: Dict) -> None:
        if set(state) != {"decay", "ramp_updates", "updates", "weights"}:
            raise ValueError(f"'{CHECKPOINT_KEY}' of a checkpoint holds {sorted(state)}, not an "
                             "EMA state (decay, ramp_updates, updates, weights)")
        if (state["decay"], state["ramp_updates"]) != (self.decay, self.ramp_updates):
            logger.warning("The checkpoint's EMA had DECAY %s, RAMP_UPDATES %s; continuing with "
                           "the config's %s, %s", state["decay"], state["ramp_updates"],
                           self.decay, self.ramp_updates)
        self.updates = int(state["updates"])
        self.weights = dict(state["weights"])

    @contextlib.contextmanager
    def applied_to(self, model):
        """`model` holds the EMA weights inside the block, its own weights again after it."""
        target = _unwrap(model).state_dict()
        saved = {k: v.detach().clone() for k, v in target.items()}
        with torch.no_grad():
            for k, v in target.items():
                v.copy_(self.weights[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in target.items():
                    v.copy_(saved[k])


class ModelEMAHook(HookBase):
    """Update `ema` after every iteration; start it at the model's weights when no
    checkpoint restored it. Register it before the checkpointer and evaluation hooks, so the
    checkpoint and evaluation of an iteration include its update."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def before_train(self):
        model = self.trainer.model
        if not self.ema.weights:
            self.ema.reset(model)
            return
        self.ema.check_fits(model, f"--resume ({CHECKPOINT_KEY})")
        self.ema.to(next(iter(_unwrap(model).state_dict().values())).device)

    def after_step(self):
        self.ema.update(self.trainer.model)


class NoAugmentationPhase(HookBase):
    """YOLOX's last epochs: from iteration `start_iter` on, the training mapper's samples
    are plain images (``mapper.no_aug_from_iter``, which each sample compares with its own
    iteration, so data-loader workers and resumed runs agree) and the model's L1 box loss is
    on (``model.use_l1_loss = True`` where the model has that attribute; never switched off,
    so a model configured with it keeps it). Both depend on the iteration alone."""

    def __init__(self, start_iter: int, mapper=None):
        self.start_iter = int(start_iter)
        self.mapper = mapper

    def before_train(self):
        # the loader's workers start with the first iteration, after this
        if self.mapper is not None:
            self.mapper.no_aug_from_iter = self.start_iter
        l1 = hasattr(_unwrap(self.trainer.model), "use_l1_loss")
        logger.info("Mosaic / MixUp off%s from iteration %d of %d",
                    " and the L1 box loss on" if l1 else "", self.start_iter,
                    self.trainer.max_iter)

    def before_step(self):
        model = _unwrap(self.trainer.model)
        if self.trainer.iter >= self.start_iter and hasattr(model, "use_l1_loss"):
            model.use_l1_loss = True


def load_ema_for_evaluation(cfg, model, checkpoint: Optional[Dict], path: str) -> bool:
    """With ``MODEL_EMA.ENABLED``: put the ``"model_ema"`` weights of `checkpoint` (what
    loading `path` left besides its model) into `model`. Returns whether it did; a file
    without them is evaluated with its own weights, with a warning."""
    if not cfg.MODEL_EMA.ENABLED:
        return False
    if not checkpoint or CHECKPOINT_KEY not in checkpoint:
        logger.warning("MODEL_EMA.ENABLED, but %s has no EMA weights ('%s'): evaluating its "
                       "model weights", path, CHECKPOINT_KEY)
        return False
    ema = ModelEMA(cfg.MODEL_EMA.DECAY, cfg.MODEL_EMA.RAMP_UPDATES)
    ema.load_state_dict(checkpoint[CHECKPOINT_KEY])
    ema.check_fits(model, path)
    target = _unwrap(model).state_dict()
    with torch.no_grad():
        for k, v in target.items():
            v.copy_(ema.weights[k])
    logger.info("Evaluating the EMA weights of %s (%d updates)", path, ema.updates)
    return True


def load_prediction_weights(cfg, model, path: str) -> None:
    """Load `path` into `model` for prediction (``MODEL.WEIGHTS_PARTIAL`` as configured;
    weights that do not fit are an error), then, with ``MODEL_EMA.ENABLED``, its EMA weights:
    what ``train_net.py --eval-only`` evaluates."""
    rest = load_weights(model, path, partial=cfg.MODEL.WEIGHTS_PARTIAL)
    load_ema_for_evaluation(cfg, model, rest, path)
