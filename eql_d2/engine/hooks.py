"""Training hooks of eql_d2's Trainer."""

import json
import logging
import os
import random
import signal
import threading

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.train_loader import SEED_TRAIN_STEP, derive_seed
from ..utils.io import atomic_write

__all__ = ["EXIT_STOPPED", "STOP_SIGNALS", "RegimeIndicatorWriter", "SeedEachIteration",
           "StopOnSignal", "TrainingStopped"]

logger = logging.getLogger(__name__)

# Exit status of a run stopped by a signal at a checkpoint, which ``--resume`` continues
# (sysexits.h's EX_TEMPFAIL: "a temporary failure; the user is invited to retry").
EXIT_STOPPED = 75

# Signals that stop training at the next iteration boundary with a checkpoint: SIGTERM (what
# schedulers, torchrun and container runtimes send first), SIGUSR1 (Slurm's usual
# ``--signal``) and SIGUSR2 (submitit's time-out and pre-emption signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class TrainingStopped(SystemExit):
    """Training stopped at a checkpoint on `signals`; the process exits with
    :data:`EXIT_STOPPED`."""

    def __init__(self, signals):
        super().__init__(EXIT_STOPPED)
        self.signals = tuple(signals)


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


class StopOnSignal(HookBase):
    """Stop training at an iteration boundary when a process receives one of `signals`.

    During training the signals only set a flag. After every iteration the processes
    combine their flags (an all-reduce of a few bytes over gloo, so it never waits for a GPU),
    so a signal delivered to any one of them stops all of them after the same iteration:
    the main process saves ``model_<iteration>.pth`` (atomically, unless the periodic
    checkpointer has just saved it), every process waits for that file, and
    :class:`TrainingStopped` ends the run with :data:`EXIT_STOPPED`.

    After the last iteration (``model_final.pth`` is written by then) the signals get back
    their previous handlers, and one that arrived in that iteration is delivered again, so
    the final evaluation can be interrupted as usual; ``--resume`` then only evaluates.

    Register it after every other hook, so that their ``after_step`` has run for the
    iteration the checkpoint records.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self._received = set()
        self._previous = {}
        self._group = None
        self._stopped = False

    def _on_signal(self, signum, frame):
        self._received.add(signum)

    def _restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def before_train(self):
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread, where Python cannot take "
                           "signals: %s will not stop it at a checkpoint",
                           ", ".join(signal.Signals(s).name for s in self.signals))
            return
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.signals}
        if comm.get_world_size() > 1:
            self._group = (None if dist.get_backend() == "gloo"
                           else dist.new_group(backend="gloo"))

    def after_step(self):
        if not self._previous:
            return
        iteration = self.trainer.iter
        if iteration >= self.trainer.max_iter - 1:
            received = sorted(self._received)
            self._restore()
            for signum in received:
                signal.raise_signal(signum)
            return
        flags = torch.tensor([s in self._received for s in self.signals], dtype=torch.uint8)
        if comm.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        if not flags.any():
            return
        stopped = [s for s, f in zip(self.signals, flags.tolist()) if f]
        names = ", ".join(signal.Signals(s).name for s in stopped)
        checkpointer = self.trainer.checkpointer
        name = f"model_{iteration:07d}"
        if comm.is_main_process():
            logger.warning("%s received: stopping after iteration %d of %d with checkpoint "
                           "%s.pth (exit status %d; --resume continues)", names, iteration + 1,
                           self.trainer.max_iter, name, EXIT_STOPPED)
            last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else ""
            if os.path.basename(last) != f"{name}.pth":
                checkpointer.save(name, iteration=iteration)
        if comm.get_world_size() > 1:
            # no process may end before the checkpoint is on disk: launchers stop the
            # others as soon as one exits
            dist.barrier(group=self._group)
        self._stopped = True
        raise TrainingStopped(stopped)

    def after_train(self):
        # After a stop the handlers stay until the process exits, so that a signal that
        # comes now (a launcher forwarding one) changes nothing.
        if not self._stopped:
            self._restore()
