"""A trained EQL model predicts from its config.yaml and checkpoint alone.

An EQL Faster R-CNN (loss "eql", which needs the training set's category frequencies)
trains for a few iterations on a copy of the small Synthetic-LT registered under its own
names. Its training JSON is then deleted, and a fresh process in which the training set is
not even registered runs demo.py, train_net.py --eval-only and tools/ensemble.py on the
val split: the predictions and metrics equal those at the end of training. In-process
tests cover loading a checkpoint written before the frequencies were saved, and a model
built without training metadata being asked to train.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import eql_d2.modeling  # noqa: F401  (registers EQLROIHeads)
from helpers import ROOT, TINY_RCNN
from eql_d2.config import get_eql_cfg
from eql_d2.data import register_lvis_format
from eql_d2.engine import Trainer, prepare_datasets
from eql_d2.data.image_labels import ImageLabels
from eql_d2.modeling.cls_losses import EFL
from eql_d2.modeling.meta_arch.dense_loss import DenseClassificationLoss

TRAIN, VAL = "infer_only_train", "infer_only_val"
UNREGISTERED = "infer_only_nowhere"
CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eql.yaml")
FREQ_KEY = "roi_heads.box_predictor.cls_loss.freq"
# EQL's frequencies are settled by the registered loss (eql_d2.modeling.cls_losses.eql)
FAST_RCNN_LOGGER = "eql_d2.modeling.cls_losses.eql"

# Runs in the fresh process: registers only the datasets it is given, runs each script as
# __main__ (as `python script ...` would), then prints which datasets exist.
DRIVER = """
import json, runpy, sys
root, spec_file = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
with open(spec_file) as f:
    spec = json.load(f)
from detectron2.data import DatasetCatalog
from eql_d2.data import register_lvis_format
for name, json_file, image_root in spec["register"]:
    register_lvis_format(name, json_file, image_root)
for script, *argv in spec["runs"]:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
print("REGISTERED " + json.dumps(sorted(DatasetCatalog.list())))
"""


def load_json(path):
    with open(path) as f:
        return json.load(f)


def same_json(a, b):
    """Exact equality of JSON data, NaN included (NaN != NaN as floats)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def frequencies_from_json(json_file):
    """f_j = (images with an annotation of category j) / (images), by brute force."""
    data = load_json(json_file)
    num_classes = len(data["categories"])
    images = [set() for _ in range(num_classes)]
    for a in data["annotations"]:
        images[a["category_id"] - 1].add(a["image_id"])
    return torch.tensor([len(s) / len(data["images"]) for s in images], dtype=torch.float32)


