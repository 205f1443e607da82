"""Helpers the tests share: paths, config overrides that shrink runs, subprocess and
multi-process runners, synthetic batches (the fixtures are in conftest.py)."""

import json
import os
import subprocess
import sys
import tempfile

import torch

# the repository (this file is tests/helpers.py)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small Synthetic-LT (8 categories: 2 rare, 3 common, 3 frequent; 64 px) for fast tests.
SMALL_SPEC = dict(num_categories=8, image_size=64, max_frequent_images=110, val_instances=2, seed=3)


def run_train_net(args, env_extra=None, timeout=600, script="train_net.py"):
    """Run train_net.py (or another script of the repository) in a fresh process; returns
    CompletedProcess (text output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


# Overrides that shrink the Synthetic-LT R-CNN configs to a few seconds on CPU.
TINY_RCNN = [
    "MODEL.ROI_HEADS.NUM_CLASSES", "8",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "DATALOADER.NUM_WORKERS", "0",
]


# Overrides that shrink the Synthetic-LT one-stage configs (ATSS, RetinaNet) the same way.
TINY_ONE_STAGE = [
    "MODEL.ATSS.NUM_CLASSES", "8", "MODEL.RETINANET.NUM_CLASSES", "8",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ATSS.NUM_CONVS", "1", "MODEL.RETINANET.NUM_CONVS", "1",
    "MODEL.CLS_LOSS.LOG_PERIOD", "1",
    # at 64 px P7 is 1x1, and GroupNorm refuses one value per group on a batch of one image
    # (evaluation); the GN head is covered by tests/test_one_stage.py
    "MODEL.ATSS.NORM", "", "MODEL.RETINANET.NORM", "",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
    "SOLVER.STEPS", "()",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "50",
]

# the small Synthetic-LT's 8 classes on a YOLOX of width 0.125 at 64 px, 3 iterations
TINY_YOLOX = [
    "MODEL.YOLOX.NUM_CLASSES", "8", "MODEL.CSPDARKNET.WIDTH_MULTIPLIER", "0.125",
    "MODEL.YOLOX.HEAD_CHANNELS", "16", "MODEL.CLS_LOSS.LOG_PERIOD", "1",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "50",
]


def register_small(small_synthetic, prefix):
    """Register the small Synthetic-LT's splits as `<prefix>_train` / `<prefix>_val` (once)
    with their category metadata loaded; returns the two names."""
    from detectron2.data import DatasetCatalog

    from eql_d2.data import load_category_metadata, register_lvis_format

    names = (f"{prefix}_train", f"{prefix}_val")
    for name, split in zip(names, ("train", "val")):
        if name not in DatasetCatalog.list():
            register_lvis_format(name, os.path.join(small_synthetic, f"lvis_v1_{split}.json"),
                                 small_synthetic)
        load_category_metadata(name)
    return names


def tree_digest(root):
    """sha256 over every file of the folder `root` (relative paths and bytes, in sorted order)."""
    import hashlib

    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def load_split(root, split):
    """The parsed ``lvis_v1_<split>.json`` of a generated dataset folder."""
    import json

    with open(os.path.join(root, f"lvis_v1_{split}.json")) as f:
        return json.load(f)


def load_script(path, name=None, register=False):
    """A script of the repository (`path` relative to its root, e.g. "tools/ensemble.py") as
    a module named `name` (default: the file's stem); `register` also puts it in
    sys.modules under that name, for scripts whose siblings import it by name."""
    import importlib.util

    name = name or os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def assert_same_final_model(run_a, run_b):
    """The model_final.pth of two runs hold equal tensors, EQL / EQLv2 statistics (which must
    have accumulated) included, and equal optimizer state; returns both checkpoints."""
    a, b = (torch.load(os.path.join(d, "model_final.pth"), map_location="cpu",
                       weights_only=False) for d in (run_a, run_b))
    assert set(a["model"]) == set(b["model"])
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, differ[:10]
    stats = [k for k in a["model"] if k.endswith(("pos_grad", "neg_grad"))]
    assert stats and all(a["model"][k].sum() > 0 for k in stats)
    opt_a, opt_b = (c["trainer"]["_trainer"]["optimizer"]["state"] for c in (a, b))
    assert opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    return a, b


def train_on_small(cfg, opts, small_synthetic, out):
    """train_net.py: `cfg` with `opts` on the small Synthetic-LT (one thread: a tiny model
    runs no faster on two, and the machine may be shared) into `out`. Returns the final
    metrics (checked to hold AP, APr, APc and APf), model_final.pth's model state and the
    environment, for :func:`assert_eval_only_reproduces`."""
    env = {"EQL_D2_SYNTHETIC_ROOT": small_synthetic, "OMP_NUM_THREADS": "1"}
    proc = run_train_net(["--config-file", cfg, *opts, "OUTPUT_DIR", out], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "final_metrics.json")) as f:
        final = json.load(f)
    for key in ("AP", "APr", "APc", "APf"):
        assert isinstance(final["synthetic_lt_val"]["bbox"][key], float)
    state = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu",
                       weights_only=False)["model"]
    return final, state, env


def assert_eval_only_reproduces(cfg, opts, out, env, final):
    """``--eval-only`` of the run in `out` from its model_final.pth alone gives its
    `final` metrics and the same detections (short runs have AP near 0, so the detections
    themselves are compared)."""
    proc = run_train_net(["--config-file", cfg, "--eval-only", *opts, "MODEL.WEIGHTS",
                          os.path.join(out, "model_final.pth"), "OUTPUT_DIR",
                          os.path.join(out, "eval")], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "eval", "eval_metrics.json")) as f:
        assert json.load(f) == final
    dets = [os.path.join(d, "inference", "synthetic_lt_val", "lvis_instances_results.json")
            for d in (out, os.path.join(out, "eval"))]
    with open(dets[0]) as f, open(dets[1]) as g:
        trained, evaluated = json.load(f), json.load(g)
    assert trained and trained == evaluated


def last_checkpoint(out):
    """The checkpoint a run folder's ``last_checkpoint`` names, or None (none written yet)."""
    try:
        with open(os.path.join(out, "last_checkpoint")) as f:
            return f.read().strip()
    except OSError:
        return None


def free_port():
    """A TCP port on the loopback interface that is free now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world_size, url, out_dir, run, num_rows, kwargs):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        share = num_rows // world_size
        result = run(slice(rank * share, (rank + 1) * share), **kwargs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_gloo_workers(run, num_rows, world_size=2, **kwargs):
    """Run ``run(rows, **kwargs)`` in `world_size` gloo processes, each on its equal share of
    `num_rows` rows (a slice); returns their results in rank order. `run` must be a
    module-level function (the processes are spawned)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gloo_worker, nprocs=world_size, join=True,
                 args=(world_size, f"tcp://127.0.0.1:{free_port()}", out_dir, run, num_rows,
                       kwargs))
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


