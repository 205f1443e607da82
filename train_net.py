#!/usr/bin/env python
"""Train or evaluate an eql_d2 detector.

    python train_net.py --config-file configs/Synthetic-LT/mask_rcnn_R18_FPN_d2heads_sigmoid.yaml
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CFG --num-gpus 8             # one machine, 8 GPUs
    python train_net.py --config-file CFG --num-gpus 8 --num-machines 2 --machine-rank 0 \
        --dist-url tcp://<host of rank 0>:<port>                      # and rank 1 on the other
    torchrun --nproc_per_node 8 train_net.py --config-file CFG        # processes from torchrun

SIGTERM, SIGUSR1 or SIGUSR2 stop training at a checkpoint with exit status 75 (--resume
continues); see docs/GETTING_STARTED.md. Slurm: tools/slurm_train.py.
"""

import contextlib
import os

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import eql_d2.modeling  # noqa: F401  (registers eql_d2's models)
from eql_d2.config import get_eql_cfg
from eql_d2.data import register_all
from eql_d2.data.classification import (is_classification, prepare_classification_datasets,
                                        register_classification_datasets)
from eql_d2.engine import (AtomicCheckpointer, ClassificationTrainer, Trainer,
                           add_launch_arguments, check_same_config, launch, prepare_datasets)
from eql_d2.engine.ema import load_ema_for_evaluation
from eql_d2.utils.io import atomic_write, write_json_atomic


def check_config(cfg, args):
    """Refuse, before anything is written, what cannot run on this machine or does nothing."""
    if args.eval_only and not cfg.DATASETS.TEST:
        raise ValueError("--eval-only: DATASETS.TEST is empty, so there is nothing to evaluate; "
                         "name the test sets, e.g. DATASETS.TEST \"('synthetic_lt_val',)\"")
    if (not args.eval_only and cfg.SOLVER.AMP.ENABLED
            and not (torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"))):
        # detectron2's AMPTrainer asserts CUDA in its first iteration (torch.cuda.amp)
        where = ("this machine has no CUDA device" if not torch.cuda.is_available()
                 else f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r}")
        raise ValueError(f"SOLVER.AMP.ENABLED True trains with detectron2's AMPTrainer, which "
                         f"needs CUDA, but {where}; set SOLVER.AMP.ENABLED False")


def build_config(args):
    cfg = get_eql_cfg(args.config_file, args.opts)
    cfg.freeze()
    check_config(cfg, args)
    return cfg


def setup(args, cfg=None):
    """The checked config (built from `args` unless given), with detectron2's and
    eql_d2's logging set up and the config written to OUTPUT_DIR/config.yaml."""
    cfg = cfg if cfg is not None else build_config(args)
    default_setup(cfg, args)
    # default_setup configures detectron2's loggers only; eql_d2's (EQL's tail ratio at
    # start, dataset generation) need their own handler to reach the console and log.txt.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="eql_d2")
    return cfg


def summarize(results):
    """One line per dataset and task with the numbers long-tailed work is judged by."""
    keys = ("AP", "AP50", "APr", "APc", "APf", "AP1", "AP2", "AP3", "AP4", "AP5",
            "top1", "top5", "many", "medium", "few")
    lines = []
    for dataset, tasks in results.items():
        if not isinstance(tasks, dict):
            continue
        for task, m in tasks.items():
            if isinstance(m, dict):
                vals = "  ".join(f"{k} {m[k]:.2f}" for k in keys if k in m)
                lines.append(f"[{dataset} {task}] {vals}")
    return "\n".join(lines)


@contextlib.contextmanager
def config_kept_on_failure(cfg, args):
    """For ``--resume``: put back the run's ``config.yaml`` (which detectron2's
    default_setup overwrites) when the block fails, so a refused resume leaves the run's
    record of how it was trained as it was."""
    path = os.path.join(cfg.OUTPUT_DIR, "config.yaml") if cfg.OUTPUT_DIR else None
    previous = None
    if args.resume and comm.is_main_process() and path and os.path.isfile(path):
        with open(path, "rb") as f:
            previous = f.read()
    try:
        yield
    except BaseException:
        if previous is not None:
            with atomic_write(path, "wb") as f:
                f.write(previous)
        raise


def argument_parser():
    """detectron2's ``default_argument_parser`` with ``--dist-timeout``."""
    return add_launch_arguments(default_argument_parser())


def main(args):
    register_all()
    register_classification_datasets()
    cfg = build_config(args)
    # image classifiers (EQL sec. 6) train on their own datasets through the same loop
    trainer_class, prepare = ((ClassificationTrainer, prepare_classification_datasets)
                              if is_classification(cfg) else (Trainer, prepare_datasets))
    # before anything is written: processes with different configs would train in lock-step
    check_same_config(cfg, resume=args.resume, eval_only=args.eval_only)
    with config_kept_on_failure(cfg, args):
        setup(args, cfg)
        # evaluation needs only the test sets: a trained model's config and checkpoint hold
        # the rest, so the training JSON may be absent
        prepare(cfg, training=not args.eval_only)
        if args.eval_only:
            weights = cfg.MODEL.WEIGHTS
            if not weights or not (os.path.isfile(weights) or "://" in weights):
                raise FileNotFoundError(f"--eval-only: MODEL.WEIGHTS file not found: {weights!r}")
            model = trainer_class.build_model(cfg)
            # weights that do not fit the model are an error (eql_d2.engine.checkpoint)
            rest = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR, for_inference=True,
                                      weights_partial=cfg.MODEL.WEIGHTS_PARTIAL).resume_or_load(
                weights, resume=args.resume)
            # MODEL_EMA.ENABLED: the EMA weights the training evaluated with
            load_ema_for_evaluation(cfg, model, rest, weights)
        else:
            trainer = trainer_class(cfg)
            trainer.resume_or_load(resume=args.resume)
    if args.eval_only:
        results = trainer_class.test(cfg, model)
        metrics_file = "eval_metrics.json"
    else:
        results = trainer.train()
        metrics_file = "final_metrics.json"
    if comm.is_main_process() and results:
        if len(cfg.DATASETS.TEST) == 1:  # DefaultTrainer.test unwraps a single dataset
            results = {cfg.DATASETS.TEST[0]: results}
        write_json_atomic(os.path.join(cfg.OUTPUT_DIR, metrics_file), results, indent=1,
                          sort_keys=True)
        print(summarize(results), flush=True)
    return results


if __name__ == "__main__":
    launch(main, argument_parser().parse_args())
