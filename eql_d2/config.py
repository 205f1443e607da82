"""eql_d2's config keys. Call ``add_eql_config(cfg)`` on detectron2's default config, or
start from ``get_eql_cfg(config_file, opts)``.

Every key has its default here with a one-line comment, one node per concern. The settings
of each classification loss are not listed here: every loss registered in
:data:`~eql_d2.modeling.cls_losses.CLS_LOSS_REGISTRY` adds its own node under
``MODEL.CLS_LOSS`` (``add_config``), so a new loss is one file.
"""

import os

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = ["add_eql_config", "get_eql_cfg", "RENAMED_KEYS"]


def add_eql_config(cfg):
    """Add every eql_d2 key, with its default, to a detectron2 config (in place).

    Registered losses add their nodes under ``MODEL.CLS_LOSS``; keys of earlier layouts
    raise an error naming their new key when a config file or an override sets them."""
    for add in _NODES:
        add(cfg)
    _register_renamed_keys(cfg)


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


def _add_cls_loss_config(cfg):
    """MODEL.CLS_LOSS: the classification loss of every head (two-stage and dense), with one
    node per registered loss (added by the loss itself)."""
    # registry imported here: the registered losses import this module's users
    from .modeling.cls_losses import add_cls_loss_configs

    cfg.MODEL.CLS_LOSS = CN()
    # CLS_LOSS_REGISTRY name (any case, "_" ignored): SoftmaxCE, SigmoidCE, EQL, EQLv2, Seesaw,
    # Federated, Focal, ClassBalanced, BAGS (two-stage); Focal, QFL, EFL, EQFL, SigmoidCE,
    # ClassBalanced (dense); "": the head's detectron2 default (SoftmaxCE in ROI heads, Focal
    # in dense heads)
    cfg.MODEL.CLS_LOSS.NAME = ""
    # log the rare / common / frequent means of the loss's statistics (and write regime
    # indicator snapshots) every LOG_PERIOD iterations (0: never)
    cfg.MODEL.CLS_LOSS.LOG_PERIOD = 20
    # keep per-category regime indicators of every head (positives / negatives seen and their
    # gradient sums; costs one extra backward through the loss alone per iteration)
    cfg.MODEL.CLS_LOSS.REGIME_INDICATORS = False
    add_cls_loss_configs(cfg.MODEL.CLS_LOSS)


_NODES.append(_add_cls_loss_config)


def _add_image_labels_config(cfg):
    """MODEL.IMAGE_LABELS: LVIS image-level labels in the two-stage heads' training."""
    cfg.MODEL.IMAGE_LABELS = CN()
    # losses that take the verified mask (EQL, EQLv2) keep weight 1 for an image's positive
    # and verified-negative (neg_category_ids) categories (EQL paper, sec. 4.2)
    cfg.MODEL.IMAGE_LABELS.VERIFIED = True
    # background proposals are not negatives for the image's not_exhaustive_category_ids
    cfg.MODEL.IMAGE_LABELS.IGNORE_NOT_EXHAUSTIVE = False


_NODES.append(_add_image_labels_config)


def _add_box_head_config(cfg):
    """MODEL.ROI_BOX_HEAD: keys eql_d2's box predictor adds to detectron2's node."""
    # initial probability of every category in sigmoid-type classifiers (sets the bias)
    cfg.MODEL.ROI_BOX_HEAD.PRIOR_PROB = 0.001


_NODES.append(_add_box_head_config)


def _dense_head_node():
    """The keys ATSS, FCOS and PAA share, with their defaults (the EFL paper's settings)."""
    node = CN()
    # number of foreground categories
    node.NUM_CLASSES = 80
    # FPN levels the head runs on (P3-P7 in the paper)
    node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # convs per head branch, each followed by NORM and ReLU
    node.NUM_CONVS = 4
    # head normalization (GroupNorm in the paper)
    node.NORM = "GN"
    # initial foreground probability of the classifier (0.001 for LVIS, as in the EFL paper)
    node.PRIOR_PROB = 0.001
    # keep only scores above this before NMS (0: keep all, as the EFL paper)
    node.SCORE_THRESH_TEST = 0.0
    # candidates kept per pyramid level before NMS
    node.TOPK_CANDIDATES_TEST = 1000
    # per-class NMS IoU threshold
    node.NMS_THRESH_TEST = 0.6
    return node


