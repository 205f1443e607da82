"""Starting the processes of a training run.

:func:`launch` takes ``train_net.py``'s parsed arguments and runs ``main(args)``

- in this process, when there is one process;
- in the process that torchrun (or a scheduler, see :mod:`eql_d2.engine.slurm`) started,
  when the environment names its place in the job (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``): the process group is formed from
  the environment (``env://``), nothing is spawned;
- otherwise in ``--num-gpus`` worker processes per machine, as detectron2's ``launch`` does
  (same arguments, same ranks), which end when this process ends.

Processes use NCCL when CUDA is available, gloo otherwise. ``--dist-timeout`` bounds how long
they wait for each other, at the rendezvous and in collectives; a rendezvous that times out
says which ranks arrived. :func:`check_same_config` refuses a job whose processes resolved
different configs.
"""

import ctypes
import datetime
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from .hooks import EXIT_STOPPED, STOP_SIGNALS

__all__ = ["launch", "add_launch_arguments", "distributed_environment", "init_distributed",
           "check_same_config", "set_parent_death_signal", "DEFAULT_TIMEOUT_S"]

logger = logging.getLogger(__name__)

# detectron2's launch default: long enough for the slowest first iteration or evaluation
DEFAULT_TIMEOUT_S = 1800

# What the environment of a process started by torchrun must hold.
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Config keys that may differ between machines of one job (local paths).
PER_MACHINE_KEYS = ("OUTPUT_DIR",)

_JOINED_KEY = "eql_d2/rendezvous/rank{}"


def add_launch_arguments(parser):
    """Add ``--dist-timeout SECONDS`` to detectron2's ``default_argument_parser()``."""
    parser.add_argument(
        "--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="how long processes wait for each other: at the rendezvous, where the error "
             "names the ranks that arrived, and in every collective (default %(default)s)")
    return parser


def distributed_environment(environ=None):
    """``{name: value}`` of :data:`ENV_KEYS` when the environment places this process in a
    job (torchrun's variables), else None; ValueError when only some are set."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return None
    missing = [k for k in ENV_KEYS if not environ.get(k)]
    if missing:
        raise ValueError(
            f"RANK / WORLD_SIZE are set but {', '.join(missing)} not: start the processes with "
            "torchrun (python -m torch.distributed.run), which sets all of "
            f"{', '.join(ENV_KEYS)}, or unset RANK and WORLD_SIZE to use --num-gpus")
    return {k: environ[k] for k in ENV_KEYS}


def launch(main_func, args):
    """Run ``main_func(args)`` in the processes `args` describe (see the module docstring).

    A worker that stops at a checkpoint on a signal exits with
    :data:`~eql_d2.engine.hooks.EXIT_STOPPED`, and so does this process.
    """
    timeout = float(getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S))
    env = distributed_environment()
    if env is not None:
        if args.num_gpus != 1 or args.num_machines != 1 or args.machine_rank != 0:
            raise ValueError(
                f"--num-gpus {args.num_gpus} --num-machines {args.num_machines} --machine-rank "
                f"{args.machine_rank} with torchrun's environment (RANK {env['RANK']}, "
                f"WORLD_SIZE {env['WORLD_SIZE']}): the launcher has started the processes; "
                "leave these options out")
        world_size = int(env["WORLD_SIZE"])
        if world_size == 1:
            return main_func(args)
        init_distributed(int(env["RANK"]), world_size, int(env["LOCAL_RANK"]),
                         int(env["LOCAL_WORLD_SIZE"]), "env://", timeout)
        return _run_and_close(main_func, args)
    world_size = args.num_gpus * args.num_machines
    if world_size == 1:
        return main_func(args)
    url = args.dist_url
    if url == "auto":
        if args.num_machines != 1:
            raise ValueError("--dist-url auto picks a port on this machine: with "
                             "--num-machines > 1 give tcp://<address of machine 0>:<port>")
        url = f"tcp://127.0.0.1:{_free_port()}"
    _spawn(main_func, args, args.num_gpus, args.num_machines, args.machine_rank, url, timeout)


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run_and_close(main_func, args):
    try:
        result = main_func(args)
    except SystemExit as e:
        if e.code == EXIT_STOPPED:
            dist.destroy_process_group()
        raise
    # an exception leaves the group alone: destroying it may wait on peers that still
    # expect this process in a collective
    dist.destroy_process_group()
    return result


def _spawn(main_func, args, num_local, num_machines, machine_rank, url, timeout):
    """Start `num_local` workers and wait for them. Stop signals sent to this process are
    passed on to them; they stop at a checkpoint (:class:`~eql_d2.engine.hooks.StopOnSignal`)
    and this process exits as they do."""
    context = mp.start_processes(
        _worker, nprocs=num_local, join=False, start_method="spawn",
        args=(main_func, args, num_local, num_machines, machine_rank, url, timeout, os.getpid()))
    received = []

    def forward(signum, frame):
        received.append(signum)
        for process in context.processes:
            if process.exitcode is None:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        # join() has ended every worker by now
        if e.exit_code == EXIT_STOPPED:
            sys.exit(EXIT_STOPPED)
        if received and e.exit_code == -received[0]:
            # killed before training began, or while it evaluated after the last iteration
            sys.exit(128 + received[0])
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _worker(local_rank, main_func, args, num_local, num_machines, machine_rank, url, timeout,
            parent):
    set_parent_death_signal(parent)
    init_distributed(machine_rank * num_local + local_rank, num_machines * num_local,
                     local_rank, num_local, url, timeout)
    _run_and_close(main_func, args)


def set_parent_death_signal(parent, signum=signal.SIGKILL):
    """End this process with `signum` when process `parent` (its parent) ends, however it
    ends: PR_SET_PDEATHSIG on Linux, a thread that watches the parent's id elsewhere."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker may outlive "
                           "its launcher", ctypes.get_errno())
    else:
        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os.kill(os.getpid(), signum)
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent ended before the signal was armed
        os.kill(os.getpid(), signum)


