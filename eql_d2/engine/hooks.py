"""Training hooks of eql_d2's Trainer."""

import json
import logging
import os
import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.train_loader import SEED_TRAIN_STEP, derive_seed
from ..utils.io import atomic_write

__all__ = ["RegimeIndicatorWriter", "SeedEachIteration"]

logger = logging.getLogger(__name__)

class SeedEachIteration(HookBase):
    """Seed python's, numpy's and torch's RNGs before every iteration from (stream seed,
    iteration, rank).

    Training draws from these RNGs (proposal and ROI sampling use torch's); so do things
    between iterations that a resumed run does not repeat (an evaluation builds a data
    loader, which takes a seed from torch's RNG). Seeding each iteration makes iteration k's
    draws the same in a resumed run as in the uninterrupted one, with nothing to save but
    the seed, which the checkpoint's data-stream state carries.
    """

    def __init__(self, train_loader):
        self._loader = train_loader

    def before_step(self):
        seed = derive_seed(SEED_TRAIN_STEP, self._loader.seed, self.trainer.iter, comm.get_rank())
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class RegimeIndicatorWriter(HookBase):
    """Append the model's regime indicators to ``<output_dir>/regime_indicators.jsonl``.

    One JSON line every ``period`` iterations and after the last one::

        {"iteration": k, "class_frequency": ["r", ...] or null,
         "heads": {"<module path>": {"pos_count": [C], "neg_count": [C],
                                     "pos_grad": [C], "neg_grad": [C]}, ...}}

    ``iteration`` counts the iterations done; the values are the accumulated buffers of
    every :class:`~eql_d2.modeling.regime.RegimeIndicators` in the model (one per dense
    head, one per box predictor or Cascade stage), identical on every process. Only the main
    process writes. A resumed run first drops the lines written after the checkpoint it
    resumes from, so the file describes one run.
    """

    FILE_NAME = "regime_indicators.jsonl"

    def __init__(self, period: int, output_dir: str, class_frequency=None):
        self.period = int(period)
        self.path = os.path.join(output_dir, self.FILE_NAME)
        self.class_frequency = None if class_frequency is None else list(class_frequency)

    def _modules(self):
        from ..modeling.regime import RegimeIndicators

        model = self.trainer.model
        model = getattr(model, "module", model)  # DDP
        return {name: m for name, m in model.named_modules() if isinstance(m, RegimeIndicators)}

    def before_train(self):
        if not comm.is_main_process() or not os.path.isfile(self.path):
            return
        done = self.trainer.start_iter
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                iteration = json.loads(line)["iteration"]
            except (ValueError, KeyError, TypeError) as e:
                if number == len(lines):
                    # a run killed while appending leaves its last line cut short
                    logger.warning("%s: dropping its last line %d, which is incomplete (%s)",
                                   self.path, number, e)
                    continue
                raise ValueError(f"{self.path}: line {number} is not a regime-indicator "
                                 f"record ({e}); move the file away to start it afresh") from e
            if iteration <= done:
                kept.append(line)
        if len(kept) != len(lines):
            with atomic_write(self.path) as f:
                f.writelines(kept)

    def after_step(self):
        done = self.trainer.iter + 1
        if not (done % self.period == 0 or done == self.trainer.max_iter):
            return
        if not comm.is_main_process():
            return
        modules = self._modules()
        if not modules:
            return
        line = {"iteration": done, "class_frequency": self.class_frequency,
                "heads": {name: m.snapshot() for name, m in modules.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