def _add_cascade_config(cfg):
    """MODEL.ROI_BOX_CASCADE_HEAD: EQLCascadeROIHeads' later-stage sampling and test scores."""
    # "mean_probs": mean of the stages' probabilities (detectron2); "mean_logits": the loss's
    # probabilities of the stages' mean logits (mmdetection); "stage1" / "stage2" / "stage3":
    # one stage alone
    cfg.MODEL.ROI_BOX_CASCADE_HEAD.TEST_SCORES = "mean_probs"
    # training: sample the proposals of stages 2 and 3 again as stage 1's (ground truth added,
    # ROI_HEADS.BATCH_SIZE_PER_IMAGE, at most ROI_HEADS.POSITIVE_FRACTION foreground), as
    # mmdetection's cascade does; False: detectron2's, every box of the previous stage
    cfg.MODEL.ROI_BOX_CASCADE_HEAD.SAMPLE_EVERY_STAGE = False


_NODES.append(_add_cascade_config)


def _add_atss_config(cfg):
    """MODEL.ATSS: the improved ATSS baseline of Li et al. (CVPR 2022, sec. 4.1, Tab. 5)."""
    cfg.MODEL.ATSS = _dense_head_node()
    # anchor side = scale x level stride; {6, 8} is the paper's "increased anchor scale"
    cfg.MODEL.ATSS.ANCHOR_SCALES = [6.0, 8.0]
    # anchor aspect ratios (h / w)
    cfg.MODEL.ATSS.ANCHOR_ASPECT_RATIOS = [1.0]
    # k: candidates per ground-truth box and pyramid level, nearest centres first (paper: 18)
    cfg.MODEL.ATSS.TOPK = 18
    # Box2BoxTransform weights (dx, dy, dw, dh)
    cfg.MODEL.ATSS.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    # weight of the GIoU box loss
    cfg.MODEL.ATSS.BBOX_REG_LOSS_WEIGHT = 2.0
    # how positives share it: "uniform" (sum / number of positives) or "iou" (each weighted
    # by its IoU target, sum / sum of the targets: the EFL authors' improved baseline)
    cfg.MODEL.ATSS.BBOX_REG_LOSS_WEIGHTING = "uniform"
    # weight of the IoU-branch BCE loss (positives only)
    cfg.MODEL.ATSS.IOU_LOSS_WEIGHT = 1.0


_NODES.append(_add_atss_config)


def _add_fcos_config(cfg):
    """MODEL.FCOS: detectron2's FCOS as EFLFCOS (detectron2 configures FCOS by LazyConfig only;
    its scale ranges assume strides 8-128, i.e. P3-P7)."""
    cfg.MODEL.FCOS = _dense_head_node()
    # a point is positive only within this many strides of the box centre (center sampling)
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5


_NODES.append(_add_fcos_config)


def _add_paa_config(cfg):
    """MODEL.PAA: PAA (Kim & Lee, ECCV 2020) as the PAA meta-architecture; the defaults of its
    own keys are the authors' (kkhoot/PAA, configs/paa/)."""
    cfg.MODEL.PAA = _dense_head_node()
    # anchor side = scale x level stride (PAA: one anchor of 8 x stride per location)
    cfg.MODEL.PAA.ANCHOR_SCALES = [8.0]
    # anchor aspect ratios (h / w)
    cfg.MODEL.PAA.ANCHOR_ASPECT_RATIOS = [1.0]
    # an anchor joins the candidate pool of the box it overlaps most from this IoU on (each
    # box's best-overlapping anchors join it whatever their IoU)
    cfg.MODEL.PAA.IOU_THRESHOLD = 0.1
    # K: candidates per box and pyramid level, the pool's anchors of lowest anchor score
    cfg.MODEL.PAA.TOPK = 9
    # Box2BoxTransform weights (dx, dy, dw, dh)
    cfg.MODEL.PAA.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    # weight of the GIoU box loss (each positive weighted by its IoU target, sum / sum of targets)
    cfg.MODEL.PAA.BBOX_REG_LOSS_WEIGHT = 1.3
    # weight of the IoU-branch BCE loss (positives only)
    cfg.MODEL.PAA.IOU_LOSS_WEIGHT = 0.5
    # test: each kept box becomes the score- and IoU-weighted mean of its class's boxes before NMS
    cfg.MODEL.PAA.SCORE_VOTING = True
    # sigma_t of score voting's IoU weight exp(-(1 - IoU)^2 / sigma_t)
    cfg.MODEL.PAA.SCORE_VOTING_SIGMA = 0.025


