"""Input validation shared by the losses.

Every check raises ``ValueError`` with the argument's name first, so a caller sees which
input was wrong. Nothing is broadcast: shapes must match exactly.

Checks of types, shapes, dtypes and devices need no tensor values and always run. Checks
that read values (label range, quality range, a tensor avg_factor, finiteness of the
logits or of the loss) need those values on the host; for a tensor on an accelerator that
is a device synchronisation, which a training iteration must not pay. They therefore run
when the tensor is on the CPU (reading it is a memory access), and for tensors on other
devices only when the environment variable ``EQL_D2_DEBUG_CHECKS`` is ``1`` (read at each
call). Without it, out-of-range labels or non-finite logits on a GPU are not reported by
the losses: run a few iterations with ``EQL_D2_DEBUG_CHECKS=1`` to validate a new data
pipeline. Hyper-parameters and per-class vectors are checked once, when a loss is built.
"""

import math
import os
from numbers import Real
from typing import Optional, Sequence, Union

import torch

__all__ = [
    "DEBUG_CHECKS_ENV",
    "check_class_vector",
    "check_logits",
    "check_labels",
    "check_avg_factor",
    "check_quality",
    "check_verified",
    "check_scalar",
    "check_switch",
    "check_num_classes",
    "check_finite_logits",
    "raise_if_nonfinite",
    "reads_values",
]

DEBUG_CHECKS_ENV = "EQL_D2_DEBUG_CHECKS"


def _values_on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs no device synchronisation."""
    return t.device.type == "cpu"


def reads_values(t: torch.Tensor) -> bool:
    """Whether a check may read ``t``'s values: on the host, or with ``EQL_D2_DEBUG_CHECKS=1``."""
    if _values_on_host(t):
        return True
    env = os.environ.get(DEBUG_CHECKS_ENV, "0").strip().lower()
    if env in ("", "0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{DEBUG_CHECKS_ENV} must be 1 or 0, got {env!r}")


def check_switch(name: str, value) -> bool:
    """A component switch must be a bool: ``bool("False")`` would silently turn it on."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_scalar(name: str, value, *, low=None, high=None, low_open=False) -> float:
    """A finite real hyper-parameter in [low, high] (low excluded when ``low_open``)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = ">" if low_open else ">="
        raise ValueError(f"{name} must be {bound} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def check_class_vector(name: str, values: Union[torch.Tensor, Sequence[float]], *,
                       low: float = 0.0, high: Optional[float] = None) -> torch.Tensor:
    """A non-empty 1-D float tensor [C] with finite values in [low, high] (a copy)."""
    t = torch.as_tensor(values)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor [C], got shape {tuple(t.shape)}")
    t = t.detach().to(torch.float32 if not t.is_floating_point() else t.dtype).clone()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    if bool((t < low).any()) or (high is not None and bool((t > high).any())):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} values must be in {rng}, got min {t.min().item()}, "
                         f"max {t.max().item()}")
    return t


def check_logits(logits, width: int, what: str = "C") -> None:
    """logits: floating tensor [N, width]."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor, got dtype {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] != width:
        raise ValueError(f"logits must have shape [N, {what}] = [N, {width}], "
                         f"got {tuple(logits.shape)}")


def check_labels(labels, logits: torch.Tensor, low: int, high: int) -> None:
    """labels: integer tensor [N] on logits' device with values in [low, high].

    The range is checked where :func:`reads_values` allows it (two numbers read back).
    """
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape [N] = [{logits.shape[0]}] to match logits, "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on logits' device {logits.device}, got {labels.device}")
    if labels.numel() and reads_values(labels):
        lo, hi = torch.aminmax(labels)
        lo, hi = torch.stack([lo, hi]).tolist()
        if lo < low or hi > high:
            raise ValueError(f"labels must be in [{low}, {high}], got values in [{lo}, {hi}]")


def check_verified(verified, logits: torch.Tensor, num_classes: int) -> None:
    """verified: bool tensor [N, C] on logits' device."""
    if not isinstance(verified, torch.Tensor):
        raise ValueError(f"verified must be a torch.Tensor or None, got {type(verified).__name__}")
    if verified.dtype != torch.bool:
        raise ValueError(f"verified must be a bool tensor, got dtype {verified.dtype}")
    shape = (logits.shape[0], num_classes)
    if tuple(verified.shape) != shape:
        raise ValueError(f"verified must have shape [N, C] = {list(shape)}, "
                         f"got {tuple(verified.shape)}")
    if verified.device != logits.device:
        raise ValueError(f"verified must be on logits' device {logits.device}, "
                         f"got {verified.device}")


