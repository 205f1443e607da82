"""Training iteration time of ATSS + EFL vs ATSS + focal, measured side by side.

    python benchmarks/one_stage_speed.py [--rounds 12] [--config-dir configs/Synthetic-LT]

Both models are built from the Synthetic-LT configs with the same initial weights and train
on the same Synthetic-LT batches (batch 8, 160 px). Each round runs one full iteration
(forward, backward, SGD step) of each model, alternating which goes first, so that load
from other processes hits both alike. Prints the median time per iteration of each and
the EFL / focal ratio.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eql_d2.modeling  # noqa: E402,F401
from eql_d2.config import get_eql_cfg  # noqa: E402
from eql_d2.engine import prepare_datasets  # noqa: E402


def load_cfg(path):
    cfg = get_eql_cfg(path)
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--config-dir", default="configs/Synthetic-LT")
    args = parser.parse_args()

    cfgs = {loss: load_cfg(os.path.join(args.config_dir, f"atss_R18_FPN_{loss}.yaml"))
            for loss in ("focal", "efl")}
    prepare_datasets(cfgs["focal"])
    loader = iter(build_detection_train_loader(cfgs["focal"]))
    batches = [next(loader) for _ in range(args.warmup + args.rounds)]

    models, opts = {}, {}
    for loss, cfg in cfgs.items():
        torch.manual_seed(0)
        models[loss] = build_model(cfg).train()
        opts[loss] = torch.optim.SGD(models[loss].parameters(), lr=1e-3, momentum=0.9)
    # same seed, same parameters (the losses add buffers only); checked, not assumed
    focal_params = dict(models["focal"].named_parameters())
    for name, p in models["efl"].named_parameters():
        if not torch.equal(p, focal_params[name]):
            raise RuntimeError(f"initial weights differ at {name}")

    def step(loss, batch):
        t = time.perf_counter()
        losses = models[loss](batch)
        opts[loss].zero_grad()
        sum(losses.values()).backward()
        opts[loss].step()
        return time.perf_counter() - t

    times = {"focal": [], "efl": []}
    with EventStorage():
        for i, batch in enumerate(batches):
            order = ("focal", "efl") if i % 2 == 0 else ("efl", "focal")
            for loss in order:
                dt = step(loss, batch)
                if i >= args.warmup:
                    times[loss].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"threads {torch.get_num_threads()}, {args.rounds} rounds after {args.warmup} warm-up")
    for k in ("focal", "efl"):
        print(f"ATSS+{k}: median {med[k]:.3f} s/iter (min {min(times[k]):.3f}, max {max(times[k]):.3f})")
    print(f"EFL / focal: {med['efl'] / med['focal']:.3f}")


if __name__ == "__main__":
    main()