_NODES.append(_add_paa_config)


def _add_yolox_config(cfg):
    """MODEL.CSPDARKNET and MODEL.YOLOX: YOLOX (Ge et al., 2021) and the enhanced YOLOX of Li
    et al. (CVPR 2022, appendix A); defaults are YOLOX-S's as the YOLOX release trains it."""
    cfg.MODEL.CSPDARKNET = CN()
    # d: n = max(round(3 d), 1) bottlenecks per CSP layer of dark2 / dark5, 3n in dark3 / dark4
    # (S 0.33, M 0.67)
    cfg.MODEL.CSPDARKNET.DEPTH_MULTIPLIER = 0.33
    # w: 64 w stem channels, doubling per stage; P3-P5 have 256 w, 512 w, 1024 w (S 0.50, M 0.75)
    cfg.MODEL.CSPDARKNET.WIDTH_MULTIPLIER = 0.50
    # normalization after every conv of backbone and neck (BatchNorm, eps 1e-3, momentum 0.03)
    cfg.MODEL.CSPDARKNET.NORM = "BN"
    cfg.MODEL.YOLOX = CN()
    # number of foreground categories
    cfg.MODEL.YOLOX.NUM_CLASSES = 80
    # backbone outputs the head runs on (strides 8, 16, 32)
    cfg.MODEL.YOLOX.IN_FEATURES = ["p3", "p4", "p5"]
    # width of the head's stem and branches (YOLOX: 256 w; S 128, M 192)
    cfg.MODEL.YOLOX.HEAD_CHANNELS = 128
    # 3x3 conv-norm-SiLU blocks per branch (classification, regression)
    cfg.MODEL.YOLOX.NUM_CONVS = 2
    # normalization in the head
    cfg.MODEL.YOLOX.NORM = "BN"
    # initial probability of the class logits and of the objectness (YOLOX: 0.01)
    cfg.MODEL.YOLOX.PRIOR_PROB = 0.01
    # "SimOTA" (YOLOX) or "ATSS" (the enhanced YOLOX: the improved baseline's assignment)
    cfg.MODEL.YOLOX.ASSIGNER = "SimOTA"
    # "objectness" (YOLOX: classes learnt on positives only, score = class x objectness) or "iou"
    # (the improved baseline's IoU branch: classes learnt on every point, score
    # sqrt(class x IoU))
    cfg.MODEL.YOLOX.QUALITY = "objectness"
    # ATSS: square anchors of scale x stride per cell, one prediction each (ATSS: [8]; the
    # improved baseline's "increased anchor scale": [6, 8]); SimOTA: one entry, unused
    cfg.MODEL.YOLOX.ANCHOR_SCALES = [8.0]
    # ATSS: k candidates per object and level (ATSS 9; the improved baseline 18 with 2 scales)
    cfg.MODEL.YOLOX.ATSS_TOPK = 9
    # SimOTA: centre region of an object, in strides from its centre
    cfg.MODEL.YOLOX.SIMOTA_CENTER_RADIUS = 2.5
    # SimOTA: an object's dynamic k is the sum of its this-many largest IoUs
    cfg.MODEL.YOLOX.SIMOTA_CANDIDATE_TOPK = 10
    # SimOTA: weight of -log(IoU) in the cost
    cfg.MODEL.YOLOX.SIMOTA_IOU_WEIGHT = 3.0
    # weight of the IoU loss 1 - IoU^2 of the positives' boxes
    cfg.MODEL.YOLOX.BOX_LOSS_WEIGHT = 5.0
    # weight of the objectness / IoU-branch BCE
    cfg.MODEL.YOLOX.QUALITY_LOSS_WEIGHT = 1.0
    # L1 loss of the raw box deltas from the start (model.use_l1_loss; YOLOX turns it on for its
    # last no-augmentation epochs, the enhanced YOLOX trains with it throughout)
    cfg.MODEL.YOLOX.L1_LOSS = False
    # keep only scores above this before NMS (YOLOX: 0.01)
    cfg.MODEL.YOLOX.SCORE_THRESH_TEST = 0.01
    # candidates (point, class) kept per level before NMS
    cfg.MODEL.YOLOX.TOPK_CANDIDATES_TEST = 1000
    # per-class NMS IoU threshold (YOLOX: 0.65)
    cfg.MODEL.YOLOX.NMS_THRESH_TEST = 0.65