def init_distributed(rank, world_size, local_rank, local_world_size, url, timeout):
    """Form the default process group (NCCL on CUDA, gloo otherwise) and detectron2's local
    process group of this machine's `local_world_size` processes.

    `url`: ``tcp://host:port``, ``env://`` (``MASTER_ADDR`` / ``MASTER_PORT``) or ``file://``.
    For the first two the processes first meet at a store on rank 0, so that a missing
    process is reported by rank after `timeout` seconds (torch reports a count).
    """
    cuda = torch.cuda.is_available()
    if cuda:
        if local_world_size > torch.cuda.device_count():
            raise ValueError(f"{local_world_size} processes on this machine, but it has "
                             f"{torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
    wait = datetime.timedelta(seconds=timeout)
    store = _rendezvous(url, rank, world_size, timeout)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=None if store else url,
                            store=store, rank=rank, world_size=world_size, timeout=wait)
    comm.create_local_process_group(local_world_size)
    comm.synchronize()


def _rendezvous(url, rank, world_size, timeout):
    """A TCPStore on which all `world_size` ranks have registered, or None for init methods
    this does not handle (``file://``; torchrun's agent store, where the agents have met)."""
    if url == "env://":
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return None
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    elif url.startswith("tcp://"):
        host, _, port = url[len("tcp://"):].rpartition(":")
        host, port = host.strip("[]"), int(port)
    else:
        return None
    where = f"{host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        store = dist.TCPStore(host, port, is_master=rank == 0, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, OSError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
        if rank == 0:
            raise RuntimeError(f"rank 0 could not open the rendezvous at {where} "
                               f"(--dist-url): {e}") from e
        raise TimeoutError(
            f"rank {rank} could not reach rank 0's rendezvous at {where} within {timeout:g} s "
            f"(--dist-timeout): is the process with rank 0 (--machine-rank 0) running, and is "
            f"{where} its address? ({e})") from e
    store.set(_JOINED_KEY.format(rank), socket.gethostname())
    while True:
        joined = [r for r in range(world_size) if store.check([_JOINED_KEY.format(r)])]
        if len(joined) == world_size:
            return store
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    hosts = {r: store.get(_JOINED_KEY.format(r)).decode() for r in joined}
    missing = [r for r in range(world_size) if r not in hosts]
    raise TimeoutError(
        f"rank {rank}: {len(joined)} of {world_size} processes reached the rendezvous at {where} "
        f"within {timeout:g} s (--dist-timeout): "
        + ", ".join(f"rank {r} on {h}" for r, h in hosts.items())
        + f"; missing ranks {_ranges(missing)}. Start every machine's command (the same "
        "--num-gpus, --num-machines and --dist-url; --machine-rank 0 to N-1)")


def _ranges(ranks):
    if len(ranks) > 8:
        return f"{', '.join(map(str, ranks[:8]))}, ... ({len(ranks)} in all)"
    return ", ".join(map(str, ranks))


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = repr(value)
    return out


def check_same_config(cfg, **settings):
    """Refuse (ValueError on every process) a job whose processes resolved different configs.

    Compares `cfg` flattened to ``{KEY: value}`` (except :data:`PER_MACHINE_KEYS`) and the
    keyword `settings` (e.g. ``resume=args.resume``) across processes: one hash each first,
    the values only when the hashes differ. The error names the keys that differ and each
    rank's value. Nothing is done in a single process.
    """
    if comm.get_world_size() == 1:
        return
    values = {k: v for k, v in _flatten(cfg).items() if k not in PER_MACHINE_KEYS}
    values.update({f"--{k.replace('_', '-')}": repr(v) for k, v in settings.items()})
    digest = hashlib.sha256(repr(sorted(values.items())).encode()).hexdigest()
    if len(set(comm.all_gather(digest))) == 1:
        return
    every = comm.all_gather(values)
    keys = sorted(set().union(*every))
    differ = [k for k in keys if len({v.get(k, "<absent>") for v in every}) > 1]
    shown = differ[:10]
    lines = [f"  {k}: " + ", ".join(f"rank {r} {v.get(k, '<absent>')}" for r, v in enumerate(every))
             for k in shown]
    more = f"\n  ... ({len(differ)} keys in all)" if len(differ) > len(shown) else ""
    raise ValueError(
        f"The {len(every)} processes of this job resolved different configs, which would train "
        f"different models in lock-step; the keys that differ ({', '.join(shown)}):\n"
        + "\n".join(lines) + more
        + "\nGive every machine the same config file, overrides and --resume / --eval-only")
