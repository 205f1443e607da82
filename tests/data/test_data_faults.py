"""Data faults: a missing training image stops train_net.py before iteration 0; corrupt
images are replaced with a warning, up to DATALOADER.MAX_FAILED_IMAGES."""

import os
import shutil

import pytest

from helpers import ROOT, TINY_RCNN, run_train_net

CFG = os.path.join(ROOT, "configs/Synthetic-LT/faster_rcnn_R18_FPN_d2heads_softmax.yaml")


@pytest.fixture
def dataset_copy(small_synthetic, tmp_path):
    root = str(tmp_path / "slt")
    shutil.copytree(small_synthetic, root)
    return root


def _train(root, out, *extra):
    return run_train_net(["--config-file", CFG, *TINY_RCNN, "TEST.EVAL_PERIOD", "0",
                          "DATASETS.TEST", "()", *extra, "OUTPUT_DIR", out],
                         {"EQL_D2_SYNTHETIC_ROOT": root, "OMP_NUM_THREADS": "1"})


def test_missing_image_stops_before_the_first_iteration(dataset_copy, tmp_path):
    missing = os.path.join(dataset_copy, "train", sorted(os.listdir(
        os.path.join(dataset_copy, "train")))[17])
    os.remove(missing)
    proc = _train(dataset_copy, str(tmp_path / "out"))
    assert proc.returncode != 0
    assert missing in proc.stderr and "1 of " in proc.stderr
    assert "Starting training from iteration" not in proc.stdout + proc.stderr
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".pth")]


def _truncate_most(root):
    folder = os.path.join(root, "train")
    names = sorted(os.listdir(folder))
    corrupt = [os.path.join(folder, n) for i, n in enumerate(names) if i % 5]  # 4 in 5
    for path in corrupt:
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    return set(corrupt)


def test_corrupt_images_are_replaced_until_the_limit(dataset_copy, tmp_path):
    corrupt = _truncate_most(dataset_copy)
    proc = _train(dataset_copy, str(tmp_path / "tolerant"), "DATALOADER.MAX_FAILED_IMAGES", "1000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stdout.splitlines() if "was replaced by another sample" in line]
    assert warned and all(any(p in line for p in corrupt) for line in warned)
    assert "image file is truncated" in warned[0]
    assert os.path.isfile(tmp_path / "tolerant" / "model_final.pth")

    proc = _train(dataset_copy, str(tmp_path / "strict"), "DATALOADER.MAX_FAILED_IMAGES", "2")
    assert proc.returncode != 0
    assert "more than DATALOADER.MAX_FAILED_IMAGES = 2" in proc.stderr
    named = [p for p in corrupt if p in proc.stderr]
    assert len(named) >= 3
    assert not os.path.exists(tmp_path / "strict" / "model_final.pth")
