"""Training hooks of eql_d2's Trainer."""

import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.train_loader import SEED_TRAIN_STEP, derive_seed

__all__ = ["SeedEachIteration"]

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
