"""tools/epoch_length.py: iterations per epoch of an LVIS-format file, checked by hand."""

import json
import math

import pytest

from helpers import load_script


def load_tool():
    return load_script("tools/epoch_length.py")


epoch_length = load_tool()

A, B, C = 1, 2, 3
# 10 annotated images and one without annotations:
#   img 0: A, C    img 1: A, B    img 2: B    img 3-9: A    img 10: nothing
# f_A = 9/10, f_B = 2/10, f_C = 1/10. With t = 0.5: r_A = 1, r_B = sqrt(2.5) = 1.581,
# r_C = sqrt(5) = 2.236; image factors 2.236, 1.581, 1.581 and seven 1s.
# ceil: 3 + 2 + 2 + 7 = 14 images per epoch; expectation: 12.398.
IMAGE_CATEGORIES = [[A, C], [A, B], [B]] + [[A]] * 7 + [[]]


def _lvis_file(tmp_path):
    images = [{"id": i + 100, "file_name": f"{i}.jpg", "width": 8, "height": 8}
              for i in range(len(IMAGE_CATEGORIES))]
    anns = [{"id": len(images) * 10 + k, "image_id": i + 100, "category_id": c,
             "bbox": [0, 0, 4, 4], "area": 16}
            for i, cats in enumerate(IMAGE_CATEGORIES) for k, c in enumerate(cats)]
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": str(c)} for c in (A, B, C)]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_iterations_per_epoch_with_and_without_repeat_factors(tmp_path, capsys):
    path = _lvis_file(tmp_path)
    n = epoch_length.main([path, "--batch", "4"])
    assert n == {"images": 10, "images_per_epoch": 10, "iterations_per_epoch": 3}
    n = epoch_length.main([path, "--batch", "4", "--keep-empty"])
    assert n["images"] == 11 and n["iterations_per_epoch"] == 3

    n = epoch_length.main([path, "--batch", "4", "--repeat-threshold", "0.5",
                           "--rounding", "ceil", "--epochs", "24", "--decay-epochs", "16", "22"])
    assert n == {"images": 10, "images_per_epoch": 14, "iterations_per_epoch": 4}
    out = capsys.readouterr().out
    assert "SOLVER.MAX_ITER 96" in out
    assert "SOLVER.STEPS (64, 88)" in out
    assert "24 epochs x 4 = 96 iterations" in out

    n = epoch_length.main([path, "--batch", "4", "--repeat-threshold", "0.5",
                           "--rounding", "stochastic"])
    assert n["images_per_epoch"] == pytest.approx(7 + 2 * math.sqrt(2.5) + math.sqrt(5),
                                                  rel=1e-6)
    assert n["iterations_per_epoch"] == 4


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(SystemExit, match="missing.json: cannot read"):
        epoch_length.main([str(tmp_path / "missing.json"), "--batch", "2"])
    other = tmp_path / "list.json"
    other.write_text("[]")
    with pytest.raises(SystemExit, match="list.json: not an LVIS"):
        epoch_length.main([str(other), "--batch", "2"])
    with pytest.raises(ValueError, match="batch must be positive"):
        epoch_length.epoch_length({"images": [{"id": 1}], "annotations": [
            {"image_id": 1, "category_id": 1}]}, 0)
