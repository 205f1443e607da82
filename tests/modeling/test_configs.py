"""Every shipped config: inherits a Base file, is listed in docs/MODEL_ZOO.md, merges into eql_d2's
config, builds its model, and carries the settings its name and the papers promise."""

import glob
import os

import pytest
import yaml
from torch import nn
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

import eql_d2.modeling  # noqa: F401  (registers eql_d2's models)
from helpers import ROOT
from eql_d2.config import get_eql_cfg
from eql_d2.data.synthetic import PRESETS, rfs_threshold
from eql_d2.modeling.cls_losses import CLS_LOSS_REGISTRY, resolve_loss_name
from eql_d2.modeling.roi_heads import EQLFastRCNNOutputLayers

CONFIG_DIR = os.path.join(ROOT, "configs")
CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR)
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)
BASES = sorted(
    os.path.relpath(p, CONFIG_DIR)
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "Base-*.yaml"), recursive=True)
)

# the loss names config file names use, for each kind of head, and their registry names
EQL_HEAD_LOSSES = {"softmax": "SoftmaxCE", "sigmoid": "SigmoidCE", "eql": "EQL", "eqlv2": "EQLv2",
                   "seesaw": "Seesaw", "federated": "Federated", "cb": "ClassBalanced",
                   "focal": "Focal", "bags": "BAGS"}
# second stages of decoupled training (configs/*/Decoupled/): name token -> what it sets
CLASSIFIER = "roi_heads.box_predictor.cls_score"
DECOUPLED = {"crt": dict(TRAINABLE=(CLASSIFIER,), REINITIALIZE=(CLASSIFIER,), WEIGHT_SCALING=False),
             "lws": dict(TRAINABLE=(CLASSIFIER + ".weight_scale",), REINITIALIZE=(),
                         WEIGHT_SCALING=True),
             "bags": dict(TRAINABLE=(CLASSIFIER,), REINITIALIZE=(CLASSIFIER,), WEIGHT_SCALING=False)}
CLASS_SAMPLERS = ("ClassAwareSampler", "ClassBalancedSampler")
DENSE_LOSSES = {"focal": "Focal", "efl": "EFL", "qfl": "QFL", "eqfl": "EQFL",
                "sigmoid": "SigmoidCE"}
# the losses of image-classification configs (configs/Classification)
CLASSIFICATION_LOSSES = {"softmax": "SoftmaxCE", "seql": "SEQL", "focal": "Focal"}
# the one-stage meta-architectures and the config node of their head
ONE_STAGE_HEADS = {"ATSS": "ATSS", "EFLRetinaNet": "RETINANET", "EFLFCOS": "FCOS", "PAA": "PAA",
                   "YOLOX": "YOLOX"}


def load(rel):
    cfg = get_eql_cfg(os.path.join(CONFIG_DIR, rel))
    return cfg


def loss_in_name(rel, names):
    stem = os.path.splitext(os.path.basename(rel))[0].split("_")
    found = [n for n in names if n in stem]
    assert len(found) == 1, f"{rel}: expected one of {names} in the file name"
    return found[0]


def fake_train_set(num_classes):
    """A registered training set with the metadata the models read, for num_classes."""
    name = f"cfgtest_train_{num_classes}"
    meta = MetadataCatalog.get(name)
    if meta.get("class_image_count") is None:
        counts = [1 + (j * 37) % 500 for j in range(num_classes)]
        meta.set(thing_classes=[f"c{j}" for j in range(num_classes)],
                 class_image_count=[{"id": j + 1, "image_count": n}
                                    for j, n in enumerate(counts)],
                 num_train_images=1000,
                 class_frequency=["r" if n <= 10 else "c" if n <= 100 else "f" for n in counts])
    return name


def test_every_config_is_found():
    assert len(CONFIGS) >= 30 and len(BASES) >= 5


@pytest.mark.parametrize("rel", CONFIGS + BASES)
def test_inherits_a_base_and_is_listed_in_the_readme(rel):
    with open(os.path.join(CONFIG_DIR, rel)) as f:
        raw = yaml.safe_load(f)
    base = raw.get("_BASE_")
    if os.path.basename(rel).startswith("Base-") and base is None:
        return  # a root Base file
    assert base, f"configs/{rel} has no _BASE_"
    assert os.path.isfile(os.path.join(CONFIG_DIR, os.path.dirname(rel), base)), (
        f"configs/{rel}: _BASE_ {base} not found")
    if not os.path.basename(rel).startswith("Base-"):
        with open(os.path.join(ROOT, "docs", "MODEL_ZOO.md")) as f:
            assert f"`{rel}`" in f.read(), f"docs/MODEL_ZOO.md's config table does not list {rel}"