def dense_batch(num_classes, seed=0, num_images=2, size=64):
    """Model inputs with 3 random boxes of 10-28 px per image (one image without boxes when
    num_images >= 3), classes in 0..num_classes-1, random pixels."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(num_images):
        n = 0 if (i == 0 and num_images > 2) else 3
        xy = torch.rand(n, 2, generator=g) * (size - 30)
        wh = 10 + torch.rand(n, 2, generator=g) * 18
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        batch.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": inst})
    return batch


def matched_iou(a, b):
    """IoU of each row of a [P, 4] with the same row of b [P, 4] (XYXY), written out."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def dense_forward(model, batch, num_classes):
    """A dense detector's training-side view of a batch, outside its forward: the head's
    per-level predictions transposed to (N, R_l, K) for K in (classes, 4, 1) (ATSS: logits,
    deltas, IoU; FCOS: logits, deltas, centerness), the anchors, and the anchor labels and
    matched boxes of ``label_anchors``."""
    images = model.preprocess_image(batch)
    feats = model.backbone(images.tensor)
    feats = [feats[f] for f in model.head_in_features]
    preds = model._transpose_dense_predictions(model.head(feats), [num_classes, 4, 1])
    anchors = model.anchor_generator(feats)
    labels, gt_boxes = model.label_anchors(anchors, [b["instances"] for b in batch])
    return preds, anchors, labels, gt_boxes


def seeded_model(cfg, seed=0):
    """detectron2's build_model(cfg) after torch.manual_seed(seed)."""
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    return build_model(cfg)


def sgd_steps(model, batches, lr=0.01):
    """Plain SGD steps in an EventStorage; returns (the loss dicts, detached, of each step,
    the storage)."""
    from detectron2.utils.events import EventStorage

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = []
    with EventStorage() as storage:
        for batch in batches:
            losses = model(batch)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            history.append({k: v.detach().clone() for k, v in losses.items()})
            storage.step()
    return history, storage


def record_criterion_calls(model):
    """List that receives, per call of a dense detector's classification loss
    (``model.cls_loss.criterion``), ``((logits [M, C], labels [M], avg_factor, quality or
    None), gamma)`` with the focusing factor gamma^j in force for that call (None for
    losses without one)."""
    calls = []
    crit = model.cls_loss.criterion

    def hook(module, args, kwargs):
        gamma = crit.focusing_factor.clone() if hasattr(crit, "focusing_factor") else None
        logits, labels = args[0], args[1]
        quality = args[2] if len(args) > 2 else None
        calls.append(((logits, labels, kwargs["avg_factor"], quality), gamma))
    crit.register_forward_pre_hook(hook, with_kwargs=True)
    return calls
