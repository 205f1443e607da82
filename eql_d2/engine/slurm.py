"""Training as a Slurm job through submitit (``pip install -e .[slurm]``).

A job has one Slurm task per process (``tasks_per_node`` = GPUs per node): Slurm then starts,
signals and accounts for every rank itself, with no spawning parent that would have to pass
signals on, and each task forms the process group from its place in the job, as under
torchrun (:func:`eql_d2.engine.launch.launch`, ``env://``).

Pre-emption and time-out: submitit's signal (SIGUSR2, sent by Slurm ``--signal`` before the
time limit, or on pre-emption where the cluster sends user signals) stops training at the
next iteration boundary with a checkpoint (:class:`~eql_d2.engine.hooks.StopOnSignal`); then
submitit's handler calls :meth:`TrainJob.checkpoint`, which returns the same job with
``--resume``, and requeues it. SIGTERM and SIGUSR1 stop at a checkpoint without a requeue
(exit status 75).
"""

import logging
import os
import signal

from ..utils.io import load_script as _load_any_script
from .hooks import TrainingStopped
from .launch import launch

__all__ = ["TrainJob", "load_script"]

logger = logging.getLogger(__name__)


def _preemption_signal():
    import submitit

    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def load_script(path):
    """The training script at `path` as a module (``train_net.py`` is not on the path)."""
    return _load_any_script(path, "eql_d2_train_script")


class TrainJob:
    """What submitit runs in every task: ``main`` of the training script `script` (a file
    defining ``argument_parser()`` and ``main(args)``, as ``train_net.py`` does) on the
    command-line arguments `argv`, with ``--resume`` first when `resume`.

    `port`: the rendezvous port on the first node (default: ``MASTER_PORT`` of the job's
    environment, else one derived from the job id, the same after a requeue).
    """

    def __init__(self, script, argv, *, resume=False, port=None):
        self.script = os.path.abspath(script)
        self.argv = list(argv)
        self.resume = bool(resume)
        self.port = port

    def command_line(self):
        """The arguments the script is run with."""
        resume = ["--resume"] if self.resume and "--resume" not in self.argv else []
        return resume + self.argv  # options before the config overrides (argparse REMAINDER)

    def __call__(self):
        import submitit

        job = submitit.JobEnvironment()
        if self.port is not None:
            os.environ["MASTER_PORT"] = str(self.port)
        place = submitit.helpers.TorchDistributedEnvironment()
        os.environ.update(MASTER_ADDR=place.master_addr, MASTER_PORT=str(place.master_port),
                          RANK=str(place.rank), WORLD_SIZE=str(place.world_size),
                          LOCAL_RANK=str(place.local_rank),
                          LOCAL_WORLD_SIZE=str(place.local_world_size))
        logger.info("Slurm job %s: rank %d of %d, node %d of %d, rendezvous %s:%d",
                    job.job_id, place.rank, place.world_size, job.node, job.num_nodes,
                    place.master_addr, place.master_port)
        # submitit's checkpoint-and-requeue handler, which training replaces while it runs
        preemption = _preemption_signal()
        requeue = signal.getsignal(preemption)
        script = load_script(self.script)
        args = script.argument_parser().parse_args(self.command_line())
        try:
            return launch(script.main, args)
        except TrainingStopped as stop:
            if preemption in stop.signals and callable(requeue):
                # the first task writes checkpoint()'s submission and requeues the job
                # (it exits there); the others end here
                requeue(preemption, None)
            raise

    def checkpoint(self, *args, **kwargs):
        """The job to requeue: the same command with ``--resume``."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            TrainJob(self.script, self.argv, resume=True, port=self.port))
