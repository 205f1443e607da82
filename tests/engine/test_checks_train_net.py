"""train_net.py refuses at start what cannot give a valid run: weights that do not fit the
model (evaluation and fine-tuning), AMP without CUDA, --eval-only without test sets."""

import os

import pytest
import torch

from helpers import ROOT, TINY_RCNN, run_train_net

CFG = os.path.join(ROOT, "configs/Synthetic-LT/EQL/faster_rcnn_R18_FPN_eqlv2.yaml")


@pytest.fixture(scope="module")
def weights_of_20_classes(tmp_path_factory):
    """model_final.pth of an EQLv2 Faster R-CNN of the same config for 20 classes."""
    import eql_d2.modeling  # noqa: F401
    from detectron2.modeling import build_model

    from eql_d2.config import get_eql_cfg
    from eql_d2.engine import AtomicCheckpointer

    cfg = get_eql_cfg(CFG, ["MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()",
                            "MODEL.ROI_HEADS.NUM_CLASSES", "20"])
    folder = str(tmp_path_factory.mktemp("other"))
    AtomicCheckpointer(build_model(cfg), folder).save("model_final")
    return os.path.join(folder, "model_final.pth")


def _run(small_synthetic, out, *args):
    return run_train_net(["--config-file", CFG, *args, *TINY_RCNN, "TEST.EVAL_PERIOD", "0",
                          "OUTPUT_DIR", str(out)],
                         {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"})


def test_eval_only_refuses_weights_of_another_model(small_synthetic, tmp_path,
                                                    weights_of_20_classes):
    proc = _run(small_synthetic, tmp_path, "--eval-only", "MODEL.WEIGHTS", weights_of_20_classes)
    assert proc.returncode != 0
    assert f"{weights_of_20_classes}: the weights do not fit the model" in proc.stderr
    assert "roi_heads.box_predictor.cls_score.weight [21, 256] vs [9, 256]" in proc.stderr
    assert not os.path.exists(tmp_path / "eval_metrics.json")


def test_fine_tuning_refuses_heads_that_do_not_fit(small_synthetic, tmp_path,
                                                   weights_of_20_classes):
    proc = _run(small_synthetic, tmp_path, "MODEL.WEIGHTS", weights_of_20_classes,
                "DATASETS.TEST", "()")
    assert proc.returncode != 0
    assert f"{weights_of_20_classes}: the weights do not fit the model's heads" in proc.stderr
    assert "MODEL.WEIGHTS_PARTIAL True" in proc.stderr
    assert "Starting training from iteration" not in proc.stdout + proc.stderr
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".pth")]


def test_eval_only_without_test_sets_is_an_error(small_synthetic, tmp_path):
    proc = _run(small_synthetic, tmp_path, "--eval-only", "DATASETS.TEST", "()",
                "MODEL.WEIGHTS", "unused.pth")
    assert proc.returncode != 0
    assert "--eval-only: DATASETS.TEST is empty" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="AMP trains on CUDA machines")
def test_amp_without_cuda_is_refused_before_anything_is_written(small_synthetic, tmp_path):
    out = tmp_path / "amp"
    proc = _run(small_synthetic, out, "SOLVER.AMP.ENABLED", "True")
    assert proc.returncode != 0
    assert "SOLVER.AMP.ENABLED True" in proc.stderr and "needs CUDA" in proc.stderr
    assert not out.exists()
