#!/usr/bin/env python
"""Iterations per epoch of an LVIS-format training set, with or without repeat factor
sampling, and the SOLVER.MAX_ITER / SOLVER.STEPS of a schedule stated in epochs.

    python tools/epoch_length.py datasets/lvis/lvis_v1_train.json --batch 16 \\
        --repeat-threshold 0.001 --rounding ceil --epochs 24 --decay-epochs 16 22

Papers state schedules in epochs; detectron2 configs in iterations. An epoch here is one
pass over the training list as the sampler expands it:

- without repeat factor sampling: the images that train (images without annotations are
  dropped, as detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS does; ``--keep-empty``
  keeps them);
- with it (``--repeat-threshold t``): image i repeated by its repeat factor r_i =
  max over its categories c of max(1, sqrt(t / f_c)), f_c the fraction of training images
  that contain c (detectron2's ``repeat_factors_from_category_frequency``); ``--rounding
  ceil`` counts ceil(r_i) copies (DATALOADER.REPEAT_ROUNDING "ceil", the EFL / EQLv2
  authors' expanded list), ``stochastic`` the expected sum of r_i (detectron2's sampler).

Iterations per epoch = ceil(images per epoch / batch). MAX_ITER = epochs x that, each step
= its epoch x that. The numbers are printed with the arithmetic, to paste into a config
comment.
"""

import argparse
import json
import math
import sys

from detectron2.data.samplers import RepeatFactorTrainingSampler

__all__ = ["epoch_length", "main"]


def _training_images(data: dict, keep_empty: bool):
    """One dict per training image with its annotations' category ids, in the JSON's order."""
    cats = {}
    for ann in data.get("annotations", []):
        cats.setdefault(ann["image_id"], []).append({"category_id": ann["category_id"]})
    images = [{"annotations": cats.get(img["id"], [])} for img in data["images"]]
    return images if keep_empty else [d for d in images if d["annotations"]]


def epoch_length(data: dict, batch: int, repeat_threshold: float = 0.0,
                 rounding: str = "ceil", keep_empty: bool = False) -> dict:
    """Images and iterations per epoch of an LVIS-format dict (``images``, ``annotations``).

    Returns a dict with ``images`` (training images), ``images_per_epoch`` (the expanded
    count: an int for ceil rounding or no repeats, the expectation for stochastic) and
    ``iterations_per_epoch`` = ceil(images_per_epoch / batch)."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    if rounding not in ("ceil", "stochastic"):
        raise ValueError(f"rounding must be 'ceil' or 'stochastic', got {rounding!r}")
    dicts = _training_images(data, keep_empty)
    if not dicts:
        raise ValueError("no training images (every image lacks annotations; --keep-empty "
                         "counts them)")
    if repeat_threshold > 0:
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, repeat_threshold).tolist()
        per_epoch = (sum(math.ceil(r) for r in factors) if rounding == "ceil"
                     else float(sum(factors)))
    else:
        per_epoch = len(dicts)
    return {"images": len(dicts), "images_per_epoch": per_epoch,
            "iterations_per_epoch": math.ceil(per_epoch / batch)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json_file", help="LVIS-format (or COCO-format) training JSON")
    p.add_argument("--batch", type=int, required=True, help="SOLVER.IMS_PER_BATCH")
    p.add_argument("--repeat-threshold", type=float, default=0.0,
                   help="DATALOADER.REPEAT_THRESHOLD (0: no repeat factor sampling)")
    p.add_argument("--rounding", choices=("ceil", "stochastic"), default="ceil",
                   help="DATALOADER.REPEAT_ROUNDING")
    p.add_argument("--keep-empty", action="store_true",
                   help="count images without annotations (FILTER_EMPTY_ANNOTATIONS False)")
    p.add_argument("--epochs", type=float, help="schedule length in epochs")
    p.add_argument("--decay-epochs", type=float, nargs="*", default=[],
                   help="epochs after which the learning rate decays")
    args = p.parse_args(argv)
    try:
        with open(args.json_file) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"{args.json_file}: cannot read the training JSON: {e}")
    if not isinstance(data, dict) or "images" not in data:
        sys.exit(f"{args.json_file}: not an LVIS / COCO-format file (no 'images')")
    n = epoch_length(data, args.batch, args.repeat_threshold, args.rounding, args.keep_empty)
    ipe = n["iterations_per_epoch"]
    expanded = n["images_per_epoch"]
    how = ("no repeat factor sampling" if args.repeat_threshold <= 0 else
           f"repeat factor sampling t={args.repeat_threshold:g}, {args.rounding} rounding")
    print(f"{args.json_file}: {n['images']} training images; {how}")
    count = str(expanded) if isinstance(expanded, int) else f"{expanded:.1f}"
    print(f"images per epoch: {count}{'' if isinstance(expanded, int) else ' (expected)'}")
    print(f"iterations per epoch at batch {args.batch}: ceil({count} / {args.batch}) = {ipe}")
    if args.epochs:
        max_iter = round(args.epochs * ipe)
        steps = tuple(round(e * ipe) for e in args.decay_epochs)
        print(f"# {args.epochs:g} epochs x {ipe} = {max_iter} iterations; decay after epochs "
              f"{', '.join(f'{e:g}' for e in args.decay_epochs) or '-'}")
        print(f"SOLVER.MAX_ITER {max_iter}")
        if steps:
            print(f"SOLVER.STEPS {steps}")
    return n


if __name__ == "__main__":
    main()
