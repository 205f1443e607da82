"""End-to-end: train_net.py trains ATSS and EFLRetinaNet with EFL, saves the statistics,
and --eval-only reproduces the final metrics."""

import json
import os

import pytest

from helpers import ROOT, TINY_ONE_STAGE, assert_eval_only_reproduces, train_on_small


@pytest.mark.parametrize("config", ["atss_R18_FPN_efl.yaml", "retinanet_R18_FPN_efl.yaml"])
def test_train_then_eval_only(config, small_synthetic, tmp_path):
    cfg = os.path.join(ROOT, "configs/Synthetic-LT", config)
    out = str(tmp_path)
    final, state, env = train_on_small(cfg, TINY_ONE_STAGE, small_synthetic, out)
    # the statistics are in the checkpoint, and their group means reach metrics.json
    assert state["cls_loss.criterion.neg_grad"].sum() > 0
    with open(os.path.join(out, "metrics.json")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    iters = [row for row in logged if "efl/gradient_ratio/f" in row]
    assert iters and all("efl/focusing_factor/r" in row for row in iters)

    assert_eval_only_reproduces(cfg, TINY_ONE_STAGE, out, env, final)
