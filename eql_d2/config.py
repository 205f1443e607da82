"""eql_d2's config keys. Call ``add_eql_config(cfg)`` on detectron2's default config, or
start from ``get_eql_cfg(config_file, opts)``.

Every key has its default here with a one-line comment; each concern has its own node
and its own ``_add_*_config`` function below.
"""

import os

from detectron2.config import CfgNode as CN  # noqa: F401  (used by the node functions)
from detectron2.config import get_cfg

__all__ = ["add_eql_config", "get_eql_cfg"]


def add_eql_config(cfg):
    """Add every eql_d2 key, with its default, to a detectron2 config (in place)."""
    for add in _NODES:
        add(cfg)


def get_eql_cfg(config_file=None, opts=()):
    """detectron2's default config with every eql_d2 key, then `config_file` (a YAML and its
    ``_BASE_`` chain) and then `opts` (``[KEY, VALUE, ...]`` overrides) merged in. Not frozen."""
    cfg = get_cfg()
    add_eql_config(cfg)
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"Config file not found: {config_file}")
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


# One function per config node, appended in the order they are defined below.
_NODES = []


def _add_eql_roi_heads_config(cfg):
    """MODEL.EQL: classification loss of EQLROIHeads (two-stage detectors) and its inputs."""
    cfg.MODEL.EQL = CN()
    # Box classification loss of the EQL ROI heads, by CLS_LOSS_REGISTRY name: SoftmaxCE
    # ("softmax"), SigmoidCE ("sigmoid"), EQL, EQLv2, Seesaw, Federated, or one you register.
    cfg.MODEL.EQL.LOSS = "softmax"
    # EQL frequency threshold lambda (eq. 7): categories with f_j < lambda are tail categories.
    cfg.MODEL.EQL.LAMBDA = 1.76e-3
    # EQL excluding function E(r) (eq. 7, Tab. 4); False: background proposals skip tail too.
    cfg.MODEL.EQL.EXCLUDING_FUNCTION = True
    # Initial probability of every category in sigmoid-type classifiers (sets the bias).
    cfg.MODEL.EQL.PRIOR_PROB = 0.001
    cfg.MODEL.EQL.EQLV2 = CN()
    # EQLv2 steepness gamma of the gradient-ratio -> negative-weight mapping.
    cfg.MODEL.EQL.EQLV2.GAMMA = 12.0
    # EQLv2 centre mu of that mapping.
    cfg.MODEL.EQL.EQLV2.MU = 0.8
    # EQLv2 positive up-weighting alpha.
    cfg.MODEL.EQL.EQLV2.ALPHA = 4.0
    # Keep full weight for categories in an image's positive or neg_category_ids set (EQL 4.2).
    cfg.MODEL.EQL.USE_IMAGE_LEVEL_LABELS = True
    # Background proposals are not negatives for the image's not_exhaustive_category_ids.
    cfg.MODEL.EQL.IGNORE_NOT_EXHAUSTIVE = False
    # Log EQLv2 gradient-ratio means (rare / common / frequent) every PERIOD iterations.
    cfg.MODEL.EQL.PERIOD = 20


_NODES.append(_add_eql_roi_heads_config)


