"""Results files: non-finite scores and boxes and boxes of negative size are refused naming
the file and the detection; an empty member is warned about and stays in metrics.json."""

import json
import logging
import math

import pytest

from lvis_cases import det, write_json
from test_ensemble import MEMBER_A, MEMBER_B, run

from eql_d2.evaluation import read_lvis_results


def _bad(**change):
    d = det(1, 1, 11, 10, 20, 20, 0.8)
    d.update(change)
    return d


@pytest.mark.parametrize("bad, message", [
    (_bad(score=math.nan), "detection #1 has non-finite score nan"),
    (_bad(score=math.inf), "detection #1 has non-finite score inf"),
    (_bad(bbox=[11, 10, math.nan, 20]), r"detection #1 has a non-finite bbox \[11, 10, nan, 20\]"),
    (_bad(bbox=[11, 10, 20, -3]), r"detection #1 has a bbox of negative width or height"),
    (_bad(bbox=[11, 10, -1, 20]), r"detection #1 has a bbox of negative width or height"),
])
def test_non_finite_or_negative_detections_are_refused(tmp_path, bad, message):
    member = [MEMBER_B[1], bad]
    with pytest.raises(ValueError, match=message) as err:
        run(tmp_path, [MEMBER_A, member], "--method", "wbf")
    assert "member1.json" in str(err.value)
    assert not (tmp_path / "ens").exists()
    # the reader of results files refuses them the same way
    path = write_json(tmp_path / "bad.json", member)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        read_lvis_results(path, [1, 2], [1, 2])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_empty_member_is_warned_about_and_listed(tmp_path):
    # the tool's own logger, whether or not it propagates (detectron2's setup_logger turns
    # propagation off once some test has set it up)
    logger, records = logging.getLogger("eql_d2.ensemble"), _Records()
    logger.addHandler(records)
    try:
        merged, out, _ = run(tmp_path, [MEMBER_A, []], "--method", "nms")
    finally:
        logger.removeHandler(records)
    warned = [r.getMessage() for r in records.records if "has no detections" in r.getMessage()]
    assert len(warned) == 1 and "'m1_member1'" in warned[0] and "member1.json" in warned[0]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["members"]["m1_member1"] == {}
    assert set(metrics["members"]["m0_member0"]) == {"bbox"}
    counts = {m["name"]: m["num_detections"] for m in metrics["settings"]["members"]}
    assert counts == {"m0_member0": len(MEMBER_A), "m1_member1": 0}
    assert len(merged) == len(MEMBER_A)