def check_classification_recipe(rel, cfg):
    """EQL sec. 6's recipes (CIFAR-100-LT: ResNet-32, Nesterov SGD, 12.8k iterations;
    ImageNet-LT: ResNet-10, 12k iterations) and SEQL's gamma / lambda (Tab. 7-10)."""
    name = os.path.basename(rel)
    loss = CLASSIFICATION_LOSSES[loss_in_name(rel, list(CLASSIFICATION_LOSSES))]
    assert cfg.MODEL.CLS_LOSS.NAME == loss
    s = cfg.SOLVER
    if "cifar100_lt" in name or "synthetic_cls_lt" in name:
        assert cfg.MODEL.BACKBONE.NAME == "build_cifar_resnet_backbone"
        assert cfg.MODEL.CIFAR_RESNET.DEPTH == 32 and cfg.MODEL.CLASSIFIER.NUM_CLASSES == 100
        assert (s.MOMENTUM, s.NESTEROV, s.WEIGHT_DECAY) == (0.9, True, 1e-4)
        assert list(cfg.INPUT.CLASSIFICATION.TRAIN_AUGMENTATIONS) == [
            "pad_crop", "flip", "autoaugment", "cutout"]
        if loss == "SEQL":
            seql = cfg.MODEL.CLS_LOSS.SEQL
            assert (seql.GAMMA, seql.LAMBDA) == (0.95, 3.0e-3)
    if "cifar100_lt" in name:
        assert cfg.DATASETS.TRAIN == ("cifar100_lt_train",)
        assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS)) == (
            256, 0.2, 12800, (6400, 9600))
        assert (s.WARMUP_ITERS, s.BASE_LR * s.WARMUP_FACTOR) == (400, 0.1)
    elif "imagenet_lt" in name:
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet10_backbone"
        assert cfg.MODEL.RESNETS.DEPTH == 10 and cfg.MODEL.CLASSIFIER.NUM_CLASSES == 1000
        assert (s.IMS_PER_BATCH, s.BASE_LR, s.MAX_ITER, tuple(s.STEPS)) == (
            1024, 0.4, 12000, (3400, 6800, 10200))
        assert (s.WARMUP_ITERS, s.BASE_LR * s.WARMUP_FACTOR) == (500, 0.1)
        assert list(cfg.INPUT.CLASSIFICATION.TRAIN_AUGMENTATIONS) == [
            "random_resized_crop", "color_jitter", "flip"]
        if loss == "SEQL":
            seql = cfg.MODEL.CLS_LOSS.SEQL
            assert (seql.GAMMA, seql.LAMBDA) == (0.9, 4.3e-4)
    else:
        assert "synthetic_cls_lt" in name, f"{rel}: name the dataset"
        assert cfg.DATASETS.TRAIN == ("synthetic_cls_lt_train",) and cfg.MODEL.DEVICE == "cpu"


# YOLOX sizes (YOLOX's exps/default): depth, width, head channels (256 x width)
YOLOX_SIZES = {"s": (0.33, 0.50, 128), "m": (0.67, 0.75, 192)}


