"""Federated loss: Zhou et al., "Probabilistic two-stage detection", arXiv 2103.07461 (2021):
sigmoid cross-entropy over a sampled subset of classes, as in CenterNet2 and detectron2's
``FastRCNNOutputLayers`` (``USE_FED_LOSS``)."""

import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ._checks import (check_avg_factor, check_class_vector, check_labels, check_logits,
                      check_num_classes, check_scalar)
from ._fused import sigmoid_bce_loss

__all__ = ["FederatedLoss"]

# Keys of zero-weight classes sit this far (in log units) below the smallest log weight, so
# they come after every class of positive weight (see FederatedLoss.sample_classes).
_ZERO_WEIGHT_OFFSET = 40.0
_LOG_EXP_FLOOR = -30.0


class FederatedLoss(nn.Module):
    """Sigmoid cross-entropy over the batch's positive classes plus sampled negatives.

    Logits have C + 1 columns, as detectron2's ``FastRCNNOutputLayers`` predicts them: C
    class columns and a last, background column that is never trained (weight 0, gradient
    0) and not scored. For a batch of N rows with labels c_i (C = background), y_ij =
    [c_i == j] and a sampled class set S (a subset of the C foreground classes):

        L = (1 / avg_factor) sum_i sum_{j in S} BCE(z_ij, y_ij)

    S = P u D: P is the set of foreground classes labelled in the batch; D holds
    max(K - |P|, 0) classes outside P drawn without replacement with probability
    proportional to w_j = n_j^a (n_j: number of training images containing class j, a =
    ``freq_weight_power``, 0.5 in the paper), i.e. each draw picks among the classes left
    with probability w_j / sum w (sequential weighted sampling, as ``torch.multinomial``
    without replacement). K = min(``num_classes_sampled``, C). So |S| = max(K, |P|): if
    the positives outnumber K, S is P alone.

    Difference from detectron2: there the background label C is one of the "unique gt
    classes" and counts towards the 50, so a batch with background rows trains 49 classes
    for ``FED_LOSS_NUM_CLASSES`` = 50. Here K counts foreground classes only. Classes with
    n_j = 0 (weight 0) are never drawn while a class of positive weight is left; if fewer
    than K - |P| classes of positive weight remain, the rest of D is drawn uniformly from
    the zero-weight classes (``torch.multinomial`` would raise instead).

    The draw is an exponential race (Efraimidis and Spirakis): key_j = log w_j - log E_j
    with E_j ~ Exp(1), positives first, then the K largest keys; the K - |P| first
    non-positives are distributed as the sequential weighted draw above. It needs no
    device-to-host read (no ``unique``, no data-dependent shape). Randomness: ``generator``
    when given (drawn on its device, then moved), else the global RNG on the labels'
    device, so a trainer's per-iteration seeding applies. With DDP each worker draws its
    own S from its own positives, as detectron2 does.

    Args:
        num_classes: C.
        class_image_count: [C] number of training images containing each class, >= 0 with
            a positive sum. Kept as a persistent buffer (saved in checkpoints), so eval and
            inference need no dataset. None: unknown (NaN in the buffer); a checkpoint
            that holds counts sets them, and until then :meth:`forward` raises.
        num_classes_sampled: K >= 1 (default 50).
        freq_weight_power: a >= 0 (default 0.5); 0 draws uniformly.
        generator: optional ``torch.Generator`` for the draws.
        use_compile: as for :class:`~eql_d2.losses.EQLLoss`.

    Shapes: ``forward(logits [N, C+1], labels [N] int in 0..C, avg_factor=None)`` returns a
    0-dim loss (None: avg_factor = N, the mean over rows; 0 for N = 0).
    ``sample_classes(labels [N])`` returns the sampled set S as a bool mask [C].
    ``scores(logits [N, C+1])`` returns sigmoid(z[:, :C]), [N, C].
    """

    def __init__(self, num_classes: int,
                 class_image_count: Optional[Union[torch.Tensor, Sequence[float]]] = None,
                 num_classes_sampled: int = 50, freq_weight_power: float = 0.5,
                 generator: Optional[torch.Generator] = None,
                 use_compile: Optional[bool] = None):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        if (isinstance(num_classes_sampled, bool) or not isinstance(num_classes_sampled, int)
                or num_classes_sampled < 1):
            raise ValueError(f"num_classes_sampled must be a positive int, "
                             f"got {num_classes_sampled!r}")
        self.num_classes_sampled = num_classes_sampled
        self.freq_weight_power = check_scalar("freq_weight_power", freq_weight_power, low=0.0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, "
                             f"got {type(generator).__name__}")
        self.generator = generator
        self.use_compile = use_compile
        if class_image_count is None:
            counts = torch.full((num_classes,), float("nan"))
        else:
            counts = self._checked_counts(class_image_count)
        self.register_buffer("class_image_count", counts)
        self._counts_known = class_image_count is not None

    def _checked_counts(self, values) -> torch.Tensor:
        counts = check_class_vector("class_image_count", values, low=0.0).float()
        if counts.numel() != self.num_classes:
            raise ValueError(f"class_image_count has {counts.numel()} entries, but "
                             f"num_classes = {self.num_classes}")
        if not bool(counts.sum() > 0):
            raise ValueError("class_image_count must have a positive sum (some class must "
                             "appear in some training image)")
        return counts

    @property
    def counts_known(self) -> bool:
        """Whether ``class_image_count`` holds counts (given, or loaded from a checkpoint)."""
        return self._counts_known

    def sample_weights(self) -> torch.Tensor:
        """w_j = n_j^a [C] (float32), the unnormalized draw weights."""
        return self.class_image_count.float().pow(self.freq_weight_power)

    def sample_classes(self, labels: torch.Tensor) -> torch.Tensor:
        """The sampled class set S for a batch with ``labels`` [N] (0..C), bool [C].

        Positives (labels < C) always; then the races' winners up to K classes in all.
        Draws C uniform numbers from ``generator`` or the global RNG at every call.
        """
        if not self._counts_known:
            raise ValueError(
                "FederatedLoss.class_image_count is unknown: build the loss with the "
                "training set's per-class image counts, or load a checkpoint that holds them")
        c = self.num_classes
        dev = self.class_image_count.device
        positive = torch.zeros(c + 1, dtype=torch.bool, device=dev)
        positive[labels.to(dev)] = True
        positive = positive[:c]

        draw_device = self.generator.device if self.generator is not None else dev
        u = torch.rand(c, generator=self.generator, device=draw_device,
                       dtype=torch.float32).to(dev)
        # E = -log(1 - u) ~ Exp(1); the race's winners are the largest log w - log E. The
        # floor keeps u = 0 (E = 0) finite, and bounds the keys for the zero-weight tier.
        log_e = torch.log(-torch.log1p(-u)).clamp(min=_LOG_EXP_FLOOR)
        w = self.sample_weights()
        has_weight = w > 0
        log_w = torch.log(w)
        # Zero-weight classes race among themselves below every class of positive weight:
        # their keys lie under min log w - offset - log E <= min log w - 10, and those of
        # positive weight above min log w - max log E >= min log w - 2.9 (float32 E < 17).
        floor = torch.where(has_weight, log_w, torch.full_like(log_w, math.inf)).min()
        log_w = torch.where(has_weight, log_w, floor - _ZERO_WEIGHT_OFFSET)
        keys = (log_w - log_e).masked_fill(positive, math.inf)
        k = min(self.num_classes_sampled, c)
        sampled = torch.zeros(c, dtype=torch.bool, device=dev)
        sampled[keys.topk(k).indices] = True
        return sampled | positive

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                avg_factor: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
        c = self.num_classes
        check_logits(logits, c + 1, "C+1")
        check_labels(labels, logits, 0, c)
        avg_factor = check_avg_factor(avg_factor, logits)
        sampled = self.sample_classes(labels).to(logits.device)
        # Per-class weights of positive and negative entries: 1 on S, 0 elsewhere and on
        # the background column; the fused kernel then gives 0 loss and 0 gradient there.
        w = torch.cat([sampled, sampled.new_zeros(1)]).float()
        loss, _ = sigmoid_bce_loss(logits, labels, None, w, w, None, c, avg_factor,
                                   want_stats=False, use_compile=self.use_compile)
        return loss

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """sigmoid(z_ij) [N, C] from logits [N, C+1] (the background column is unused)."""
        check_logits(logits, self.num_classes + 1, "C+1")
        return torch.sigmoid(logits[:, :-1])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "class_image_count"
        if key not in state_dict:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            if key in missing_keys:
                missing_keys.remove(key)
            kept = "keeping the counts it was built with" if self._counts_known else \
                "they stay unknown and the loss cannot train"
            warnings.warn(f"{type(self).__name__}: the state_dict has no {key}; {kept}.",
                          UserWarning, stacklevel=2)
            return
        loaded = state_dict[key]
        if isinstance(loaded, torch.Tensor) and loaded.shape == self.class_image_count.shape:
            if bool(torch.isnan(loaded).all()):
                # Saved from a loss whose counts were unknown: keep what this one knows.
                state_dict = {k: v for k, v in state_dict.items() if k != key}
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                              missing_keys, unexpected_keys, error_msgs)
                if key in missing_keys:
                    missing_keys.remove(key)
                return
            try:
                self._checked_counts(loaded)
            except ValueError as exc:
                error_msgs.append(f"{key}: {exc}")
                return
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) == errors_before:
            self._counts_known = True

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_classes_sampled="
                f"{self.num_classes_sampled}, freq_weight_power={self.freq_weight_power}, "
                f"counts_known={self._counts_known}")
