"""demo.py: outputs keep the input's whole file name, unreadable inputs are skipped and
reported at the end, weights that do not fit the model are refused."""

import logging
import os
import shutil

import pytest
from PIL import Image

from helpers import ROOT, load_script


def load_demo():
    return load_script("demo.py", "demo_checks")


demo = load_demo()


def _save_model(folder, num_classes):
    import eql_d2.modeling  # noqa: F401
    from detectron2.modeling import build_model

    from eql_d2.config import get_eql_cfg
    from eql_d2.engine import AtomicCheckpointer

    cfg = get_eql_cfg(os.path.join(ROOT, "configs", "Synthetic-LT", "atss_R18_FPN_focal.yaml"))
    cfg.merge_from_list(["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", "MODEL.DEVICE", "cpu",
                         "MODEL.ATSS.NUM_CLASSES", str(num_classes), "INPUT.MIN_SIZE_TEST", "64",
                         "INPUT.MAX_SIZE_TEST", "64", "TEST.DETECTIONS_PER_IMAGE", "5"])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    AtomicCheckpointer(build_model(cfg), folder).save("model")
    return os.path.join(folder, "config.yaml"), os.path.join(folder, "model.pth")


@pytest.fixture(scope="module")
def model8(tmp_path_factory, one_thread):
    return _save_model(str(tmp_path_factory.mktemp("demo8")), 8)


@pytest.fixture
def inputs(small_synthetic, tmp_path):
    """a.png, a.jpg (the same picture) and c.jpg, which is not an image."""
    folder = tmp_path / "in"
    folder.mkdir()
    val = os.path.join(small_synthetic, "val")
    shutil.copy(os.path.join(val, sorted(os.listdir(val))[0]), folder / "a.png")
    Image.open(folder / "a.png").convert("RGB").save(folder / "a.jpg")
    (folder / "c.jpg").write_bytes(b"not an image")
    return folder


def _main(config, weights, out, *inputs):
    return demo.main(["--config-file", config, "--weights", weights, "--input", *inputs,
                      "--output", str(out), "--confidence-threshold", "0.0"])


def test_outputs_keep_the_whole_name_and_unreadable_inputs_fail_at_the_end(model8, inputs,
                                                                           tmp_path, caplog):
    out = tmp_path / "vis"
    logger = logging.getLogger("eql_d2.demo")  # not propagated: detectron2's setup_logger
    logger.addHandler(caplog.handler)
    try:
        with pytest.raises(SystemExit) as exit_:
            _main(*model8, out, str(inputs))
    finally:
        logger.removeHandler(caplog.handler)
    assert "1 of 3 input images could not be read" in str(exit_.value)
    assert str(inputs / "c.jpg") in str(exit_.value)
    assert sorted(os.listdir(out)) == ["a.jpg.png", "a.png"]
    # one warning; a record may reach caplog twice (its handler here and, when an earlier
    # test left the logger propagating, the root's)
    warned = sorted({r.getMessage() for r in caplog.records if "skipped" in r.getMessage()})
    assert len(warned) == 1 and str(inputs / "c.jpg") in warned[0]

    # readable inputs only: the written files are returned
    written = _main(*model8, tmp_path / "ok", str(inputs / "a.png"), str(inputs / "a.jpg"))
    assert sorted(map(os.path.basename, written)) == ["a.jpg.png", "a.png"]


def test_inputs_of_one_file_name_are_refused(model8, inputs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(inputs / "a.png", other / "a.png")
    with pytest.raises(ValueError, match="have the same file name"):
        _main(*model8, tmp_path / "vis", str(inputs / "a.png"), str(other / "a.png"))
    assert not (tmp_path / "vis").exists()


def test_weights_of_another_model_are_refused(model8, inputs, tmp_path):
    from eql_d2.engine.checkpoint import IncompatibleWeightsError

    _, weights20 = _save_model(str(tmp_path / "m20"), 20)
    with pytest.raises(IncompatibleWeightsError, match=f"{weights20}: .*head.cls_score.weight"):
        _main(model8[0], weights20, tmp_path / "vis", str(inputs / "a.png"))