@contextmanager
def captured(logger_name):
    """Records of one logger, whatever its propagation (detectron2's setup_logger turns
    propagation off, which hides records from caplog)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def messages(records, level=logging.WARNING):
    return [r.getMessage() for r in records if r.levelno >= level]


@pytest.fixture(scope="module")
def trained(small_synthetic, tmp_path_factory, one_thread):
    """Train 3 iterations on a copy of the small Synthetic-LT, evaluate, delete train JSON."""
    tmp = tmp_path_factory.mktemp("infer_only")
    data = str(tmp / "data")
    shutil.copytree(small_synthetic, data)
    train_json = os.path.join(data, "lvis_v1_train.json")
    val_json = os.path.join(data, "lvis_v1_val.json")
    for name, json_file in ((TRAIN, train_json), (VAL, val_json)):
        register_lvis_format(name, json_file, data)
    out = str(tmp / "run")
    cfg = get_eql_cfg(CFG, [*TINY_RCNN, "TEST.DETECTIONS_PER_IMAGE", "20",
                            "DATASETS.TRAIN", f"('{TRAIN}',)", "DATASETS.TEST", f"('{VAL}',)",
                            "OUTPUT_DIR", out])
    os.makedirs(out)
    with open(os.path.join(out, "config.yaml"), "w") as f:  # as train_net.py saves it
        f.write(cfg.dump())
    prepare_datasets(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    final = json.loads(json.dumps(trainer.train()))
    assert set(final) == {"bbox"}
    expected_freq = frequencies_from_json(train_json)
    os.remove(train_json)
    return dict(tmp=tmp, data=data, val_json=val_json, out=out, final=final,
                weights=os.path.join(out, "model_final.pth"), freq=expected_freq,
                results=load_json(os.path.join(out, "inference", VAL,
                                               "lvis_instances_results.json")))


def test_fresh_process_predicts_without_the_training_set(trained):
    tmp, out = trained["tmp"], trained["out"]
    config, weights = os.path.join(out, "config.yaml"), trained["weights"]
    # demo on the first val image, at a threshold between its 3rd and 4th best scores of
    # the end-of-training evaluation: it must draw exactly those 3 detections
    image = load_json(trained["val_json"])["images"][0]
    image_file = os.path.join(trained["data"], *image["coco_url"].split("/")[-2:])
    scores = sorted((r["score"] for r in trained["results"] if r["image_id"] == image["id"]),
                    reverse=True)
    assert len(scores) >= 4 and scores[2] > scores[3]
    threshold = (scores[2] + scores[3]) / 2
    eval_dir, demo_dir, ens_dir = (str(tmp / n) for n in ("eval", "demo", "ens"))
    spec = {
        "register": [[VAL, trained["val_json"], trained["data"]]],
        "runs": [
            [os.path.join(ROOT, "demo.py"), "--config-file", config, "--weights", weights,
             "--input", image_file, "--output", demo_dir,
             "--confidence-threshold", repr(threshold)],
            [os.path.join(ROOT, "train_net.py"), "--config-file", config, "--eval-only",
             "MODEL.WEIGHTS", weights, "OUTPUT_DIR", eval_dir],
            [os.path.join(ROOT, "tools", "ensemble.py"), "--dataset", VAL,
             "--output-dir", ens_dir, "--method", "nms",
             "--member", f"config={config},weights={weights},name=eql"],
        ],
    }
    spec_file, driver = tmp / "spec.json", tmp / "driver.py"
    spec_file.write_text(json.dumps(spec))
    driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(driver), ROOT, str(spec_file)], cwd=str(tmp),
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    registered = json.loads(re.search(r"^REGISTERED (.*)$", proc.stdout, re.M).group(1))
    assert VAL in registered and TRAIN not in registered
    assert not os.path.exists(os.path.join(trained["data"], "lvis_v1_train.json"))

    drawn = re.search(r"(\d+) detections >= ", log)
    assert drawn and int(drawn.group(1)) == 3, log[-3000:]
    assert os.path.isfile(os.path.join(demo_dir, os.path.splitext(os.path.basename(image_file))[0]
                                       + ".png"))

    assert same_json(load_json(os.path.join(eval_dir, "eval_metrics.json")),
                     {VAL: trained["final"]})
    assert same_json(load_json(os.path.join(eval_dir, "inference", VAL,
                                            "lvis_instances_results.json")), trained["results"])

    metrics = load_json(os.path.join(ens_dir, "metrics.json"))
    assert same_json(metrics["members"]["eql"], trained["final"])
    assert same_json(load_json(os.path.join(ens_dir, "members", "eql",
                                            "lvis_instances_results.json")), trained["results"])


def cfg_of(trained, *opts):
    cfg = get_eql_cfg(os.path.join(trained["out"], "config.yaml"), list(opts))
    cfg.OUTPUT_DIR = str(trained["tmp"] / "unused")
    return cfg


def old_checkpoint(trained):
    """The trained checkpoint as saved before EQL's frequencies were in state_dict."""
    path = str(trained["tmp"] / "old_format.pth")
    if not os.path.exists(path):
        state = torch.load(trained["weights"], map_location="cpu", weights_only=False)
        del state["model"][FREQ_KEY]
        torch.save(state, path)
    return path


def val_input(trained):
    from detectron2.data.detection_utils import read_image

    image = load_json(trained["val_json"])["images"][0]
    path = os.path.join(trained["data"], *image["coco_url"].split("/")[-2:])
    array = read_image(path, format="BGR")
    return {"image": torch.as_tensor(array.transpose(2, 0, 1).copy()),
            "height": array.shape[0], "width": array.shape[1]}


def predict(model, inputs):
    model.eval()
    with torch.no_grad():
        return model([inputs])[0]["instances"]


def assert_same_instances(a, b):
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


def test_checkpoint_carries_the_training_frequencies(trained):
    saved = torch.load(trained["weights"], map_location="cpu", weights_only=False)["model"]
    torch.testing.assert_close(saved[FREQ_KEY], trained["freq"], rtol=0, atol=1e-7)


def test_old_checkpoint_without_frequencies_loads_and_warns(trained, one_thread):
    """Built with the training metadata (loaded by the fixture): the data's frequencies
    stay, with a warning naming the key; predictions equal the full checkpoint's."""
    full = build_model(cfg_of(trained))
    DetectionCheckpointer(full).load(trained["weights"])
    model = build_model(cfg_of(trained))
    predictor = model.roi_heads.box_predictor
    torch.testing.assert_close(predictor.cls_loss.freq, trained["freq"], rtol=0, atol=1e-7)
    with captured(FAST_RCNN_LOGGER) as records:
        DetectionCheckpointer(model).load(old_checkpoint(trained))
    warned = messages(records)
    assert any(FREQ_KEY in m and "no EQL category frequencies" in m and TRAIN in m
               for m in warned), warned
    assert predictor.frequencies_known
    torch.testing.assert_close(predictor.cls_loss.freq, trained["freq"], rtol=0, atol=1e-7)
    inputs = val_input(trained)
    assert_same_instances(predict(model, inputs), predict(full, inputs))


