"""Reading and summarising the regime indicators that training writes
(``regime_indicators.jsonl``, see :class:`eql_d2.engine.hooks.RegimeIndicatorWriter`)."""

import gzip
import json
import math
import os
import statistics
from typing import Dict, List, Optional

from ..utils.groups import check_groups, group_indices

__all__ = ["read_regime_indicators", "regime_file", "group_summary", "head_names",
           "difference", "since"]

FILE_NAMES = ("regime_indicators.jsonl", "regime_indicators.jsonl.gz")


def regime_file(path: str) -> str:
    """`path` itself if it is a file, else the indicators file in run folder `path`."""
    if os.path.isfile(path):
        return path
    for name in FILE_NAMES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{path}: no {' or '.join(FILE_NAMES)} (written by training with "
                            "MODEL.CLS_LOSS.REGIME_INDICATORS True and LOG_PERIOD > 0)")


def read_regime_indicators(path: str) -> List[dict]:
    """The snapshots of a run (a folder or a .jsonl / .jsonl.gz file), by iteration."""
    path = regime_file(path)
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {line_no} is not JSON ({e})") from e
    if not rows:
        raise ValueError(f"{path}: no snapshots")
    return sorted(rows, key=lambda r: r["iteration"])


def head_names(snapshot: dict) -> List[str]:
    """Module paths of the heads in a snapshot, in a stable order."""
    return sorted(snapshot["heads"])


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def group_summary(snapshot: dict, head: Optional[str] = None) -> Dict[str, dict]:
    """Per LVIS group ("r", "c", "f" in that order, or "all" without class_frequency), over
    the categories that have had a positive: ``seen`` (of ``categories``), ``median_g`` and
    ``min_g`` of the raw gradient ratio pos_grad / neg_grad, ``below_1`` (how many have
    g < 1), ``median_pos_neg`` (positives / negatives seen) and the medians of ``pos_grad``
    and ``neg_grad``. `head`: one of :func:`head_names` (default: the first)."""
    head = head or head_names(snapshot)[0]
    values = snapshot["heads"][head]
    num = len(values["pos_count"])
    if snapshot.get("class_frequency"):
        groups = check_groups(snapshot["class_frequency"], num, "the snapshot's class_frequency")
        indices = {g: idx.tolist() for g, idx in group_indices(groups).items()}
    else:
        indices = {"all": list(range(num))}
    out = {}
    for group, idx in indices.items():
        seen = [j for j in idx if values["pos_count"][j] > 0]
        g = [_ratio(values["pos_grad"][j], values["neg_grad"][j]) for j in seen]
        out[group] = {
            "categories": len(idx), "seen": len(seen),
            "median_g": statistics.median(g) if g else math.nan,
            "min_g": min(g) if g else math.nan,
            "below_1": sum(x < 1 for x in g),
            "median_pos_neg": statistics.median(
                [_ratio(values["pos_count"][j], values["neg_count"][j]) for j in seen])
            if seen else math.nan,
            "median_pos_grad": statistics.median([values["pos_grad"][j] for j in seen])
            if seen else math.nan,
            "median_neg_grad": statistics.median([values["neg_grad"][j] for j in seen])
            if seen else math.nan,
        }
    return out


def difference(later: dict, earlier: dict) -> dict:
    """A snapshot of what happened between two snapshots of one run (buffers subtracted),
    for :func:`group_summary` of a window of training: the gradient ratio of recent steps,
    which the accumulated ratio of the whole run hides behind its early steps."""
    if earlier["iteration"] >= later["iteration"]:
        raise ValueError(f"snapshot of iteration {earlier['iteration']} is not before "
                         f"{later['iteration']}")
    heads = {}
    for name, values in later["heads"].items():
        before = earlier["heads"][name]
        heads[name] = {k: [a - b for a, b in zip(v, before[k])] for k, v in values.items()}
    return {"iteration": later["iteration"], "class_frequency": later.get("class_frequency"),
            "heads": heads}


def since(snapshots: List[dict], start: Optional[int] = None) -> dict:
    """What happened from iteration `start` to a run's last snapshot: the :func:`difference`
    from the last snapshot at or before `start` (the whole run when there is none), e.g. over
    the last evaluation interval. `start` None: over the last interval between snapshots."""
    if not snapshots:
        raise ValueError("no snapshots")
    last = snapshots[-1]
    if start is None:
        return difference(last, snapshots[-2]) if len(snapshots) > 1 else last
    before = [snap for snap in snapshots[:-1] if snap["iteration"] <= start]
    return difference(last, before[-1]) if before else last
