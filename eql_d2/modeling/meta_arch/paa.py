"""PAA: Kim & Lee, "Probabilistic Anchor Assignment with IoU Prediction for Object Detection"
(ECCV 2020), with the classification loss of ``MODEL.CLS_LOSS``. Li et al., "Equalized
Focal Loss for Dense Long-Tailed Object Detection" (CVPR 2022, Tab. 6) train it on LVIS v1
with focal loss and with EFL.

PAA is the ATSS detector of this package (RetinaNet's head with an IoU branch, GIoU box loss
weighted by the IoU targets) with three changes, each as in the authors' code (kkhoot/PAA,
``paa_core/modeling/rpn/paa/``):

- one anchor of 8 x stride per location and a learnable scale per level on the box deltas;
- the assignment (:func:`paa_candidates`, :func:`paa_split`): an anchor joins the pool of
  the ground-truth box it overlaps most when that IoU is at least ``iou_threshold`` (each
  box also gets its best-overlapping anchors); per box and pyramid level the ``topk`` pool
  anchors of lowest anchor score are its candidates; a two-component Gaussian mixture fitted
  to the candidates' scores (:func:`fit_two_gaussians`) separates them, and the candidates
  up to the separation boundary are positives, every other anchor background;
- score voting at test time (:func:`score_voting`).

The anchor score (the paper's -log of S_cls x S_loc, sec. 3.1) is the focal loss of the
anchor's class logits against its box's class, summed over classes, plus the GIoU loss of
its decoded box, both on detached predictions. It is focal loss whatever loss trains the
classifier: the paper defines the score so, and calling a loss with statistics (EFL, EQFL)
a second time per iteration would update them twice.
"""

import math
from typing import List, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .atss import ATSS, ATSSHead
from .dense_loss import DenseClassificationLoss, head_feature_shapes

__all__ = ["PAA", "PAAHead", "fit_two_gaussians", "paa_anchor_scores", "paa_candidates",
           "paa_split", "score_voting"]

_LOG_2PI = math.log(2 * math.pi)
# a pre-NMS box votes for a kept box of its class when their IoU exceeds this (authors' code)
VOTING_MIN_IOU = 0.01


def _gaussian_e_step(x: Tensor, mean: Tensor, var: Tensor, log_weight: Tensor):
    """Log posteriors [B, K, 2] and log mixture densities [B, K] of x [B, K] under
    per-row components (mean, var, log_weight: [B, 2])."""
    diff = x[..., None] - mean[:, None, :]
    log_prob = (-0.5 * (_LOG_2PI + var.log()[:, None, :] + diff * diff / var[:, None, :])
                + log_weight[:, None, :])
    log_density = torch.logsumexp(log_prob, dim=-1)
    return log_prob - log_density[..., None], log_density


