#!/usr/bin/env python
"""Keep the backbone network of a trained detector as a backbone file, like ImageNet weights.

    python tools/backbone_weights.py output/synthetic_hard_tail_pretrain/faster_rcnn_R18_FPN/model_final.pth \\
        datasets/synthetic_hard_tail_R18_pretrained.pth

Writes ``{"model": {key: tensor}}`` with the checkpoint's ``backbone.bottom_up.`` tensors
(``--prefix``), under their names, and nothing else: no FPN, no heads, no optimizer or
iteration. ``MODEL.WEIGHTS`` of any detector with the same bottom-up network (a ResNet of
the same depth and norm, whatever its FPN, heads or number of classes) then loads it as a
backbone file (eql_d2.engine.checkpoint): the ResNet starts from these weights, the FPN and
heads from their initialisation, and training starts at iteration 0.

``--half`` stores the floating-point tensors in float16, half the size of the file (a file
kept in git); loading casts them back into the float32 parameters, so every run from the
file starts from the same rounded values. Integer tensors (BatchNorm's counters) are kept.
"""

import argparse
import sys

import torch

from eql_d2.utils.io import atomic_write


def backbone_state(state, prefix):
    """The tensors of `state` whose names start with `prefix`, in their order."""
    kept = {k: v for k, v in state.items() if k.startswith(prefix)}
    if not kept:
        some = ", ".join(list(state)[:5])
        raise ValueError(f"no tensor name starts with {prefix!r} (the file's first names: "
                         f"{some})")
    return kept


def halved(state):
    """`state` with its floating-point tensors in float16 (names and order kept)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a detector checkpoint ({'model': state_dict, ...})")
    p.add_argument("output", help="the backbone file to write")
    p.add_argument("--prefix", default="backbone.bottom_up.",
                   help="names to keep (default: the ResNet under detectron2's FPN)")
    p.add_argument("--half", action="store_true",
                   help="store floating-point tensors in float16 (half the file size)")
    args = p.parse_args(argv)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        sys.exit(f"{args.checkpoint}: not a detectron2 checkpoint (no 'model' state dict)")
    try:
        kept = backbone_state(checkpoint["model"], args.prefix)
    except ValueError as e:
        sys.exit(f"{args.checkpoint}: {e}")
    if args.half:
        kept = halved(kept)
    with atomic_write(args.output, "wb") as f:
        torch.save({"model": kept}, f)
    print(f"wrote {args.output}: {len(kept)} tensors under {args.prefix} "
          f"({sum(v.numel() for v in kept.values()):,} values)", file=sys.stderr)


if __name__ == "__main__":
    main()