_NODES.append(_add_yolox_config)


def _add_dataloader_config(cfg):
    """DATALOADER: checks and fault tolerance of eql_d2's resumable training loader."""
    # check before training that every training image file exists (a stat per image)
    cfg.DATALOADER.CHECK_IMAGE_FILES = True
    # training images that may fail to load (replaced by another sample, with a warning)
    # per process before training stops with an error naming them
    cfg.DATALOADER.MAX_FAILED_IMAGES = 20
    # RepeatFactorTrainingSampler: how an image of repeat factor r is repeated per epoch.
    # "stochastic": floor(r) + Bernoulli(r - floor(r)) copies (detectron2; E[copies] = r);
    # "ceil": exactly ceil(r) copies (the EFL / EQLv2 authors' code: mmdetection's
    # ClassBalancedDataset, United-Perception's repeat-factor sampler)
    cfg.DATALOADER.REPEAT_ROUNDING = "stochastic"
    # LVIS-format training sets are converted once (local rank 0) into numpy arrays in
    # $EQL_D2_CACHE_DIR that every process maps, instead of each process holding the JSON's
    # dataset dicts (eql_d2.data.compact; docs/DATASETS.md); False: detectron2's lists
    cfg.DATALOADER.COMPACT_DATASET = True


_NODES.append(_add_dataloader_config)


def _add_solver_config(cfg):
    """SOLVER: schedules counted in epochs (eql_d2.solver.resolve_epoch_schedule), as the
    papers state them; the iterations follow from the training data when training starts."""
    # > 0: MAX_ITER = EPOCHS x iterations per epoch, where an epoch is one pass over the
    # sampler's list (with repeat factor sampling: the expanded list; "ceil" rounding makes it
    # exact) at SOLVER.IMS_PER_BATCH; 0: MAX_ITER / STEPS / WARMUP_ITERS are used as given
    cfg.SOLVER.EPOCHS = 0.0
    # epochs after which the learning rate decays (replace SOLVER.STEPS when EPOCHS > 0)
    cfg.SOLVER.EPOCH_STEPS = ()
    # warm-up of at least this many epochs (the longer of it and WARMUP_ITERS)
    cfg.SOLVER.WARMUP_EPOCHS = 0.0
    # whose epoch SOLVER.EPOCHS counts: "" the training sampler's; "RepeatFactorTrainingSampler"
    # repeat factor sampling's at DATALOADER.REPEAT_THRESHOLD / REPEAT_SQRT / REPEAT_ROUNDING, or
    # "TrainingSampler" the training images, whatever sampler trains (so that, say, a
    # class-aware sampling arm trains as many iterations as the repeat factor sampling arms)
    cfg.SOLVER.EPOCH_SAMPLER = ""
    # weight decay of the parameters whose full name matches a pattern (fnmatch), as a list of
    # [pattern, weight decay] pairs, over detectron2's groups; every pattern must match a
    # parameter (e.g. [["head.cls_preds.*.bias", 1e-4]]: the enhanced YOLOX of the EFL paper)
    cfg.SOLVER.PARAM_WEIGHT_DECAY = []


_NODES.append(_add_solver_config)


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
    # "fast": faster-coco-eval's C++ matching with lvis-api's rules; "lvis": lvis-api's
    # LVISEval (the reference). Same numbers; see docs/EVALUATION.md
    cfg.TEST.EVAL.BACKEND = "fast"


_NODES.append(_add_eval_config)


def _add_weights_config(cfg):
    """MODEL.WEIGHTS_PARTIAL: how strictly MODEL.WEIGHTS must fit the model
    (eql_d2.engine.checkpoint)."""
    # False: weights whose head parameters (and, for evaluation, any parameter) are missing,
    # unexpected or of another shape are an error naming the file and keys (a backbone-only
    # file such as ImageNet weights still initialises training). True: load what fits and
    # log the rest, as detectron2 does (fine-tuning from a model of another dataset)
    cfg.MODEL.WEIGHTS_PARTIAL = False


_NODES.append(_add_weights_config)