@torch.no_grad()
def fit_two_gaussians(x: Tensor, valid: Tensor, max_iter: int = 100, tol: float = 1e-3,
                      reg_covar: float = 1e-6):
    """Fit a two-component 1-D Gaussian mixture to each row of ``x`` by EM, all rows at once.

    Row by row this is scikit-learn's ``GaussianMixture(2, weights_init=[0.5, 0.5],
    means_init=[[min], [max]], precisions_init=[[[1]], [[1]]])`` (the authors' call):
    component 0 starts at the row's smallest value and component 1 at its largest, both
    with variance 1 and weight 1/2; each M-step adds ``reg_covar`` to the variances; a row
    stops after the iteration in which its mean log-likelihood changed by less than ``tol``
    (or after ``max_iter``). Computed in float64. Written here rather than called, because
    scikit-learn fits one box at a time on the host (a device-to-host copy per box in the
    authors' code), where this fits every box of a batch in one loop on the model's device;
    ``tests/modeling/test_paa.py`` holds it equal to scikit-learn's.

    Args:
        x: [B, K] values; entries where ``valid`` is False are ignored.
        valid: [B, K] bool; a row needs at least 2 valid entries to be fitted (others are
            left at the initial mixture).

    Returns:
        (component [B, K] long: the component of highest posterior, scikit-learn's
        ``predict``; log_density [B, K] float64: the log density of each value under the
        fitted mixture, scikit-learn's ``score_samples``).
    """
    x = torch.where(valid, x.double(), 0.0)
    count = valid.sum(dim=1)
    n = count.clamp(min=1).double()
    big = torch.finfo(x.dtype).max
    lowest = torch.where(valid, x, big).amin(dim=1)
    highest = torch.where(valid, x, -big).amax(dim=1)
    some = count > 0
    mean = torch.stack([torch.where(some, lowest, 0.0), torch.where(some, highest, 0.0)], dim=1)
    var = torch.ones_like(mean)
    log_weight = torch.full_like(mean, math.log(0.5))
    bound = torch.full_like(n, -math.inf)
    active = count >= 2
    eps = 10 * torch.finfo(x.dtype).eps
    mask = valid[..., None].double()
    for step in range(max_iter):
        log_resp, log_density = _gaussian_e_step(x, mean, var, log_weight)
        resp = log_resp.exp() * mask
        nk = resp.sum(dim=1) + eps
        new_mean = (resp * x[..., None]).sum(dim=1) / nk
        diff = x[..., None] - new_mean[:, None, :]
        new_var = (resp * diff * diff).sum(dim=1) / nk + reg_covar
        new_log_weight = (nk / nk.sum(dim=1, keepdim=True)).log()
        # the mean log-likelihood of the parameters this step started from, as scikit-learn
        new_bound = (log_density * valid).sum(dim=1) / n
        update = active[:, None]
        mean = torch.where(update, new_mean, mean)
        var = torch.where(update, new_var, var)
        log_weight = torch.where(update, new_log_weight, log_weight)
        converged = (new_bound - bound).abs() < tol
        bound = torch.where(active, new_bound, bound)
        active = active & ~converged
        # a host sync every few steps only; a finished row no longer changes either way
        if step % 4 == 3 and not bool(active.any()):
            break
    log_resp, log_density = _gaussian_e_step(x, mean, var, log_weight)
    return log_resp.argmax(dim=-1), log_density


@torch.no_grad()
def paa_split(scores: Tensor, **gmm_args) -> Tensor:
    """The positives among each box's candidates (the authors' rule, the paper's Fig. 3c).

    Per row (one ground-truth box), the finite ``scores`` are its candidates' anchor scores
    (lower is better; +inf marks no candidate). A mixture of two Gaussians is fitted to
    them (:func:`fit_two_gaussians`, component 0 started at the lowest score); in ascending
    order of score, the candidates up to and including the one of component 0 with the
    highest mixture density are positive. A row whose candidates all fall in component 1
    makes every candidate positive, and a single candidate is positive.

    Args:
        scores: [M, K] float, +inf where a box has fewer than K candidates.
        gmm_args: passed to :func:`fit_two_gaussians`.

    Returns:
        [M, K] bool, in the columns of ``scores``.
    """
    valid = torch.isfinite(scores)
    ordered, order = torch.where(valid, scores, math.inf).sort(dim=1, stable=True)
    ordered_valid = valid.gather(1, order)
    component, log_density = fit_two_gaussians(ordered, ordered_valid, **gmm_args)
    first = (component == 0) & ordered_valid
    best = torch.where(first, log_density, -math.inf).amax(dim=1, keepdim=True)
    # position of the first candidate of component 0 at that density
    boundary = (first & (log_density == best)).int().argmax(dim=1)
    columns = torch.arange(scores.shape[1], device=scores.device)
    positive = (columns[None, :] <= boundary[:, None]) & ordered_valid
    take_all = ~first.any(dim=1, keepdim=True) | (ordered_valid.sum(dim=1, keepdim=True) < 2)
    positive = torch.where(take_all, ordered_valid, positive)
    return torch.zeros_like(valid).scatter(1, order, positive)