def _add_efl_config(cfg):
    """MODEL.EFL: classification loss of the dense detectors (EFLRetinaNet, ATSS, EFLFCOS)."""
    cfg.MODEL.EFL = CN()
    # Classification loss of the dense heads, by CLS_LOSS_REGISTRY name: focal, efl, qfl,
    # eqfl (EFL, EQFL: Li et al. CVPR 2022 eq. 4, 5), sigmoid_ce, or one you register.
    cfg.MODEL.EFL.LOSS = "focal"
    # gamma_b, base focusing factor of EFL/EQFL (eq. 3); gamma of focal, beta of QFL
    cfg.MODEL.EFL.GAMMA_B = 2.0
    # s of eq. 3, upper limit of the category-specific focusing term (0: EFL = focal)
    cfg.MODEL.EFL.SCALE = 8.0
    # alpha_t balance of positives/negatives for focal and EFL (QFL/EQFL/sigmoid_ce: unused)
    cfg.MODEL.EFL.ALPHA = 0.25
    # EFL/EQFL focusing factor (Tab. 3 "FF"); False: exponent gamma_b for every category
    cfg.MODEL.EFL.FOCUSING_FACTOR = True
    # EFL/EQFL weighting factor (Tab. 3 "WF"); False: weight 1 instead of gamma^j / gamma_b
    cfg.MODEL.EFL.WEIGHTING_FACTOR = True
    # log r/c/f means of g^j and gamma^j every PERIOD iterations (0: never)
    cfg.MODEL.EFL.PERIOD = 20


_NODES.append(_add_efl_config)


def _add_regime_indicators_config(cfg):
    """MODEL.REGIME_INDICATORS: per-category training regime of every classification head
    (eql_d2.modeling.regime.RegimeIndicators), whatever its loss."""
    cfg.MODEL.REGIME_INDICATORS = CN()
    # accumulate positives / negatives seen and gradient sums per category (one extra
    # backward through the classification loss alone per iteration)
    cfg.MODEL.REGIME_INDICATORS.ENABLED = True
    # append a snapshot to OUTPUT_DIR/regime_indicators.jsonl every PERIOD iterations and at
    # the last one (0: never written; the buffers are still in checkpoints)
    cfg.MODEL.REGIME_INDICATORS.PERIOD = 100


_NODES.append(_add_regime_indicators_config)


def _add_seesaw_config(cfg):
    """MODEL.SEESAW: Seesaw loss (Wang et al., CVPR 2021), MODEL.EQL.LOSS "seesaw"."""
    cfg.MODEL.SEESAW = CN()
    # mitigation exponent p of M_ij = (N_j / N_i)^p (0: no mitigation)
    cfg.MODEL.SEESAW.P = 0.8
    # compensation exponent q of C_ij = (sigma_j / sigma_i)^q (0: no compensation)
    cfg.MODEL.SEESAW.Q = 2.0
    # lower bound of sigma_i in the compensation factor
    cfg.MODEL.SEESAW.EPS = 0.01
    # temperature tau of the normalized linear (cosine) classifier
    cfg.MODEL.SEESAW.TAU = 20.0


_NODES.append(_add_seesaw_config)


def _add_federated_config(cfg):
    """MODEL.FEDERATED: federated loss (Zhou et al., 2021), MODEL.EQL.LOSS "federated"."""
    cfg.MODEL.FEDERATED = CN()
    # foreground classes per iteration: the batch's positives plus classes drawn by frequency
    cfg.MODEL.FEDERATED.NUM_CLASSES_SAMPLED = 50
    # draw weight of a class: its training image frequency to this power
    cfg.MODEL.FEDERATED.FREQ_WEIGHT_POWER = 0.5


_NODES.append(_add_federated_config)