def _add_oid_eval_config(cfg):
    """TEST.OID_EVAL: Open Images Challenge evaluation (eql_d2.evaluation.OIDEvaluator)."""
    cfg.TEST.OID_EVAL = CN()
    # IoU of a true positive, and IoA (share of the detection inside) of a group-of match
    cfg.TEST.OID_EVAL.IOU_THRESHOLD = 0.5
    # positives a group-of box counts (the challenge: 1; 0 ignores group-of boxes)
    cfg.TEST.OID_EVAL.GROUP_OF_WEIGHT = 1.0
    # also count each detection for its class's ancestors (not the official rule, which
    # expands the ground truth only)
    cfg.TEST.OID_EVAL.EXPAND_DETECTIONS = False
    # AP1 .. AP<n>: mAP of n groups of equal size, classes sorted by their train count
    cfg.TEST.OID_EVAL.NUM_GROUPS = 5
    # the count: "images" (EQL, Tab. 6) or "instances" (boxes; EFL, Tab. 7)
    cfg.TEST.OID_EVAL.GROUP_BY = "images"
    # True: AP1 is the rarest group (EFL); False: AP<n> is (EQL's Tab. 6)
    cfg.TEST.OID_EVAL.RAREST_FIRST = True


_NODES.append(_add_oid_eval_config)


def _add_classification_config(cfg):
    """Image classification (meta-architecture ImageClassifier, eql_d2.data.classification):
    the classifier, the CIFAR ResNet and the augmentation of EQL's sec. 6 benchmarks."""
    cfg.MODEL.CLASSIFIER = CN()
    # number of classes C of the linear classifier
    cfg.MODEL.CLASSIFIER.NUM_CLASSES = 100
    # backbone output that is average-pooled into the classifier's features
    cfg.MODEL.CLASSIFIER.IN_FEATURE = "stage3"
    cfg.MODEL.CIFAR_RESNET = CN()
    # 6n + 2 (He et al. 2016, sec. 4.2): 32 is ResNet-32, three stages of 5 basic blocks
    cfg.MODEL.CIFAR_RESNET.DEPTH = 32
    # normalization after every convolution
    cfg.MODEL.CIFAR_RESNET.NORM = "BN"
    # stages returned: "stage1" (16 channels), "stage2" (32), "stage3" (64)
    cfg.MODEL.CIFAR_RESNET.OUT_FEATURES = ["stage3"]
    cfg.INPUT.CLASSIFICATION = CN()
    # training transforms in order: "pad_crop" (random CROP_SIZE crop of the image padded by
    # PADDING), "random_resized_crop" (to CROP_SIZE), "flip", "color_jitter", "autoaugment"
    # (torchvision's AUTOAUGMENT_POLICY), "cutout" (a CUTOUT_SIZE square of the mean colour)
    cfg.INPUT.CLASSIFICATION.TRAIN_AUGMENTATIONS = ["pad_crop", "flip", "autoaugment", "cutout"]
    # side of the training crop in pixels
    cfg.INPUT.CLASSIFICATION.CROP_SIZE = 32
    # zero padding on each side before "pad_crop"
    cfg.INPUT.CLASSIFICATION.PADDING = 4
    # torchvision AutoAugmentPolicy of "autoaugment": "cifar10", "imagenet" or "svhn"
    cfg.INPUT.CLASSIFICATION.AUTOAUGMENT_POLICY = "cifar10"
    # side of the Cutout square (DeVries & Taylor 2017); its centre may lie anywhere
    cfg.INPUT.CLASSIFICATION.CUTOUT_SIZE = 16
    # brightness, contrast, saturation, hue of "color_jitter"
    cfg.INPUT.CLASSIFICATION.COLOR_JITTER = [0.4, 0.4, 0.4, 0.0]
    # test images: shorter side resized to TEST_RESIZE, then a centre TEST_CROP crop (0: as is)
    cfg.INPUT.CLASSIFICATION.TEST_RESIZE = 0
    cfg.INPUT.CLASSIFICATION.TEST_CROP = 0
    # images per inference batch and process
    cfg.TEST.IMS_PER_BATCH = 64


_NODES.append(_add_classification_config)