@torch.no_grad()
def paa_candidates(matched: Tensor, anchor_scores: Tensor, num_anchors_per_level: Sequence[int],
                   num_gt: int, topk: int):
    """Each box's candidate anchors: per pyramid level, the ``topk`` anchors of lowest score
    among those assigned to it.

    Args:
        matched: [R] long, the box each anchor's pool belongs to (-1: none), levels
            concatenated in ``num_anchors_per_level`` order.
        anchor_scores: [R], the anchor scores (only pool anchors' are read).
        num_anchors_per_level: R_l per level.
        num_gt: M, the number of boxes.
        topk: k >= 1; a level with fewer anchors gives at most all of them.

    Returns:
        (index [M, K] long into the R anchors, score [M, K] float with +inf where the box has
        fewer than k pool anchors on a level), K = sum_l min(k, R_l).
    """
    if topk < 1:
        raise ValueError(f"MODEL.PAA.TOPK must be >= 1, got {topk}")
    boxes = torch.arange(num_gt, device=matched.device)
    indices, scores = [], []
    start = 0
    for count in num_anchors_per_level:
        own = matched[None, start:start + count] == boxes[:, None]  # [M, R_l]
        level = torch.where(own, anchor_scores[None, start:start + count], math.inf)
        value, index = level.topk(min(topk, count), dim=1, largest=False)
        indices.append(index + start)
        scores.append(value)
        start += count
    return torch.cat(indices, dim=1), torch.cat(scores, dim=1)


def paa_anchor_scores(logits: Tensor, classes: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
                      alpha: float, gamma: float) -> Tensor:
    """Anchor scores of P anchors: focal loss of their class logits [P, C] against the one-hot
    class [P] of their box, summed over the C classes, plus the GIoU loss of their decoded
    boxes [P, 4] against their box [P, 4] (XYXY). Returns [P]."""
    targets = nn.functional.one_hot(classes, logits.shape[1]).to(logits.dtype)
    cls = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    return cls.sum(dim=1) + generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")


def score_voting(boxes: Tensor, classes: Tensor, candidate_boxes: Tensor,
                 candidate_scores: Tensor, candidate_classes: Tensor, sigma: float) -> Tensor:
    """Score voting (PAA, sec. 3.4): each kept box b becomes

        sum_i p_i s_i b_i / sum_i p_i s_i,   p_i = exp(-(1 - IoU(b, b_i))^2 / sigma),

    over the candidate boxes b_i (the boxes before NMS, b among them) of b's class whose IoU
    with b exceeds :data:`VOTING_MIN_IOU`, s_i their scores.

    Args:
        boxes: [D, 4] kept boxes (XYXY), classes: [D].
        candidate_boxes: [P, 4], candidate_scores: [P], candidate_classes: [P].
        sigma: sigma_t (0.025 in the paper).

    Returns:
        [D, 4] voted boxes; a box without votes of positive weight stays as it is.
    """
    iou = pairwise_iou(Boxes(boxes), Boxes(candidate_boxes))  # [D, P]
    votes = ((iou > VOTING_MIN_IOU) & (classes[:, None] == candidate_classes[None, :]))
    weight = torch.exp(-(1 - iou) ** 2 / sigma) * candidate_scores[None, :] * votes
    total = weight.sum(dim=1, keepdim=True)
    voted = (weight @ candidate_boxes) / total.clamp(min=torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, voted, boxes)


class PAAHead(ATSSHead):
    """ATSS's head (RetinaNet's towers with GroupNorm and an IoU branch on the box tower)
    with PAA's learnable scale per pyramid level on the box deltas, initialised to 1."""

    @configurable
    def __init__(self, *, input_shape: List[ShapeSpec], num_classes, num_anchors,
                 conv_dims: List[int], norm="GN", prior_prob=0.001):
        super().__init__(input_shape=input_shape, num_classes=num_classes,
                         num_anchors=num_anchors, conv_dims=conv_dims, norm=norm,
                         prior_prob=prior_prob)
        self.box_scales = nn.Parameter(torch.ones(len(input_shape)))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        paa = cfg.MODEL.PAA
        return {
            "input_shape": input_shape,
            "num_classes": paa.NUM_CLASSES,
            "num_anchors": len(paa.ANCHOR_SCALES) * len(paa.ANCHOR_ASPECT_RATIOS),
            "conv_dims": [input_shape[0].channels] * paa.NUM_CONVS,
            "norm": paa.NORM,
            "prior_prob": paa.PRIOR_PROB,
        }

    def forward(self, features: List[Tensor]):
        logits, deltas, ious = super().forward(features)
        return logits, [d * self.box_scales[i] for i, d in enumerate(deltas)], ious


