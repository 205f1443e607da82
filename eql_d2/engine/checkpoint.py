"""Checkpoints: atomic saves, and loads that refuse weights which do not fit the model.

fvcore's checkpointer loads whatever matches and logs the rest ("Skip loading parameter",
"Some model parameters or buffers are not found in the checkpoint"), so weights of another
detector or of a model with another number of classes leave the heads randomly initialised
and the run goes on, with an AP near 0. :class:`AtomicCheckpointer` raises
:class:`IncompatibleWeightsError` instead, naming the file and the keys:

- for prediction (``train_net.py --eval-only``, ``demo.py``, ``tools/ensemble.py``:
  ``for_inference=True``) and for ``--resume``: every parameter and buffer of the model must
  come from the file with its shape, and the file may hold nothing the model lacks;
- for initialising a training run from ``MODEL.WEIGHTS``: the same for the heads (every key
  outside ``backbone.``), unless the file holds no head key at all, which is a backbone
  file (ImageNet weights such as ``detectron2://ImageNetPretrained/MSRA/R-50.pkl``): it
  loads as detectron2 loads it, the heads starting from their initialisation.

``MODEL.WEIGHTS_PARTIAL True`` loads what fits and logs the rest, as detectron2 does (for
fine-tuning from a model trained on another dataset). State of the classification losses
and of the regime indicators (keys under a ``cls_loss`` or ``regime`` module: EQLv2's and
EFL's gradient statistics, EQL's ``freq``, Seesaw's and the federated loss's counts) is
never an error here: those modules settle a missing or foreign entry themselves (it
restarts from zero, or comes from the training data, with a warning).

A checkpoint also records the classification loss of each head (``cls_losses``:
``{module path: loss class}``); ``--resume`` with a config whose loss differs is refused
with both named, since the optimizer state and loss statistics belong to the saved loss.
"""

import logging
import os
import warnings

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..utils.io import atomic_write
from ..utils.statistics import StatisticsRestartWarning

__all__ = ["AtomicCheckpointer", "IncompatibleWeightsError", "classification_losses",
           "load_weights"]

logger = logging.getLogger(__name__)

# Module names under which the heads keep loss state (see the module docstring).
STATE_MODULE_NAMES = ("cls_loss", "regime")

# How many keys an error lists of each kind.
KEYS_SHOWN = 10


class IncompatibleWeightsError(ValueError):
    """A weights file whose parameters do not fit the model it is loaded into."""


def _is_state_key(key):
    return any(part in STATE_MODULE_NAMES for part in key.split(".")[:-1])


def _is_head_key(key):
    return not key.startswith("backbone.") and not _is_state_key(key)


def _listed(keys):
    keys = list(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > KEYS_SHOWN else ""
    return ", ".join(keys[:KEYS_SHOWN]) + more


def classification_losses(model):
    """``{module path: class name}`` of the registered classification losses in `model`
    (empty for heads that use detectron2's own loss)."""
    from ..modeling.cls_losses import ClassificationLoss

    model = getattr(model, "module", model)  # DDP
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, ClassificationLoss)}


