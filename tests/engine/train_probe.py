"""train_net.py with a hook that saves, on every rank, the loss statistics after each
iteration and the parameters at the end (OUTPUT_DIR/probe/), for the distributed tests."""

import importlib.util
import os

import torch
from detectron2.engine import HookBase, default_argument_parser, launch
from detectron2.utils import comm

from eql_d2.data import register_all
from eql_d2.engine import Trainer, prepare_datasets

# train_net.py is a script at the repository root, not a module on the path
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("train_net", os.path.join(_ROOT, "train_net.py"))
train_net = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)

STAT_KEYS = ("pos_grad", "neg_grad")


def _unwrapped(model):
    return getattr(model, "module", model)


class SaveRankState(HookBase):
    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _save(self, obj, name):
        torch.save(obj, os.path.join(self.folder, f"rank{comm.get_rank()}_{name}.pt"))

    def after_step(self):
        state = _unwrapped(self.trainer.model).state_dict()
        self._save({k: v.clone() for k, v in state.items() if k.endswith(STAT_KEYS)},
                   f"stats_iter{self.trainer.iter}")

    def after_train(self):
        params = {k: v.detach().clone()
                  for k, v in _unwrapped(self.trainer.model).named_parameters()}
        self._save({"params": params, "writes_checkpoints": self.trainer.checkpointer.save_to_disk,
                    "world_size": comm.get_world_size()}, "final")


def main(args):
    register_all()
    cfg = train_net.setup(args)
    prepare_datasets(cfg)
    trainer = Trainer(cfg)
    trainer.register_hooks([SaveRankState(os.path.join(cfg.OUTPUT_DIR, "probe"))])
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