# Keys of the earlier layout -> where their value lives now. Setting one (in a YAML file or
# an override) raises a KeyError that names the new key.
RENAMED_KEYS = {
    "MODEL.EQL.LOSS": "MODEL.CLS_LOSS.NAME",
    "MODEL.EQL.LAMBDA": "MODEL.CLS_LOSS.EQL.LAMBDA",
    "MODEL.EQL.EXCLUDING_FUNCTION": "MODEL.CLS_LOSS.EQL.EXCLUDING_FUNCTION",
    "MODEL.EQL.EQLV2.GAMMA": "MODEL.CLS_LOSS.EQLV2.GAMMA",
    "MODEL.EQL.EQLV2.MU": "MODEL.CLS_LOSS.EQLV2.MU",
    "MODEL.EQL.EQLV2.ALPHA": "MODEL.CLS_LOSS.EQLV2.ALPHA",
    "MODEL.EQL.PRIOR_PROB": "MODEL.ROI_BOX_HEAD.PRIOR_PROB",
    "MODEL.EQL.USE_IMAGE_LEVEL_LABELS": "MODEL.IMAGE_LABELS.VERIFIED",
    "MODEL.EQL.IGNORE_NOT_EXHAUSTIVE": "MODEL.IMAGE_LABELS.IGNORE_NOT_EXHAUSTIVE",
    "MODEL.EQL.PERIOD": "MODEL.CLS_LOSS.LOG_PERIOD",
    "MODEL.EFL.LOSS": "MODEL.CLS_LOSS.NAME",
    "MODEL.EFL.GAMMA_B": ("MODEL.CLS_LOSS.EFL.GAMMA_B / MODEL.CLS_LOSS.EQFL.GAMMA_B "
                          "(focal: MODEL.CLS_LOSS.FOCAL.GAMMA, qfl: MODEL.CLS_LOSS.QFL.BETA)"),
    "MODEL.EFL.SCALE": "MODEL.CLS_LOSS.EFL.SCALE / MODEL.CLS_LOSS.EQFL.SCALE",
    "MODEL.EFL.ALPHA": "MODEL.CLS_LOSS.EFL.ALPHA (focal: MODEL.CLS_LOSS.FOCAL.ALPHA)",
    "MODEL.EFL.FOCUSING_FACTOR": ("MODEL.CLS_LOSS.EFL.FOCUSING_FACTOR / "
                                  "MODEL.CLS_LOSS.EQFL.FOCUSING_FACTOR"),
    "MODEL.EFL.WEIGHTING_FACTOR": ("MODEL.CLS_LOSS.EFL.WEIGHTING_FACTOR / "
                                   "MODEL.CLS_LOSS.EQFL.WEIGHTING_FACTOR"),
    "MODEL.EFL.PERIOD": "MODEL.CLS_LOSS.LOG_PERIOD",
    "MODEL.REGIME_INDICATORS.ENABLED": "MODEL.CLS_LOSS.REGIME_INDICATORS",
    "MODEL.REGIME_INDICATORS.PERIOD": "MODEL.CLS_LOSS.LOG_PERIOD",
    "MODEL.SEESAW.P": "MODEL.CLS_LOSS.SEESAW.P",
    "MODEL.SEESAW.Q": "MODEL.CLS_LOSS.SEESAW.Q",
    "MODEL.SEESAW.EPS": "MODEL.CLS_LOSS.SEESAW.EPS",
    "MODEL.SEESAW.TAU": "MODEL.CLS_LOSS.SEESAW.TAU",
    "MODEL.FEDERATED.NUM_CLASSES_SAMPLED": "MODEL.CLS_LOSS.FEDERATED.NUM_CLASSES_SAMPLED",
    "MODEL.FEDERATED.FREQ_WEIGHT_POWER": "MODEL.CLS_LOSS.FEDERATED.FREQ_WEIGHT_POWER",
}


def _register_renamed_keys(cfg):
    """Make yacs reject the earlier keys with their new names: each key for overrides
    (``merge_from_list``) and each removed node for YAML files, which yacs checks node by
    node."""
    nodes = {}
    for old, new in RENAMED_KEYS.items():
        cfg.register_renamed_key(old, new)
        parts = old.split(".")
        for depth in range(2, len(parts)):
            node = ".".join(parts[:depth])
            nodes.setdefault(node, []).append(f"{old} -> {new}")
    for node, moves in nodes.items():
        if node in RENAMED_KEYS or _has_key(cfg, node):
            continue
        cfg.register_renamed_key(node, "MODEL.CLS_LOSS / MODEL.IMAGE_LABELS",
                                 message=" Its keys moved: " + "; ".join(moves))