def check_yolox(rel, cfg):
    """EFL Tab. 8 / appendix A: sigmoid rows are YOLOX as released (SimOTA, objectness, L1
    loss off until the last epochs); the others are the enhanced YOLOX (ATSS k = 18 on anchors
    of {6, 8} x stride, IoU branch, IoU + L1 loss), EFL / EQFL with the last classification
    bias decayed by 1e-4. LVIS configs: S / M as named, from scratch, 300 epochs."""
    y = cfg.MODEL.YOLOX
    assert cfg.MODEL.BACKBONE.NAME == "build_yolox_cspdarknet_pafpn_backbone"
    assert list(y.IN_FEATURES) == ["p3", "p4", "p5"] and y.NUM_CONVS == 2
    loss = DENSE_LOSSES[loss_in_name(rel, list(DENSE_LOSSES))]
    if loss == "SigmoidCE":
        assert (y.ASSIGNER, y.QUALITY, y.L1_LOSS) == ("SimOTA", "objectness", False)
        assert y.SIMOTA_CENTER_RADIUS == 2.5 and y.SIMOTA_CANDIDATE_TOPK == 10
    else:
        assert (y.ASSIGNER, y.QUALITY, y.L1_LOSS) == ("ATSS", "iou", True)
        assert list(y.ANCHOR_SCALES) == [6.0, 8.0] and y.ATSS_TOPK == 18
    bias_decay = [["head.cls_preds.*.bias", 0.0001]] if loss in ("EFL", "EQFL") else []
    assert cfg.SOLVER.PARAM_WEIGHT_DECAY == bias_decay
    assert (y.BOX_LOSS_WEIGHT, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_BIAS) == (
        5.0, 5e-4, 0.0)
    if rel.startswith("LVIS-"):
        size = os.path.basename(rel).split("_")[1]
        d = cfg.MODEL.CSPDARKNET
        assert (d.DEPTH_MULTIPLIER, d.WIDTH_MULTIPLIER, y.HEAD_CHANNELS) == YOLOX_SIZES[size]
        assert cfg.MODEL.WEIGHTS == "" and cfg.SOLVER.EPOCHS == 300.0 and "_300e_" in rel


@pytest.mark.parametrize("rel", CONFIGS)
def test_settings_promised_by_the_name_and_the_papers(rel):
    cfg = load(rel)
    name = os.path.basename(rel)
    if cfg.MODEL.META_ARCHITECTURE == "ImageClassifier":
        check_classification_recipe(rel, cfg)
        return
    lvis = rel.startswith("LVIS-")
    one_stage = cfg.MODEL.META_ARCHITECTURE in ONE_STAGE_HEADS
    if lvis:  # each setting of the authors' recipes: tests/modeling/test_parity.py
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
        assert cfg.DATASETS.TRAIN[0].startswith("lvis_v1" if "v1" in rel else "lvis_v0.5")
    rfs = cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    if rfs:  # LVIS's t = 0.001 is 100 of ~100k train images; the generated sets keep that boundary
        expected = (0.001 if lvis else
                    rfs_threshold(PRESETS["synthetic_lvis"]) if rel.startswith("Synthetic-LVIS/")
                    else rfs_threshold(PRESETS["synthetic_hard_tail"])
                    if rel.startswith("Synthetic-HardTail/") else 0.046)
        assert cfg.DATALOADER.REPEAT_THRESHOLD == expected
    if "_rfs" in name:
        assert rfs
    elif lvis:
        assert not rfs, f"{rel}: repeat factor sampling without _rfs in the name"
    if cfg.MODEL.META_ARCHITECTURE == "ATSS":
        assert list(cfg.MODEL.ATSS.ANCHOR_SCALES) == [6.0, 8.0]
        assert list(cfg.MODEL.ATSS.IN_FEATURES) == ["p3", "p4", "p5", "p6", "p7"]
        assert cfg.MODEL.ATSS.NORM == "GN"
        if lvis:
            assert cfg.MODEL.ATSS.TOPK == 18
    if cfg.MODEL.META_ARCHITECTURE == "EFLFCOS":  # the paper's FCOS: with center sampling
        assert list(cfg.MODEL.FCOS.IN_FEATURES) == ["p3", "p4", "p5", "p6", "p7"]
        assert cfg.MODEL.FCOS.NORM == "GN" and cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS == 1.5
    if cfg.MODEL.META_ARCHITECTURE == "PAA":  # PAA's anchors, k and head; voting at test time
        paa = cfg.MODEL.PAA
        assert list(paa.ANCHOR_SCALES) == [8.0] and list(paa.ANCHOR_ASPECT_RATIOS) == [1.0]
        assert list(paa.IN_FEATURES) == ["p3", "p4", "p5", "p6", "p7"] and paa.NORM == "GN"
        assert paa.TOPK == 9 and paa.IOU_THRESHOLD == 0.1 and paa.SCORE_VOTING
    yolox = cfg.MODEL.META_ARCHITECTURE == "YOLOX"
    if yolox:  # EFL Tab. 8: YOLOX as released for sigmoid, the enhanced YOLOX for the rest
        check_yolox(rel, cfg)
    if one_stage:
        loss = DENSE_LOSSES[loss_in_name(rel, list(DENSE_LOSSES))]
        assert cfg.MODEL.CLS_LOSS.NAME == loss
        if loss in ("EFL", "EQFL"):
            node = cfg.MODEL.CLS_LOSS[loss.upper()]
            assert (node.GAMMA_B, node.SCALE) == (2.0, 4.0 if yolox else 8.0)
    elif cfg.MODEL.ROI_HEADS.NAME in ("EQLROIHeads", "EQLCascadeROIHeads"):
        stem = os.path.splitext(name)[0].split("_")
        decoupled = "Decoupled" in rel.split(os.sep)
        assert cfg.MODEL.META_ARCHITECTURE == ("DecoupledRCNN" if decoupled else "GeneralizedRCNN")
        if decoupled:  # a second stage: what its name says trains, from a shipped first stage
            method = loss_in_name(rel, list(DECOUPLED))
            for key, value in DECOUPLED[method].items():
                assert cfg.MODEL.DECOUPLED[key] == value, f"{rel}: MODEL.DECOUPLED.{key}"
            if method in ("crt", "lws"):
                assert cfg.DATALOADER.SAMPLER_TRAIN in CLASS_SAMPLERS
            first = [r for r in CONFIGS if "Decoupled" not in r.split(os.sep) and r.split(os.sep)[0]
                     == rel.split(os.sep)[0] and os.path.join(load(r).OUTPUT_DIR, "model_final.pth")
                     == cfg.MODEL.WEIGHTS]
            assert len(first) == 1, f"{rel}: MODEL.WEIGHTS is no shipped first stage's output"
        if "cas" in stem:
            assert cfg.DATALOADER.SAMPLER_TRAIN == "ClassAwareSampler"
        assert cfg.MODEL.CLS_LOSS.NAME == EQL_HEAD_LOSSES[loss_in_name(rel, list(EQL_HEAD_LOSSES))]
        assert cfg.MODEL.MASK_ON == name.startswith(("mask_rcnn", "cascade_mask_rcnn"))
        cascade = cfg.MODEL.ROI_HEADS.NAME == "EQLCascadeROIHeads"
        assert cascade == name.startswith("cascade")
        if cascade:  # detectron2's three stages
            assert list(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS) == [0.5, 0.6, 0.7]
        if cfg.MODEL.CLS_LOSS.NAME == "EQLv2":
            e = cfg.MODEL.CLS_LOSS.EQLV2
            assert (e.GAMMA, e.MU, e.ALPHA) == (12.0, 0.8, 4.0)
    else:  # detectron2's own StandardROIHeads baselines
        assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"
        assert "_d2heads_" in name, f"{rel}: detectron2-heads configs say so in their name"
        sigmoid = loss_in_name(rel, ["softmax", "sigmoid"]) == "sigmoid"
        assert cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE == sigmoid


