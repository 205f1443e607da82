"""Training iteration time of several configs of one detector, measured side by side.

    python benchmarks/iteration_speed.py configs/Synthetic-LT/atss_R18_FPN_focal.yaml \
        configs/Synthetic-LT/atss_R18_FPN_efl.yaml [--rounds 12] [KEY VALUE ...]
    python benchmarks/iteration_speed.py configs/Synthetic-LT/atss_R18_FPN_efl.yaml \
        --vary MODEL.CLS_LOSS.REGIME_INDICATORS False True
    python benchmarks/iteration_speed.py --first-stage \
        configs/Synthetic-HardTail/EQL/faster_rcnn_R18_FPN_softmax.yaml \
        configs/Synthetic-HardTail/Decoupled/faster_rcnn_R18_FPN_softmax_crt.yaml

The first config (with --vary: the first value) is the baseline. Every model is built with the same seed and trains on the
same batches (the first config's training loader, e.g. Synthetic-LT, batch 8, 160 px). Each
round runs one full iteration (forward, backward, SGD step) of every model, rotating which
goes first, so that load from other processes hits all alike. Prints the median time per
iteration of each and its ratio to the baseline. Trailing KEY VALUE pairs override every
config.
"""

import argparse
import os
import statistics
import time

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import eql_d2.modeling  # noqa: F401
from eql_d2.config import get_eql_cfg
from eql_d2.data import register_all
from eql_d2.engine import Trainer, prepare_datasets


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config files, then KEY VALUE overrides")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vary", nargs="+", metavar=("KEY", "VALUE"),
                        help="one config, one model per VALUE of KEY")
    parser.add_argument("--first-stage", action="store_true",
                        help="the first config is the first stage of the others (decoupled "
                        "second stages): they start from its model's weights, as they would "
                        "from its model_final.pth")
    args = parser.parse_args()
    files = [c for c in args.configs if c.endswith(".yaml")]
    opts = [c for c in args.configs if not c.endswith(".yaml")] + ["DATALOADER.NUM_WORKERS", "0"]
    if args.vary:
        if len(files) != 1 or len(args.vary) < 3:
            parser.error("--vary takes one config file, a KEY and at least two VALUEs")
        key, *values = args.vary
        cfgs = {f"{key}={v}": get_eql_cfg(files[0], [*opts, key, v]) for v in values}
    else:
        if len(files) < 2:
            parser.error("give at least two config files (the first is the baseline)")
        cfgs = {os.path.splitext(os.path.basename(f))[0]: get_eql_cfg(f, opts) for f in files}
    first = next(iter(cfgs.values()))
    register_all()
    prepare_datasets(first)
    loader = iter(Trainer.build_train_loader(first))
    batches = [next(loader) for _ in range(args.warmup + args.rounds)]

    models, optims = {}, {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg).train()
        if args.first_stage and len(models) > 1:
            first_stage = models[next(iter(models))].state_dict()
            models[name].load_state_dict(first_stage, strict=False)
        optims[name] = torch.optim.SGD(models[name].parameters(), lr=1e-3, momentum=0.9)

    def step(name, batch):
        t = time.perf_counter()
        losses = models[name](batch)
        optims[name].zero_grad()
        sum(losses.values()).backward()
        optims[name].step()
        return time.perf_counter() - t

    names = list(cfgs)
    times = {name: [] for name in names}
    with EventStorage():
        for i, batch in enumerate(batches):
            order = names[i % len(names):] + names[: i % len(names)]
            for name in order:
                dt = step(name, batch)
                if i >= args.warmup:
                    times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = names[0]
    print(f"threads {torch.get_num_threads()}, {args.rounds} rounds after {args.warmup} warm-up")
    print("| config | median s/iter | min | max | / " + base + " |")
    print("|---|---|---|---|---|")
    for k in names:
        print(f"| {k} | {med[k]:.3f} | {min(times[k]):.3f} | {max(times[k]):.3f} | "
              f"{med[k] / med[base]:.3f} |")


if __name__ == "__main__":
    main()