def test_checkpoint_frequencies_that_differ_from_the_data_warn_and_the_data_wins(trained):
    model = build_model(cfg_of(trained))
    state = torch.load(trained["weights"], map_location="cpu", weights_only=False)
    state["model"][FREQ_KEY] = state["model"][FREQ_KEY] / 2
    path = str(trained["tmp"] / "halved.pth")
    torch.save(state, path)
    with captured(FAST_RCNN_LOGGER) as records:
        DetectionCheckpointer(model).load(path)
    num_classes = trained["freq"].numel()
    assert any(f"differ from those of DATASETS.TRAIN ['{TRAIN}'] for {num_classes} of "
               f"{num_classes}" in m for m in messages(records))
    torch.testing.assert_close(model.roi_heads.box_predictor.cls_loss.freq, trained["freq"],
                               rtol=0, atol=1e-7)


def training_batch(trained):
    x = val_input(trained)
    inst = Instances((x["height"], x["width"]))
    inst.gt_boxes = Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]]))
    inst.gt_classes = torch.tensor([0])
    # the image-level labels ImageLabelDatasetMapper adds to the ground truth
    c = int(cfg_of(trained).MODEL.ROI_HEADS.NUM_CLASSES)
    none = torch.zeros(c, dtype=torch.bool)
    inst.image_labels = ImageLabels.for_image(none, none, len(inst))
    x["instances"] = inst
    return [x]


def test_model_built_without_training_metadata(trained, one_thread):
    """DATASETS.TRAIN names a dataset that is not even registered: the model builds and
    takes the frequencies from the checkpoint; without them it predicts but refuses to
    train, naming DATASETS.TRAIN."""
    assert UNREGISTERED not in DatasetCatalog.list()
    cfg = cfg_of(trained, "DATASETS.TRAIN", f"('{UNREGISTERED}',)")
    model = build_model(cfg)
    predictor = model.roi_heads.box_predictor
    assert not predictor.frequencies_known and torch.isnan(predictor.cls_loss.freq).all()
    DetectionCheckpointer(model).load(trained["weights"])
    assert predictor.frequencies_known
    torch.testing.assert_close(predictor.cls_loss.freq, trained["freq"], rtol=0, atol=1e-7)
    reference = predict(model, val_input(trained))

    bare = build_model(cfg)
    with captured(FAST_RCNN_LOGGER) as records:
        DetectionCheckpointer(bare).load(old_checkpoint(trained))
    assert any("cannot train" in m and UNREGISTERED in m for m in messages(records))
    assert_same_instances(predict(bare, val_input(trained)), reference)
    bare.train()
    with EventStorage(), pytest.raises(ValueError, match=rf"cannot train.*DATASETS.TRAIN "
                                                         rf"\['{UNREGISTERED}'\].*prepare_datasets"):
        bare(training_batch(trained))
    # a checkpoint saved from that model holds NaN, which a later load does not take as data
    path = str(trained["tmp"] / "no_freq_saved.pth")
    torch.save({"model": bare.state_dict()}, path)
    again = build_model(cfg)
    DetectionCheckpointer(again).load(path)
    assert not again.roi_heads.box_predictor.frequencies_known

    # EQLv2's r/c/f groups only label training logs: no training metadata, no groups
    eqlv2 = build_model(cfg_of(trained, "DATASETS.TRAIN", f"('{UNREGISTERED}',)",
                               "MODEL.CLS_LOSS.NAME", "eqlv2"))
    assert eqlv2.roi_heads.box_predictor.class_groups is None


def test_dense_loss_without_groups_warns_once_when_training():
    with captured("eql_d2.modeling.cls_losses.head") as records:
        loss = DenseClassificationLoss(criterion=EFL(3), class_frequency=None, log_period=1)
        assert not messages(records)  # building for inference says nothing
        logits = torch.randn(1, 6, 3, requires_grad=True)
        labels = torch.tensor([[0, 1, 2, 3, 3, -1]])
        with EventStorage():
            for _ in range(2):
                loss(logits, labels, (labels >= 0) & (labels < 3), 3.0).backward()
    warned = messages(records)
    assert len(warned) == 1 and "not logged by group" in warned[0]