def _add_atss_config(cfg):
    """MODEL.ATSS: the improved ATSS baseline of Li et al. (CVPR 2022, sec. 4.1, Tab. 5)."""
    cfg.MODEL.ATSS = CN()
    # number of foreground categories
    cfg.MODEL.ATSS.NUM_CLASSES = 80
    # FPN levels the head runs on (P3-P7 in the paper)
    cfg.MODEL.ATSS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # anchor side = scale x level stride; {6, 8} is the paper's "increased anchor scale"
    cfg.MODEL.ATSS.ANCHOR_SCALES = [6.0, 8.0]
    # anchor aspect ratios (h / w)
    cfg.MODEL.ATSS.ANCHOR_ASPECT_RATIOS = [1.0]
    # k: candidates per ground-truth box and pyramid level, nearest centres first (paper: 18)
    cfg.MODEL.ATSS.TOPK = 18
    # convs per head branch, each followed by NORM and ReLU
    cfg.MODEL.ATSS.NUM_CONVS = 4
    # head normalization (GroupNorm in the paper)
    cfg.MODEL.ATSS.NORM = "GN"
    # initial foreground probability of the classifier (0.001 for LVIS, as in the paper)
    cfg.MODEL.ATSS.PRIOR_PROB = 0.001
    # Box2BoxTransform weights (dx, dy, dw, dh)
    cfg.MODEL.ATSS.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    # weight of the GIoU box loss
    cfg.MODEL.ATSS.BBOX_REG_LOSS_WEIGHT = 2.0
    # weight of the IoU-branch BCE loss (positives only)
    cfg.MODEL.ATSS.IOU_LOSS_WEIGHT = 1.0
    # keep only scores above this before NMS (0: keep all, as the paper)
    cfg.MODEL.ATSS.SCORE_THRESH_TEST = 0.0
    # candidates kept per pyramid level before NMS
    cfg.MODEL.ATSS.TOPK_CANDIDATES_TEST = 1000
    # per-class NMS IoU threshold
    cfg.MODEL.ATSS.NMS_THRESH_TEST = 0.6


_NODES.append(_add_atss_config)


def _add_fcos_config(cfg):
    """MODEL.FCOS: detectron2's FCOS as EFLFCOS (detectron2 configures FCOS by LazyConfig only)."""
    cfg.MODEL.FCOS = CN()
    # number of foreground categories
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    # FPN levels the head runs on (P3-P7; detectron2's scale ranges assume strides 8-128)
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # convs per head branch, each followed by NORM and ReLU
    cfg.MODEL.FCOS.NUM_CONVS = 4
    # head normalization (GroupNorm, as detectron2's FCOS)
    cfg.MODEL.FCOS.NORM = "GN"
    # initial foreground probability of the classifier (0.001 for LVIS, as in the EFL paper)
    cfg.MODEL.FCOS.PRIOR_PROB = 0.001
    # a point is positive only within this many strides of the box centre (center sampling)
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    # keep only scores sqrt(cls * centerness) above this before NMS (0: keep all, as the
    # EFL paper; detectron2's COCO FCOS uses 0.2)
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.0
    # candidates kept per pyramid level before NMS
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    # per-class NMS IoU threshold
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6


_NODES.append(_add_fcos_config)


def _add_dataloader_config(cfg):
    """DATALOADER: checks and fault tolerance of eql_d2's resumable training loader."""
    # check before training that every training image file exists (a stat per image)
    cfg.DATALOADER.CHECK_IMAGE_FILES = True
    # training images that may fail to load (replaced by another sample, with a warning)
    # per process before training stops with an error naming them
    cfg.DATALOADER.MAX_FAILED_IMAGES = 20


_NODES.append(_add_dataloader_config)


def _add_eval_config(cfg):
    """TEST.EVAL: LVIS evaluation outputs (eql_d2.evaluation.LVISPerCategoryEvaluator)."""
    cfg.TEST.EVAL = CN()
    # LVIS per-image cap of standard AP (300 is the official value); independent of
    # TEST.DETECTIONS_PER_IMAGE, which is how many detections the model outputs
    cfg.TEST.EVAL.MAX_DETS_PER_IMAGE = 300
    # also report AP-fixed (Dave et al. 2021): no per-image cap, top K per class over the
    # dataset; raise TEST.DETECTIONS_PER_IMAGE so the model outputs more than 300 per image
    cfg.TEST.EVAL.AP_FIXED = False
    # K of AP-fixed: detections kept per category over the whole dataset
    cfg.TEST.EVAL.AP_FIXED_DETS_PER_CLASS = 10000
    # write the per-category CSV and PNG plots next to the results JSON
    cfg.TEST.EVAL.PER_CATEGORY_OUTPUTS = True


_NODES.append(_add_eval_config)