def check_quality(quality, labels: torch.Tensor, logits: torch.Tensor, num_classes: int) -> None:
    """quality: floating tensor [N]; finite and in [0, 1] on foreground rows (others unused).

    The range is checked where :func:`reads_values` allows it.
    """
    if not isinstance(quality, torch.Tensor):
        raise ValueError(f"quality must be a torch.Tensor, got {type(quality).__name__}")
    if not quality.is_floating_point():
        raise ValueError(f"quality must be a floating tensor, got dtype {quality.dtype}")
    if quality.dim() != 1 or quality.shape[0] != logits.shape[0]:
        raise ValueError(f"quality must have shape [N] = [{logits.shape[0]}] to match logits, "
                         f"got {tuple(quality.shape)}")
    if quality.device != logits.device:
        raise ValueError(f"quality must be on logits' device {logits.device}, "
                         f"got {quality.device}")
    if quality.numel() and reads_values(quality):
        fg = (labels >= 0) & (labels < num_classes)
        ok = (quality >= 0) & (quality <= 1)  # False for NaN
        if bool((fg & ~ok).any()):
            raise ValueError("quality must be in [0, 1] (and finite) for foreground samples")


def check_avg_factor(avg_factor, logits: torch.Tensor) -> Union[None, float, torch.Tensor]:
    """None (the number of rows) or a positive finite number (float or one-element tensor).

    Returns None, a float, or a 0-dim tensor on logits' device. A tensor whose value can be
    read (:func:`reads_values`) is checked; one on the host is returned as a float when the
    logits are elsewhere, which spares a synchronous host-to-device copy. A tensor on the
    logits' device is passed on as it is: its value stays on the device.
    """
    if avg_factor is None:
        return None
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.numel() != 1:
            raise ValueError(f"avg_factor must be a number or a one-element tensor, "
                             f"got shape {tuple(avg_factor.shape)}")
        if avg_factor.dtype == torch.bool or avg_factor.is_complex():
            raise ValueError(f"avg_factor must be real, got dtype {avg_factor.dtype}")
        value = avg_factor.detach().reshape(())
        if not reads_values(value):
            if value.device != logits.device:
                raise ValueError(f"avg_factor must be a number, a CPU tensor or on logits' "
                                 f"device {logits.device}, got {value.device}")
            return value
        checked = value.item()
        if value.device != logits.device:
            value = checked
    else:
        value = checked = avg_factor
    if isinstance(checked, bool) or not isinstance(checked, Real):
        raise ValueError(f"avg_factor must be None or a positive number, "
                         f"got {type(checked).__name__}")
    if not math.isfinite(checked) or checked <= 0:
        raise ValueError(f"avg_factor must be finite and > 0, got {checked}")
    return value if isinstance(value, torch.Tensor) else float(value)


def raise_if_nonfinite(loss: torch.Tensor, logits: torch.Tensor) -> None:
    """Called on a computed loss: a non-finite logit makes it NaN or inf.

    Checking the scalar costs one read back instead of a pass over [N, C]; only when it is
    not finite are the logits inspected, so a genuine overflow is not misreported. Runs
    where :func:`reads_values` allows it.
    """
    if not reads_values(loss):
        return
    if not bool(torch.isfinite(loss)) and not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite: found NaN or inf")


def check_finite_logits(logits: torch.Tensor) -> None:
    """Direct check, for the softmax losses (a -inf logit can leave their value finite).
    Runs where :func:`reads_values` allows it."""
    if reads_values(logits) and not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite: found NaN or inf")