def _has_key(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, CN) or part not in node:
            return False
        node = node[part]
    return True


def _add_decoupled_config(cfg):
    """MODEL.DECOUPLED: the second stage of decoupled training (meta-architecture
    DecoupledRCNN: cRT, LWS, BAGS), started from a first-stage checkpoint in MODEL.WEIGHTS."""
    cfg.MODEL.DECOUPLED = CN()
    # dotted names of the modules or parameters that train; every other parameter is frozen
    cfg.MODEL.DECOUPLED.TRAINABLE = ("roi_heads.box_predictor.cls_score",)
    # modules that keep their initialisation when MODEL.WEIGHTS is a first-stage checkpoint
    # (cRT: the classifier is re-initialised)
    cfg.MODEL.DECOUPLED.REINITIALIZE = ()
    # LWS: the ROI heads' cls_score layers get a learnable per-class weight scale (init 1),
    # roi_heads.box_predictor.cls_score.weight_scale
    cfg.MODEL.DECOUPLED.WEIGHT_SCALING = False


_NODES.append(_add_decoupled_config)


def _add_yolox_recipe_config(cfg):
    """INPUT.MOSAIC, INPUT.HSV, MODEL_EMA: YOLOX's training recipe for any detector
    (eql_d2.data.mosaic, eql_d2.engine.ema; docs/GETTING_STARTED.md, "YOLOX training
    recipe"). SOLVER.LR_SCHEDULER_NAME "YOLOXWarmCosineLR" is its schedule
    (eql_d2.solver.schedules)."""
    cfg.INPUT.MOSAIC = CN()
    # Mosaic of four training images, random affine and MixUp (a multi-image mapper)
    cfg.INPUT.MOSAIC.ENABLED = False
    # probability of a mosaic per sample (otherwise the image alone)
    cfg.INPUT.MOSAIC.PROB = 1.0
    # (height, width) of a mosaic after the affine map; its canvas is twice as large
    cfg.INPUT.MOSAIC.SIZE = (640, 640)
    # random affine of the mosaic: scale range, rotation (+/- degrees), shear (+/- degrees),
    # translation (+/- fraction of SIZE)
    cfg.INPUT.MOSAIC.SCALE = (0.1, 2.0)
    cfg.INPUT.MOSAIC.DEGREES = 10.0
    cfg.INPUT.MOSAIC.SHEAR = 2.0
    cfg.INPUT.MOSAIC.TRANSLATE = 0.1
    # pixel value of the canvas outside the images
    cfg.INPUT.MOSAIC.FILL = 114
    # the last epochs train on plain images (no Mosaic / MixUp) and switch on the model's
    # L1 box loss (model.use_l1_loss); YOLOXWarmCosineLR keeps its final rate for them
    cfg.INPUT.MOSAIC.NO_AUG_EPOCHS = 15.0
    cfg.INPUT.MOSAIC.MIXUP = CN()
    # blend a mosaic half and half with one more image (its boxes added)
    cfg.INPUT.MOSAIC.MIXUP.ENABLED = True
    # probability of MixUp per mosaic
    cfg.INPUT.MOSAIC.MIXUP.PROB = 1.0
    # range of the scale factor of the mixed image
    cfg.INPUT.MOSAIC.MIXUP.SCALE = (0.5, 1.5)
    cfg.INPUT.HSV = CN()
    # multiply hue, saturation and value of every training image by 1 + U(-gain, gain)
    cfg.INPUT.HSV.ENABLED = False
    # probability per image
    cfg.INPUT.HSV.PROB = 1.0
    # gains of hue, saturation, value
    cfg.INPUT.HSV.GAINS = (0.015, 0.7, 0.4)
    cfg.MODEL_EMA = CN()
    # keep an exponential moving average of the weights (parameters and buffers), saved in
    # checkpoints under "model_ema" and used for every evaluation, --eval-only included
    cfg.MODEL_EMA.ENABLED = False
    # decay at update u: DECAY x (1 - exp(-u / RAMP_UPDATES)) (YOLOX: 0.9998, 2000)
    cfg.MODEL_EMA.DECAY = 0.9998
    # updates over which the decay ramps up from 0 (0: DECAY from the first update)
    cfg.MODEL_EMA.RAMP_UPDATES = 2000.0


_NODES.append(_add_yolox_recipe_config)
