#!/usr/bin/env python
"""Submit train_net.py as a Slurm job with submitit (pip install -e .[slurm]).

    python tools/slurm_train.py --nodes 2 --gpus-per-node 8 --partition PART --timeout-min 4320 \
        --config-file configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_eqlv2_rfs.yaml OUTPUT_DIR output/x

Every option this script does not know goes to train_net.py. The job runs one task per GPU;
on time-out or pre-emption it stops at a checkpoint and requeues itself with --resume
(eql_d2/engine/slurm.py, docs/GETTING_STARTED.md). --cluster local runs the same job on this
machine (submitit's local executor); logs go to --folder.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument("--mem-gb", type=float, default=None)
    parser.add_argument("--timeout-min", type=int, default=4320)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--job-name", default="eql_d2")
    parser.add_argument("--signal-delay-s", type=int, default=120,
                        help="seconds before the time limit at which Slurm sends SIGUSR2")
    parser.add_argument("--max-requeues", type=int, default=10,
                        help="time-outs after which the job is not requeued again")
    parser.add_argument("--port", type=int, default=None, help="rendezvous port on the first node")
    parser.add_argument("--folder", default="output/slurm/%j", help="submitit logs (%%j: job id)")
    parser.add_argument("--cluster", default=None, choices=("slurm", "local", "debug"),
                        help="default: slurm where sbatch is found, else local")
    ours, train_args = parser.parse_known_args(argv)
    if ours.tasks_per_node is None:
        ours.tasks_per_node = ours.gpus_per_node or 1
    return ours, train_args


def main(argv=None):
    ours, train_args = parse(argv)
    import submitit

    from eql_d2.engine.slurm import TrainJob, load_script

    script = os.path.join(ROOT, "train_net.py")
    job = TrainJob(script, train_args, port=ours.port)
    # refuse what train_net.py would refuse in every task, before anything is queued
    args = load_script(script).argument_parser().parse_args(job.command_line())
    if args.num_gpus != 1 or args.num_machines != 1 or args.machine_rank != 0:
        sys.exit("--num-gpus / --num-machines / --machine-rank: the job's processes are "
                 "--nodes x --tasks-per-node; leave these train_net.py options out")
    executor = submitit.AutoExecutor(folder=ours.folder, cluster=ours.cluster,
                                     slurm_max_num_timeout=ours.max_requeues)
    params = dict(nodes=ours.nodes, tasks_per_node=ours.tasks_per_node,
                  gpus_per_node=ours.gpus_per_node, cpus_per_task=ours.cpus_per_task,
                  timeout_min=ours.timeout_min, name=ours.job_name,
                  slurm_signal_delay_s=ours.signal_delay_s)
    if ours.mem_gb is not None:
        params["mem_gb"] = ours.mem_gb
    if ours.partition:
        params["slurm_partition"] = ours.partition
    executor.update_parameters(**params)
    submitted = executor.submit(job)
    print(f"submitted job {submitted.job_id}; logs in {submitted.paths.folder}")
    return submitted


if __name__ == "__main__":
    main()