def _describe_losses(losses):
    if not losses:
        return "detectron2's own head loss (no registered MODEL.CLS_LOSS.NAME module)"
    return ", ".join(f"{name} at {path}" for path, name in sorted(losses.items()))


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose files appear only when completely written, and whose
    loads refuse weights that do not fit the model (see the module docstring).

    detectron2 writes ``<name>.pth`` in place, so a run killed while saving leaves a
    truncated file where the last good checkpoint was. Here the data goes to a temporary
    file (``<name>.pth.partial-<pid>``, which detectron2 never takes for a checkpoint) that
    is flushed to disk and replaces the target with one atomic rename, and
    ``last_checkpoint`` is updated only after that.

    Args:
        model, save_dir, checkpointables: as for ``DetectionCheckpointer``.
        for_inference: the weights are for prediction: every key must fit, whatever the file.
        weights_partial: load what fits and log the rest (``MODEL.WEIGHTS_PARTIAL``); None
            takes it from the config of the ``trainer`` checkpointable, else False.
    """

    def __init__(self, model, save_dir="", *, for_inference=False, weights_partial=None,
                 save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.for_inference = bool(for_inference)
        self.weights_partial = weights_partial
        self._resuming = False
        self._loading = None

    # --------------------------------------------------------------------------- saving

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict(),
                "cls_losses": classification_losses(self.model)}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        with atomic_write(save_file, "wb", fsync=True) as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    # -------------------------------------------------------------------------- loading

    def get_checkpoint_file(self):
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        try:
            with self.path_manager.open(save_file, "r") as f:
                last_saved = f.read().strip()
        except OSError:
            return ""
        if not last_saved:
            raise ValueError(
                f"{save_file} is empty; it should hold the file name of the checkpoint to "
                "resume from (e.g. model_0000999.pth). Write that name into it, or delete it "
                "to start from MODEL.WEIGHTS")
        return os.path.join(self.save_dir, last_saved)

    def resume_or_load(self, path, *, resume=True):
        self._resuming = bool(resume and self.has_checkpoint())
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._resuming = False

    def load(self, path, *args, **kwargs):
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _partial(self):
        if self.weights_partial is not None:
            return bool(self.weights_partial)
        trainer = self.checkpointables.get("trainer")
        cfg = getattr(trainer, "cfg", None) if trainer is not None else None
        return bool(cfg.MODEL.get("WEIGHTS_PARTIAL", False)) if cfg is not None else False

    def _load_model(self, checkpoint):
        saved_losses = checkpoint.pop("cls_losses", None)
        if self._resuming and not self.for_inference:
            self._check_same_loss(saved_losses, checkpoint.get("model", {}))
        model_keys = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        with warnings.catch_warnings():
            if not any(_is_head_key(k) for k in checkpoint.get("model", {})):
                # a backbone file never holds the heads' statistics: nothing to warn about
                warnings.simplefilter("ignore", StatisticsRestartWarning)
            incompatible = super()._load_model(checkpoint)
        self._check_fit(incompatible, model_keys)
        return incompatible

    def _check_same_loss(self, saved, state_dict):
        """Refuse to resume a run whose classification loss is not the checkpoint's."""
        current = classification_losses(self.model)
        where = f"--resume: {self._loading}"
        if saved is not None:
            if dict(saved) != current:
                raise ValueError(
                    f"{where} was trained with the classification loss "
                    f"{_describe_losses(saved)}, but the config (MODEL.CLS_LOSS.NAME) builds "
                    f"{_describe_losses(current)}. Resume with the checkpoint's loss, or start a "
                    "new run (another OUTPUT_DIR) from its weights with MODEL.WEIGHTS")
            return
        # a checkpoint that does not record its loss: compare the losses' own state
        def loss_state(keys_shapes):
            return {k: s for k, s in keys_shapes.items()
                    if "cls_loss" in k.split(".")[:-1] and "regime" not in k.split(".")}

        model = getattr(self.model, "module", self.model)
        mine = loss_state({k: tuple(v.shape) for k, v in model.state_dict().items()})
        theirs = loss_state({k[len("module."):] if k.startswith("module.") else k:
                             tuple(getattr(v, "shape", ())) for k, v in state_dict.items()})
        if mine != theirs:
            raise ValueError(
                f"{where} holds classification-loss state {_listed(sorted(theirs)) or 'none'}, "
                f"but the config (MODEL.CLS_LOSS.NAME) builds {_describe_losses(current)} with "
                f"state {_listed(sorted(mine)) or 'none'}: the checkpoint was trained with "
                "another loss. Resume with its loss, or start a new run from its weights with "
                "MODEL.WEIGHTS")

    def _check_fit(self, incompatible, model_keys):
        wrong_shape = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes]
        shaped = {k for k, _, _ in wrong_shape}
        missing = [k for k in incompatible.missing_keys if k not in shaped]
        unexpected = list(incompatible.unexpected_keys)
        strict = self.for_inference or self._resuming
        if strict:
            checked = lambda k: not _is_state_key(k)  # noqa: E731
        else:
            checked = _is_head_key
            loaded_heads = [k for k in model_keys if _is_head_key(k)
                            and k not in incompatible.missing_keys]
            in_file = loaded_heads + [k for k in unexpected + list(shaped) if _is_head_key(k)]
            if not in_file:
                return  # a backbone file: the heads keep their initialisation
        # heads first: the keys that tell which model the file is for
        missing = sorted((k for k in missing if checked(k)), key=lambda k: not _is_head_key(k))
        unexpected = sorted((k for k in unexpected if checked(k)),
                            key=lambda k: not _is_head_key(k))
        wrong_shape = [w for w in wrong_shape if checked(w[0])]
        if not (missing or unexpected or wrong_shape):
            return
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing from the file: {_listed(missing)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} of another shape (file vs model): " + _listed(
                f"{k} {list(a)} vs {list(b)}" for k, a, b in wrong_shape))
        if unexpected:
            parts.append(f"{len(unexpected)} not in the model: {_listed(unexpected)}")
        what = "model" if strict else "model's heads"
        message = (f"{self._loading}: the weights do not fit the {what} (another detector, "
                   f"number of classes or head?): " + "; ".join(parts))
        if self._partial():
            logger.warning("%s. MODEL.WEIGHTS_PARTIAL is True: loading what fits; the rest "
                           "keeps its initialisation", message)
            return
        raise IncompatibleWeightsError(
            message + ". Use weights of this model, or set MODEL.WEIGHTS_PARTIAL True to load "
            "what fits and keep the rest randomly initialised (fine-tuning from another "
            "dataset)")


def load_weights(model, path, *, partial=False):
    """Load prediction weights `path` into `model`, refusing weights that do not fit it
    (:class:`AtomicCheckpointer` with ``for_inference``); `partial`:
    ``MODEL.WEIGHTS_PARTIAL``. Returns the checkpoint's other entries."""
    return AtomicCheckpointer(model, for_inference=True, weights_partial=partial).load(path)
