#!/usr/bin/env python
"""Convert the EQLv2 / EFL authors' trained checkpoints into eql_d2 weights.

    # EQLv2 authors (tztztztztz/eqlv2, mmdetection 2.x) Mask R-CNN R50-FPN, EQLv2 head
    python tools/convert_checkpoint.py eqlv2_1x.pth output/eqlv2_r50_1x.pth \\
        --config-file configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_eqlv2.yaml
    # EFL authors (ModelTC/United-Perception) ATSS improved baseline R50 / R101 with EFL
    python tools/convert_checkpoint.py ckpt_e24.pth output/atss_r50_efl.pth \\
        --config-file configs/LVIS-v1/atss_R50_FPN_2x_rfs_efl.yaml
    # then evaluate with the config written next to the weights
    python train_net.py --config-file output/eqlv2_r50_1x.yaml --eval-only

The source code base (mmdetection or United-Perception) is recognised from the key names
(``--format`` overrides). The model of ``--config-file`` (with any ``KEY VALUE`` overrides
after the paths) is built on the CPU; every one of its parameters and buffers must be filled
from the source with its shape, and every source tensor must have a place, or the tool stops
naming the keys (eql_d2.checkpoint.convert). It writes

- OUTPUT: ``{"model": state_dict, "__author__": ..., "source": ...}``, which
  ``train_net.py --eval-only MODEL.WEIGHTS OUTPUT`` loads with eql_d2's strict check (the
  tool loads it that way itself before it finishes);
- OUTPUT with ``.yaml``: ``_BASE_`` = the config, plus what the weights need: the
  torchvision ResNet layout (``MODEL.RESNETS.STRIDE_IN_1X1 False``), the ImageNet pixel
  statistics in the order of ``--input-format`` (``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``,
  ``INPUT.FORMAT``), the overrides given here and ``MODEL.WEIGHTS``.

``--input-format RGB`` (default) keeps the weights as trained, on RGB images;
``--input-format BGR`` reverses the first convolution's input channels instead, so the model
reads BGR as detectron2's ImageNet-initialised configs do.

Checkpoints are pickles: they are read with ``torch.load(weights_only=True)``, which loads
tensors and plain containers only; ``--trust-pickle`` allows arbitrary objects (mmdetection
files may hold some in their ``meta``), for files from a source you trust.
"""

import argparse
import os
import sys

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from eql_d2.checkpoint import (ConversionError, box_coding_notes,  # noqa: E402
                               convert_state_dict, detect_format, input_settings,
                               source_state_dict)

AUTHOR = {"mmdet": "tztztztztz/eqlv2 (mmdetection 2.x), converted by eql_d2",
          "up": "ModelTC/United-Perception, converted by eql_d2"}


def load_checkpoint(path, trust_pickle=False):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # torch raises UnpicklingError (or others) for non-tensor objects
        if trust_pickle:
            raise
        raise SystemExit(
            f"{path}: torch.load(weights_only=True) refused it ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). If the file comes from a source you "
            "trust, run again with --trust-pickle") from None


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _nested(settings):
    """{"A.B.C": v} -> {"A": {"B": {"C": v}}}"""
    out = {}
    for dotted, value in settings.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _plain(value)
    return out


def config_yaml(base_config, settings, weights):
    """The YAML that evaluates the converted weights: `base_config` + `settings` + weights."""
    base = os.path.abspath(base_config)
    body = _nested(dict(settings, **{"MODEL.WEIGHTS": os.path.abspath(weights)}))
    return (f"# {os.path.basename(weights)}: weights converted by tools/convert_checkpoint.py\n"
            + yaml.safe_dump({"_BASE_": base}, sort_keys=False)
            + yaml.safe_dump(body, sort_keys=False, default_flow_style=None))


def build_model_for(config_file, opts):
    from detectron2.modeling import build_model

    import eql_d2.modeling  # noqa: F401  (registers eql_d2's heads and architectures)
    from eql_d2.config import get_eql_cfg

    cfg = get_eql_cfg(config_file, list(opts) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    cfg.freeze()
    model = build_model(cfg)
    model.eval()
    return cfg, model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("source", help="the authors' checkpoint (.pth)")
    ap.add_argument("output", help="the eql_d2 weights to write (.pth)")
    ap.add_argument("--config-file", required=True, help="eql_d2 config of the target model")
    ap.add_argument("--format", choices=["auto", "mmdet", "up"], default="auto",
                    help="source code base (default: from the key names)")
    ap.add_argument("--input-format", choices=["RGB", "BGR"], default="RGB",
                    help="channel order the converted model reads (default RGB, as trained)")
    ap.add_argument("--config-out", default=None,
                    help="YAML to write (default: OUTPUT with .yaml)")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="load the source with weights_only=False (trusted files only)")
    ap.add_argument("opts", nargs="*", metavar="KEY VALUE",
                    help="KEY VALUE overrides of the config (also written to the YAML)")
    args = ap.parse_intermixed_args(argv)
    if len(args.opts) % 2:
        ap.error(f"overrides come in KEY VALUE pairs, got {args.opts}")

    source = source_state_dict(load_checkpoint(args.source, args.trust_pickle))
    fmt = detect_format(source) if args.format == "auto" else args.format
    settings = input_settings(args.input_format)
    build_opts = list(args.opts)
    for key, value in settings.items():
        build_opts += [key, str(value)]
    cfg, model = build_model_for(args.config_file, build_opts)

    try:
        conversion = convert_state_dict(source, model.state_dict(), fmt, args.input_format)
    except ConversionError as e:
        raise SystemExit(f"{args.source} -> {args.config_file}: {e}") from None

    from eql_d2.engine.checkpoint import load_weights
    from eql_d2.utils.io import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_write(args.output, "wb") as f:
        torch.save({"model": conversion.state_dict, "__author__": AUTHOR[fmt],
                    "source": os.path.basename(args.source)}, f)
    # the file loads into the model as train_net.py --eval-only loads it
    load_weights(model, args.output)

    typed = {}
    for key in args.opts[0::2]:
        node = cfg
        for part in key.split("."):
            node = node[part]
        typed[key] = node
    typed.update(settings)
    config_out = args.config_out or os.path.splitext(args.output)[0] + ".yaml"
    text = config_yaml(args.config_file, typed, args.output)
    with atomic_write(config_out, "w") as f:
        f.write(text)

    print(conversion.summary())
    for note in box_coding_notes(cfg, fmt):
        print(note)
    print(f"written: {args.output} ({len(conversion.state_dict)} entries)")
    print(f"written: {config_out}, with the keys the weights need:")
    for key, value in settings.items():
        print(f"  {key} {_plain(value)}")
    print(f"evaluate: python train_net.py --config-file {config_out} --eval-only")
    return conversion, config_out


if __name__ == "__main__":
    main()
