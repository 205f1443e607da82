#!/usr/bin/env python
"""Train or evaluate an eql_d2 detector.

    python train_net.py --config-file configs/Synthetic-LT/mask_rcnn_R18_FPN_d2heads_sigmoid.yaml
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file CFG --num-gpus 8             # one machine, 8 GPUs
    python train_net.py --config-file CFG --num-gpus 8 --num-machines 2 --machine-rank 0 \
        --dist-url tcp://<host of rank 0>:<port>                      # and rank 1 on the other
"""

import os

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import eql_d2.modeling  # noqa: F401  (registers eql_d2's models)
from eql_d2.config import get_eql_cfg
from eql_d2.data import register_all
from eql_d2.engine import AtomicCheckpointer, Trainer, prepare_datasets
from eql_d2.utils.io import write_json_atomic


def setup(args):
    cfg = get_eql_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup configures detectron2's loggers only; eql_d2's (EQL's tail ratio at
    # start, dataset generation) need their own handler to reach the console and log.txt.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="eql_d2")
    return cfg


def summarize(results):
    """One line per dataset and task with the numbers long-tailed work is judged by."""
    keys = ("AP", "AP50", "APr", "APc", "APf")
    lines = []
    for dataset, tasks in results.items():
        if not isinstance(tasks, dict):
            continue
        for task, m in tasks.items():
            if isinstance(m, dict):
                vals = "  ".join(f"{k} {m[k]:.2f}" for k in keys if k in m)
                lines.append(f"[{dataset} {task}] {vals}")
    return "\n".join(lines)


def main(args):
    register_all()
    cfg = setup(args)
    # evaluation needs only the test sets: a trained model's config and checkpoint hold the
    # rest, so the training JSON may be absent
    prepare_datasets(cfg, training=not args.eval_only)
    if args.eval_only:
        weights = cfg.MODEL.WEIGHTS
        if not weights or not (os.path.isfile(weights) or "://" in weights):
            raise FileNotFoundError(f"--eval-only: MODEL.WEIGHTS file not found: {weights!r}")
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(weights, resume=args.resume)
        results = Trainer.test(cfg, model)
        metrics_file = "eval_metrics.json"
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
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
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