def build_detector(cfg):
    """The config's detector on CPU, and its number of categories. The real training sets
    need their JSON on disk; a stand-in with the same number of categories gives the models
    the metadata (frequencies, groups) they read at build time."""
    arch = cfg.MODEL.META_ARCHITECTURE
    num_classes = (cfg.MODEL[ONE_STAGE_HEADS[arch]].NUM_CLASSES if arch in ONE_STAGE_HEADS
                   else cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    cfg.DATASETS.TRAIN = (fake_train_set(num_classes),)
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg), num_classes


@pytest.mark.parametrize("rel", CONFIGS)
def test_builds_its_model(rel, one_thread):
    cfg = load(rel)
    if cfg.MODEL.META_ARCHITECTURE == "ImageClassifier":
        cfg.DATASETS.TRAIN = (fake_train_set(cfg.MODEL.CLASSIFIER.NUM_CLASSES),)
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        assert model.fc.out_features == cfg.MODEL.CLASSIFIER.NUM_CLASSES
        assert type(model.criterion) is CLS_LOSS_REGISTRY.get(
            resolve_loss_name(cfg.MODEL.CLS_LOSS.NAME))
        return
    one_stage = cfg.MODEL.META_ARCHITECTURE in ONE_STAGE_HEADS
    model, num_classes = build_detector(cfg)
    if one_stage:
        criterion = model.cls_loss.criterion
        assert type(criterion) is CLS_LOSS_REGISTRY.get(resolve_loss_name(cfg.MODEL.CLS_LOSS.NAME))
    else:
        predictors = model.roi_heads.box_predictor
        for predictor in (predictors if isinstance(predictors, nn.ModuleList) else [predictors]):
            assert predictor.num_classes == num_classes
            if isinstance(predictor, EQLFastRCNNOutputLayers):
                assert type(predictor.cls_loss) is CLS_LOSS_REGISTRY.get(
                    resolve_loss_name(cfg.MODEL.CLS_LOSS.NAME))


