"""docs/PARITY.md against the configs: every `KEY = VALUE` of a table's "ours" column holds in
every config its section lists, and every difference from the authors gives its reason."""

import ast
import math
import os
import re

import pytest
import torch

from eql_d2.config import get_eql_cfg
from helpers import ROOT

PAGE = os.path.join(ROOT, "docs", "PARITY.md")
SETTING = re.compile(r"`((?:MODEL|SOLVER|DATALOADER|INPUT|TEST)\.[A-Z0-9_.]+) = ([^`]+)`")


def parse_page():
    """[(section title, [config paths], [(setting, ours cell, same cell)])]."""
    sections = []
    with open(PAGE) as f:
        text = f.read()
    for block in text.split("\n## ")[1:]:
        title, body = block.split("\n", 1)
        configs_text = re.search(r"^Configs: (.*?)\n\n", body, re.S | re.M)
        assert configs_text, f"PARITY.md, section {title!r}: no 'Configs:' line"
        configs = re.findall(r"`([^`]+\.yaml)`", configs_text.group(1))
        rows = []
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) == 4 and line.startswith("|") and cells[0] not in ("setting", "---"):
                if set(cells[0]) <= {"-", "|"}:
                    continue
                rows.append((cells[0], cells[2], cells[3]))
        sections.append((title, configs, rows))
    return sections


SECTIONS = parse_page()


def _value(text):
    text = text.strip()
    if text == "None":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _same(ours, want):
    if isinstance(want, (list, tuple)):
        return isinstance(ours, (list, tuple)) and len(ours) == len(want) and all(
            _same(a, b) for a, b in zip(ours, want))
    if isinstance(want, float) or isinstance(ours, float):
        return isinstance(ours, (int, float)) and math.isclose(ours, want, rel_tol=1e-9)
    return ours == want


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


CASES = [(title, rel) for title, configs, _ in SECTIONS for rel in configs]


def test_the_page_covers_the_paper_configs():
    assert len(SECTIONS) >= 5
    listed = {rel for _, rel in CASES}
    for rel in listed:
        assert os.path.isfile(os.path.join(ROOT, "configs", rel)), f"PARITY.md lists {rel}"
    # every LVIS config with the EQL heads or a one-stage head is one of the papers' configs
    for folder in ("LVIS-v1", "LVIS-v1/EQL", "LVIS-v0.5/EQL"):
        for name in os.listdir(os.path.join(ROOT, "configs", folder)):
            rel = f"{folder}/{name}"
            if (name.startswith("Base-") or "_d2heads_" in name or not name.endswith(".yaml")
                    or "_rfs" in name and "EQL" in folder or "_imglabels" in name):
                continue
            assert rel in listed, f"configs/{rel} is a paper config missing from PARITY.md"


@pytest.mark.parametrize("title,rel", CASES)
def test_every_setting_of_the_table_holds_in_the_config(title, rel):
    cfg = get_eql_cfg(os.path.join(ROOT, "configs", rel))
    rows = next(rows for t, _, rows in SECTIONS if t == title)
    checked = 0
    for setting, ours, same in rows:
        for key, text in SETTING.findall(ours):
            value = _get(cfg, key)
            want = _value(text)
            assert _same(value, want), (f"configs/{rel}: {key} is {value!r}, PARITY.md "
                                        f"({title}, {setting}) says {want!r}")
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("title", [t for t, _, _ in SECTIONS])
def test_each_difference_states_its_reason(title):
    rows = next(rows for t, _, rows in SECTIONS if t == title)
    assert rows
    for setting, _, same in rows:
        assert same.startswith(("yes", "no")), f"{title}, {setting}: same? is {same!r}"
        if same.startswith("no"):
            assert len(same.split()) >= 4, f"{title}, {setting}: a difference needs its reason"


def test_variants_differ_only_where_their_names_say():
    base = get_eql_cfg(os.path.join(ROOT, "configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_eqlv2.yaml"))
    rfs = get_eql_cfg(os.path.join(ROOT, "configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_eqlv2_rfs.yaml"))
    img = get_eql_cfg(os.path.join(ROOT,
                                   "configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_eqlv2_imglabels.yaml"))
    assert (rfs.DATALOADER.SAMPLER_TRAIN, rfs.DATALOADER.REPEAT_THRESHOLD,
            rfs.DATALOADER.REPEAT_ROUNDING) == ("RepeatFactorTrainingSampler", 0.001, "ceil")
    assert img.MODEL.IMAGE_LABELS.VERIFIED and not base.MODEL.IMAGE_LABELS.VERIFIED
    for cfg in (rfs, img):
        assert cfg.SOLVER.EPOCHS == base.SOLVER.EPOCHS == 12.0


def test_eqlv2_objectness_prior_sets_the_column_bias():
    from eql_d2.modeling.cls_losses.eql import EQLv2

    for prior, want in ((0.0, math.log(0.75 / 0.25)), (0.001, math.log(0.001 / 0.999))):
        loss = EQLv2(5, objectness_prior=prior)
        bias = torch.zeros(6)
        loss.init_bias(bias, 0.01, 0.75)
        assert bias[:5].tolist() == pytest.approx([math.log(0.01 / 0.99)] * 5)
        assert float(bias[5]) == pytest.approx(want)
    with pytest.raises(ValueError, match="OBJECTNESS_PRIOR must be in"):
        EQLv2(5, objectness_prior=1.0)


def test_eqlv2_scores_with_and_without_the_objectness_factor():
    from eql_d2.config import get_eql_cfg
    from eql_d2.modeling.cls_losses.base import build_cls_loss
    from eql_d2.modeling.cls_losses.eql import EQLv2

    logits = torch.randn(7, 6)
    with_obj = EQLv2(5).scores(logits)
    alone = EQLv2(5, test_objectness=False).scores(logits)
    assert torch.allclose(with_obj, torch.sigmoid(logits[:, :5]) * (1 - torch.sigmoid(logits[:, 5:])))
    assert torch.equal(alone, torch.sigmoid(logits[:, :5]))
    cfg = get_eql_cfg()
    assert cfg.MODEL.CLS_LOSS.EQLV2.TEST_OBJECTNESS is True  # the authors' scores
    cfg.MODEL.CLS_LOSS.NAME = "EQLv2"
    cfg.MODEL.CLS_LOSS.EQLV2.TEST_OBJECTNESS = False
    assert build_cls_loss(cfg, 5, "two_stage").test_objectness is False
