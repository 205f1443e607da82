#!/usr/bin/env python
"""Run a trained eql_d2 detector on images and write visualized PNGs.

    python demo.py --config-file output/run/config.yaml --weights output/run/model_final.pth \\
        --input datasets/synthetic_lt/val --output output/demo_vis --confidence-threshold 0.3

--input takes image files and/or folders (their .png/.jpg/.jpeg/.bmp files, not recursive).
Each image gets a PNG named after its whole file name (``a.png`` -> ``<output>/a.png``,
``a.jpg`` -> ``<output>/a.jpg.png``, so ``a.jpg`` and ``a.png`` do not collide; inputs
that would still write the same file are an error) with boxes, masks
(when the model predicts them), class names and scores drawn by detectron2's Visualizer;
the category names come from the config's first test dataset with categories, else from a
training set whose names are already registered or whose JSON is on disk, else the drawing
shows class indices. The model itself needs only the config and the weights (which must
fit it: see ``MODEL.WEIGHTS_PARTIAL``); the training data need not exist. An image that
cannot be read is skipped with a warning naming it; the others are processed, and then
the run stops with an error listing the skipped ones (exit status 1).
"""

import argparse
import logging
import os
import sys

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

import eql_d2.modeling  # noqa: F401  (registers eql_d2's models)
from eql_d2.config import get_eql_cfg
from eql_d2.data import load_category_metadata, register_all
from eql_d2.engine.ema import load_prediction_weights
from eql_d2.utils.io import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
logger = logging.getLogger("eql_d2.demo")


def list_images(inputs):
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"No {'/'.join(IMAGE_EXTENSIONS)} images in folder {path}")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"Input image or folder not found: {path}")
    return files


def output_names(images, output_dir):
    """{input path: output PNG}: the input's whole file name, with ``.png`` appended
    unless it ends so; raises ValueError when two inputs would write the same file."""
    outputs, seen = {}, {}
    for path in images:
        name = os.path.basename(path)
        out = os.path.join(output_dir, name if name.lower().endswith(".png") else name + ".png")
        if out in seen and os.path.abspath(seen[out]) != os.path.abspath(path):
            raise ValueError(f"Inputs {seen[out]} and {path} have the same file name; both "
                             f"would be drawn into {out}. Run them with separate --output folders")
        seen[out] = path
        outputs[path] = out
    return outputs


def build_predictor(cfg):
    """detectron2's DefaultPredictor with the weights loaded by eql_d2's checked loader
    (weights that do not fit the model are an error, unless MODEL.WEIGHTS_PARTIAL)."""
    bare = cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""  # DefaultPredictor loads nothing then
    bare.freeze()
    predictor = DefaultPredictor(bare)
    load_prediction_weights(cfg, predictor.model, cfg.MODEL.WEIGHTS)
    return predictor


def setup_cfg(args):
    if not os.path.isfile(args.weights):
        raise FileNotFoundError(f"Weights file not found: {args.weights}")
    cfg = get_eql_cfg(args.config_file, args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    return cfg


def category_metadata(cfg):
    """Metadata with the class names to draw (see the module docstring)."""
    for name in cfg.DATASETS.TEST:
        meta = load_category_metadata(name)
        if meta.get("thing_classes"):
            return meta
    for name in cfg.DATASETS.TRAIN:
        meta = MetadataCatalog.get(name)
        if meta.get("thing_classes"):
            return meta
        # only names are wanted: a training JSON that is not there is no error
        json_file = meta.get("json_file")
        if json_file and os.path.isfile(json_file):
            meta = load_category_metadata(name)
            if meta.get("thing_classes"):
                return meta
    logger.warning("No dataset of the config gives category names (DATASETS.TEST %s, "
                   "DATASETS.TRAIN %s): detections are labelled by class index",
                   list(cfg.DATASETS.TEST), list(cfg.DATASETS.TRAIN))
    return MetadataCatalog.get("__unnamed")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="model weights (.pth)")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("--output", required=True, help="folder for the visualized PNGs")
    p.add_argument("--confidence-threshold", type=float, default=0.5,
                   help="draw detections scoring at least this")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE pairs")
    args = p.parse_args(argv)
    setup_logger(name="eql_d2")
    register_all()
    cfg = setup_cfg(args)
    images = list_images(args.input)
    outputs = output_names(images, args.output)
    metadata = category_metadata(cfg)
    predictor = build_predictor(cfg)
    os.makedirs(args.output, exist_ok=True)
    written, unreadable = [], []
    for n, path in enumerate(images, 1):
        try:
            image = read_image(path, format="BGR")
        except (OSError, SyntaxError, ValueError) as e:
            logger.warning("[%d/%d] %s: skipped, the image cannot be read (%s: %s)", n,
                           len(images), path, type(e).__name__, e)
            unreadable.append(path)
            continue
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= args.confidence_threshold]
        vis = Visualizer(image[:, :, ::-1], metadata, scale=max(1.0, 480 / max(image.shape[:2])),
                         instance_mode=ColorMode.IMAGE)
        drawn = vis.draw_instance_predictions(instances)
        out = outputs[path]
        with atomic_write(out, "wb") as f:
            drawn.fig.savefig(f, format="png")
        written.append(out)
        logger.info("[%d/%d] %s: %d detections >= %.2f -> %s", n, len(images), path,
                    len(instances), args.confidence_threshold, out)
    if unreadable:
        # after the readable ones are drawn: a batch job sees the failure in its exit status
        raise SystemExit(f"demo.py: {len(unreadable)} of {len(images)} input images could not "
                         f"be read and were skipped: {', '.join(unreadable)}")
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