def test_no_two_configs_of_a_dataset_share_a_file_name():
    """A file name names one model: the same name in two folders of one dataset's configs
    (e.g. LVIS-v1/ and LVIS-v1/EQL/) would build different models under one name."""
    seen = {}
    for rel in CONFIGS:
        key = (rel.split(os.sep)[0], os.path.basename(rel))
        assert key not in seen, f"configs/{rel} and configs/{seen[key]} share a file name"
        seen[key] = rel


@pytest.mark.parametrize("old,new", [("MODEL.EQL.LOSS", "MODEL.CLS_LOSS.NAME"),
                                     ("MODEL.EFL.GAMMA_B", "MODEL.CLS_LOSS.EFL.GAMMA_B"),
                                     ("MODEL.REGIME_INDICATORS.ENABLED",
                                      "MODEL.CLS_LOSS.REGIME_INDICATORS")])
def test_keys_of_the_earlier_layout_name_their_new_key(old, new, tmp_path):
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        get_eql_cfg(opts=[old, "1"])
    # a YAML file: yacs meets the removed node first; the message lists where its keys went
    parts = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"MODEL:\n  {parts[1]}:\n    {parts[2]}: 1\n")
    with pytest.raises(KeyError, match=f"{old} -> {new}"):
        get_eql_cfg(str(path))


def test_a_new_loss_node_may_not_replace_another():
    from eql_d2.modeling.cls_losses import ClassificationLoss, add_cls_loss_configs
    from detectron2.config import CfgNode

    # sorted first among the registered losses, so that it is the first to add its node
    class AClash(ClassificationLoss):
        @classmethod
        def add_config(cls, node):
            node.EQL = CfgNode()

    node = get_eql_cfg().MODEL.CLS_LOSS
    CLS_LOSS_REGISTRY.register(AClash)
    try:
        with pytest.raises(ValueError, match="AClash.add_config replaced MODEL.CLS_LOSS.EQL"):
            add_cls_loss_configs(node)
    finally:
        CLS_LOSS_REGISTRY._obj_map.pop("AClash")


OID_CONFIGS = [r for r in CONFIGS if r.startswith(("OpenImages/", "Synthetic-OID/"))]


@pytest.mark.parametrize("rel", OID_CONFIGS)
def test_open_images_settings(rel):
    """Open Images configs: 500 classes (Synthetic-OID 50), datasets evaluated by the
    challenge's rules, the random sampler and 120k / 160k / 180k schedule of the EFL paper's
    sec. 4.5, and AP1..AP5 grouped as the paper of each detector family does."""
    from eql_d2.data import register_all

    cfg = load(rel)
    synthetic = rel.startswith("Synthetic-OID/")
    one_stage = cfg.MODEL.META_ARCHITECTURE in ONE_STAGE_HEADS
    num_classes = cfg.MODEL.ATSS.NUM_CLASSES if one_stage else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    assert num_classes == (50 if synthetic else 500)
    register_all()
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        assert name.startswith("synthetic_oid_" if synthetic else "oid_challenge_2019_")
        assert MetadataCatalog.get(name).evaluator_type == "oid"
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    if not synthetic:
        s = cfg.SOLVER
        assert (s.MAX_ITER, tuple(s.STEPS), s.IMS_PER_BATCH, s.BASE_LR, s.EPOCHS) == (
            180000, (120000, 160000), 16, 0.02, 0.0)
    # EQL's Tab. 6: image counts, AP5 the rarest; EFL's Tab. 7: instance counts, AP1 the rarest
    ev = cfg.TEST.OID_EVAL
    assert (ev.GROUP_BY, ev.RAREST_FIRST) == (("instances", True) if one_stage else ("images", False))
    if not one_stage:
        assert cfg.MODEL.ROI_HEADS.NAME == "EQLROIHeads" and cfg.MODEL.IMAGE_LABELS.VERIFIED
        # lambda of the paper's TR 3 % (OID19), and of TR 2.99 % on Synthetic-OID's train set
        assert cfg.MODEL.CLS_LOSS.EQL.LAMBDA == (0.012 if synthetic else 3e-4)