@META_ARCH_REGISTRY.register()
class PAA(ATSS):
    """PAA (see the module docstring) on :class:`ATSS`'s losses and decoding.

    Training: :meth:`label_anchors` assigns anchors from the current predictions. Losses,
    each divided by the number of positives averaged over workers (as :class:`ATSS`):
    ``loss_cls`` (:class:`DenseClassificationLoss`: focal / EFL / QFL / EQFL / sigmoid CE),
    ``loss_box_reg`` (GIoU of the positives' decoded boxes, each weighted by its IoU target,
    divided by the sum of the targets, times ``box_reg_loss_weight``), ``loss_iou`` (BCE of
    the IoU branch against the IoU of the decoded box, times ``iou_loss_weight``).

    Inference: score sqrt(sigmoid(class) x sigmoid(IoU)) as the authors, the
    ``test_topk_candidates`` best per level above ``test_score_thresh``, boxes clipped to
    the image, class-wise NMS, ``max_detections_per_image`` kept, then
    :func:`score_voting` over the candidates of all levels when ``score_voting_sigma`` is
    set.
    """

    @configurable
    def __init__(self, *, iou_threshold: float = 0.1, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, score_voting_sigma: float = 0.025, **kwargs):
        """
        Args:
            iou_threshold: an anchor joins the pool of the box it overlaps most from this
                IoU on (``MODEL.PAA.IOU_THRESHOLD``).
            focal_alpha, focal_gamma: of the anchor score's focal loss
                (``MODEL.CLS_LOSS.FOCAL.ALPHA`` / ``GAMMA``).
            score_voting_sigma: sigma_t of :func:`score_voting`; 0 turns voting off.
            kwargs: the arguments of :class:`ATSS`, ``topk`` being k of
                :func:`paa_candidates`; the box loss is always weighted by the IoU targets.
        """
        super().__init__(box_reg_loss_weighting="iou", **kwargs)
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"MODEL.PAA.IOU_THRESHOLD must lie in (0, 1], got {iou_threshold}")
        if score_voting_sigma < 0:
            raise ValueError("MODEL.PAA.SCORE_VOTING_SIGMA must be >= 0, got "
                             f"{score_voting_sigma}")
        # IoU >= threshold: in the pool of the best box; each box's best anchors join too
        self.matcher = Matcher([iou_threshold], [0, 1], allow_low_quality_matches=True)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.score_voting_sigma = score_voting_sigma

    @classmethod
    def from_config(cls, cfg):
        paa = cfg.MODEL.PAA
        if paa.TOPK < 1:
            raise ValueError(f"MODEL.PAA.TOPK must be >= 1, got {paa.TOPK}")
        scales = list(paa.ANCHOR_SCALES)
        if not scales or min(scales) <= 0:
            raise ValueError(f"MODEL.PAA.ANCHOR_SCALES must be positive numbers, got {scales}")
        if paa.SCORE_VOTING and paa.SCORE_VOTING_SIGMA <= 0:
            raise ValueError("MODEL.PAA.SCORE_VOTING_SIGMA must be > 0 with MODEL.PAA.SCORE_VOTING "
                             f"True, got {paa.SCORE_VOTING_SIGMA}")
        backbone = build_backbone(cfg)
        in_features = list(paa.IN_FEATURES)
        feature_shapes = head_feature_shapes("MODEL.PAA.IN_FEATURES", in_features, backbone,
                                             cfg.MODEL.BACKBONE.NAME)
        strides = [s.stride for s in feature_shapes]
        anchor_generator = DefaultAnchorGenerator(
            sizes=[[s * stride for s in scales] for stride in strides],
            aspect_ratios=[list(paa.ANCHOR_ASPECT_RATIOS)],
            strides=strides,
            offset=cfg.MODEL.ANCHOR_GENERATOR.OFFSET,
        )
        return {
            "backbone": backbone,
            "head": PAAHead(cfg, feature_shapes),
            "head_in_features": in_features,
            "anchor_generator": anchor_generator,
            "box2box_transform": Box2BoxTransform(weights=paa.BBOX_REG_WEIGHTS),
            "num_classes": paa.NUM_CLASSES,
            "cls_loss": DenseClassificationLoss(cfg, paa.NUM_CLASSES),
            "topk": paa.TOPK,
            "iou_threshold": paa.IOU_THRESHOLD,
            "focal_alpha": cfg.MODEL.CLS_LOSS.FOCAL.ALPHA,
            "focal_gamma": cfg.MODEL.CLS_LOSS.FOCAL.GAMMA,
            "box_reg_loss_weight": paa.BBOX_REG_LOSS_WEIGHT,
            "iou_loss_weight": paa.IOU_LOSS_WEIGHT,
            "score_voting_sigma": paa.SCORE_VOTING_SIGMA if paa.SCORE_VOTING else 0.0,
            "test_score_thresh": paa.SCORE_THRESH_TEST,
            "test_topk_candidates": paa.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": paa.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
        }

    def forward_training(self, images, features, predictions, gt_instances):
        pred_logits, pred_deltas, pred_ious = self._transpose_dense_predictions(
            predictions, [self.num_classes, 4, 1])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances, pred_logits, pred_deltas)
        return self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes, pred_ious)

    @torch.no_grad()
    def label_anchors(self, anchors: List[Boxes], gt_instances: List[Instances],
                      pred_logits: List[Tensor], pred_deltas: List[Tensor]):
        """PAA's assignment of a batch; the mixtures of all images' boxes are fitted at once.

        Args:
            anchors: list over levels of Boxes [R_l].
            gt_instances: per image, ``gt_boxes`` and ``gt_classes``.
            pred_logits, pred_deltas: lists over levels of (N, R_l, C / 4), the head's
                predictions (read, not differentiated).

        Returns:
            As :meth:`ATSS.label_anchors`: per image, labels [R] in {0..C-1, C background}
            and the boxes [R, 4] of the positives (zeros elsewhere).
        """
        num_per_level = [len(a) for a in anchors]
        all_anchors = Boxes.cat(anchors)
        logits = cat(pred_logits, dim=1)
        deltas = cat(pred_deltas, dim=1)
        candidates, candidate_scores = [], []
        for img, inst in enumerate(gt_instances):
            num_gt = len(inst)
            if num_gt == 0:
                candidates.append(None)
                continue
            matched, match_labels = self.matcher(pairwise_iou(inst.gt_boxes, all_anchors))
            pool = match_labels == 1
            pool_idx = pool.nonzero().squeeze(1)
            pool_gt = matched[pool_idx]
            pred_boxes = self.box2box_transform.apply_deltas(
                deltas[img, pool_idx], all_anchors.tensor[pool_idx])
            scores = torch.full((len(all_anchors),), math.inf, device=logits.device)
            scores[pool_idx] = paa_anchor_scores(
                logits[img, pool_idx].float(), inst.gt_classes[pool_gt], pred_boxes.float(),
                inst.gt_boxes.tensor[pool_gt], self.focal_alpha, self.focal_gamma)
            index, score = paa_candidates(torch.where(pool, matched, -1), scores,
                                          num_per_level, num_gt, self.topk)
            candidates.append(index)
            candidate_scores.append(score)
        positive = paa_split(torch.cat(candidate_scores)) if candidate_scores else None

        gt_labels, gt_boxes = [], []
        row = 0
        for inst, index in zip(gt_instances, candidates):
            assigned = torch.full((len(all_anchors),), -1, dtype=torch.long,
                                  device=all_anchors.device)
            if index is not None:
                pos = positive[row:row + index.shape[0]]
                owner = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
                # candidate sets of different boxes are disjoint: an anchor has one pool
                assigned[index[pos]] = owner[pos]
                row += index.shape[0]
            fg = assigned >= 0
            safe = assigned.clamp(min=0)
            if len(inst) > 0:
                gt_labels.append(torch.where(fg, inst.gt_classes[safe], self.num_classes))
                gt_boxes.append(inst.gt_boxes.tensor[safe] * fg[:, None])
            else:
                gt_labels.append(torch.full_like(assigned, self.num_classes))
                gt_boxes.append(torch.zeros((len(assigned), 4), device=assigned.device))
        return gt_labels, gt_boxes

    def _select(self, pred: Instances, image_size) -> Instances:
        """ATSS's NMS and cap on boxes clipped to the image, then score voting."""
        pred.pred_boxes.clip(image_size)
        result = super()._select(pred, image_size)
        if self.score_voting_sigma > 0:
            result.pred_boxes = Boxes(score_voting(
                result.pred_boxes.tensor, result.pred_classes, pred.pred_boxes.tensor,
                pred.scores, pred.pred_classes, self.score_voting_sigma))
        return result