# YOLOX's training recipe (yolox/exp/yolox_base.py): Mosaic / affine / MixUp, HSV, EMA, its
# schedule; the LVIS YOLOX configs train with it
YOLOX_MOSAIC = dict(ENABLED=True, PROB=1.0, SIZE=(640, 640), SCALE=(0.1, 2.0), DEGREES=10.0,
                    SHEAR=2.0, TRANSLATE=0.1, FILL=114, NO_AUG_EPOCHS=15.0)


@pytest.mark.parametrize("rel", [r for r in CONFIGS if r.startswith("LVIS-")
                                 and os.path.basename(r).startswith("yolox_")])
def test_lvis_yolox_configs_train_with_yoloxs_recipe(rel):
    from eql_d2.data.mosaic import MosaicMixUpMapper, RandomHSV
    from eql_d2.engine import Trainer

    cfg = load(rel)
    mosaic = cfg.INPUT.MOSAIC
    assert {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in mosaic.items() if k != "MIXUP"} == YOLOX_MOSAIC
    assert (mosaic.MIXUP.ENABLED, mosaic.MIXUP.PROB, tuple(mosaic.MIXUP.SCALE)) == (
        True, 1.0, (0.5, 1.5))
    assert (cfg.INPUT.HSV.ENABLED, cfg.INPUT.HSV.PROB, tuple(cfg.INPUT.HSV.GAINS)) == (
        True, 1.0, (0.015, 0.7, 0.4))
    assert (cfg.MODEL_EMA.ENABLED, cfg.MODEL_EMA.DECAY, cfg.MODEL_EMA.RAMP_UPDATES) == (
        True, 0.9998, 2000.0)
    solver = cfg.SOLVER
    assert solver.LR_SCHEDULER_NAME == "YOLOXWarmCosineLR"
    assert (solver.WARMUP_EPOCHS, solver.WARMUP_FACTOR) == (5.0, 0.0)
    assert solver.BASE_LR_END == pytest.approx(0.05 * solver.BASE_LR)
    # multi-scale: 640 +/- 5 x 32 in steps of 32 (YOLOX's multiscale_range = 5)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert (cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING, cfg.INPUT.MAX_SIZE_TRAIN) == ("choice", 800)
    mapper = Trainer.build_train_mapper(cfg)
    assert isinstance(mapper, MosaicMixUpMapper) and mapper.size == (640, 640)
    assert isinstance(mapper.image_mapper.augmentations.augs[0], RandomHSV)


HARD_TAIL_BACKBONE = "benchmarks/results/hard_tail_pretrain/synthetic_hard_tail_R18_pretrained.pth"


@pytest.mark.parametrize("rel", [r for r in CONFIGS if r.startswith("Synthetic-HardTail" + os.sep)
                                 and r.split(os.sep)[1] not in ("Pretrain", "Decoupled")])
def test_hard_tail_detectors_start_from_the_kept_pretrained_backbone(rel, one_thread):
    """Every hard-tail detector (first stages; second stages start from one of them) loads
    the kept R18 into its whole ResNet and freezes stem and res2; the pre-training config
    itself trains from scratch."""
    import torch
    from eql_d2.engine.checkpoint import AtomicCheckpointer

    cfg = load(rel)
    assert cfg.MODEL.WEIGHTS == HARD_TAIL_BACKBONE and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    model, _ = build_detector(cfg)
    kept = torch.load(os.path.join(ROOT, cfg.MODEL.WEIGHTS), weights_only=False)["model"]
    resnet = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up.")}
    assert set(kept) == set(resnet), rel
    AtomicCheckpointer(model).resume_or_load(os.path.join(ROOT, cfg.MODEL.WEIGHTS), resume=False)
    after = model.state_dict()
    for key, value in kept.items():
        assert torch.equal(after[key], value.to(after[key].dtype)), key
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n, _ in model.named_parameters() if n.startswith(
        ("backbone.bottom_up.stem.", "backbone.bottom_up.res2."))}
    pretrain = load("Synthetic-HardTail/Pretrain/faster_rcnn_R18_FPN_d2heads_softmax_pretrain.yaml")
    assert pretrain.MODEL.WEIGHTS == "" and pretrain.MODEL.BACKBONE.FREEZE_AT == 0
