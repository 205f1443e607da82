"""One command for a CUDA machine: loss speed, LVIS-scale training iterations, host syncs.

    python benchmarks/gpu_check.py --out output/gpu_check        # on a CUDA device
    python benchmarks/gpu_check.py --out /tmp/gpu_check          # on CPU: a reduced check

On CUDA:

(a) Losses: the CUDA rows of ``benchmarks/bench_losses.py`` at N x 1203 (N = 100000) for
    EFL and EQLv2, each of ``reference`` (autograd + hook), ``fused-eager`` and
    ``fused-compiled``, in fp32 and AMP (float16 logits, the step under autocast): median
    time of a forward + backward + statistics step and its peak allocation above the inputs
    (``torch.cuda.max_memory_allocated``), using bench_losses' own workers. Each step is
    set against the memory-traffic floor of any such loss, reading the logits once and
    writing their gradient once: the measured time of copying an [N, C] tensor of the
    logits' dtype on the same device (one read + one write of the same bytes), reported as
    "x floor" (step time / copy time) and the step's effective bandwidth 2 N C bytes / time.
(b) Training iterations at LVIS scale: R50-FPN from random init, 1203 classes, batch 2 of
    800 x 1333 random images with 10 random objects each (boxes, polygon masks, LVIS
    image-level labels), built from eql_d2's LVIS v1 configs: Mask R-CNN with the sigmoid
    and EQLv2 classifiers (``configs/LVIS-v1/EQL/``), ATSS with focal loss and EFL, each
    with AMP off and on, stepped by detectron2's ``SimpleTrainer`` / ``AMPTrainer`` as
    ``train_net.py`` does. Reported: median s/iter after warm-up, peak GPU memory, and the
    ratios EQLv2 / sigmoid and EFL / focal. No dataset and no pretrained weights are needed
    (the training set's category counts are an LVIS-like long tail registered in metadata).
(c) Host-device synchronisations: one more training iteration under
    ``torch.cuda.set_sync_debug_mode("warn")``, counting the warnings (and where they come
    from; detectron2's own ``.item()`` of every loss for its metrics counts too); and the
    classification losses alone: their ``head_loss`` calls of one training step are
    recorded and replayed, forward and backward, under ``set_sync_debug_mode("error")``,
    which raises at the first synchronising call (reported with the line it comes from).
    Both on the first setting of each model (AMP on).

``--budget-s`` starts no new measurement once that many seconds have passed (the rows not
run are listed in the notes), and the JSON and Markdown are rewritten after every row, so a
run stopped from outside keeps what it measured.

On CPU everything runs reduced (N = 2000, the compiled loss left out, 128 x 192 images,
R18-FPN, 20 classes, 64 sampled ROIs per image, 1 iteration, no AMP training since
detectron2's AMPTrainer needs CUDA, no sync checks), so that ``tests/tools/test_gpu_check.py``
keeps the script working. On a CUDA machine without a package index,
``bash tools/gpu_carry.sh run`` installs what the check needs from a carried folder of
wheels and runs it (docs/INSTALL.md).

Writes ``gpu_check.json`` (everything) and ``gpu_check.md`` (the tables) into ``--out``.
"""

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch

import bench_losses  # benchmarks/ is not a package: the script's own folder is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LVIS_CLASSES = 1203
TRAIN_DATASET = "gpu_check_lvis_like_train"
# name -> (config, baseline it is compared with)
MODELS = {
    "mask_rcnn_sigmoid": ("configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_sigmoid.yaml", None),
    "mask_rcnn_eqlv2": ("configs/LVIS-v1/EQL/mask_rcnn_R50_FPN_1x_eqlv2.yaml", "mask_rcnn_sigmoid"),
    "atss_focal": ("configs/LVIS-v1/atss_R50_FPN_2x_rfs_focal.yaml", None),
    "atss_efl": ("configs/LVIS-v1/atss_R50_FPN_2x_rfs_efl.yaml", "atss_focal"),
}
# this tree's implementations (bench_losses' baseline-* need another checkout)
LOSS_IMPLS = ("reference", "fused-eager", "fused-compiled")
NUM_CLASSES_KEYS = ("MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES",
                    "MODEL.ATSS.NUM_CLASSES", "MODEL.FCOS.NUM_CLASSES")


def settings(cuda):
    """Sizes of the full (CUDA) and reduced (CPU) check."""
    if cuda:
        # AMP first: the setting LVIS training uses, and the one the sync checks run on
        return dict(n=100_000, impls=list(LOSS_IMPLS), loss_reps=5, classes=LVIS_CLASSES,
                    height=800, width=1333, depth=50, warmup=3, iters=10, amp=[True, False],
                    objects=10, opts=[])
    # fewer sampled ROIs and proposals: CPU ROIAlign backward dominates otherwise
    return dict(n=2000, impls=["reference", "fused-eager"], loss_reps=1, classes=20,
                height=128, width=192, depth=18, warmup=0, iters=1, amp=[False], objects=3,
                opts=["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
                      "MODEL.RPN.POST_NMS_TOPK_TRAIN", "128"])


# ----------------------------------------------------------------------------- (a) losses


class Budget:
    """Seconds since the check started, against ``--budget-s`` (None: no limit)."""

    def __init__(self, seconds=None):
        self.seconds = seconds
        self.start = time.monotonic()
        self.skipped = []

    def allows(self, what):
        if self.seconds is None or time.monotonic() - self.start < self.seconds:
            return True
        self.skipped.append(what)
        return False


def copy_floor_s(n, width, dtype, device, reps=20):
    """Median time of copying an [n, width] tensor of `dtype`: one read and one write of the
    bytes a loss step must at least read (logits) and write (their gradient)."""
    x = torch.empty(n, width, dtype=dtype, device=device).normal_()
    y = torch.empty_like(x)
    cuda = torch.device(device).type == "cuda"
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y.copy_(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            y.copy_(x)
            times.append(time.perf_counter() - t0)
    del x, y
    return statistics.median(times)


def loss_rows(device, s, budget=None, report=None):
    """bench_losses' timing and memory workers, fp32 and AMP, on `device`, each step set
    against the copy floor of its logits."""
    budget = budget or Budget()
    rows = []
    for loss in ("efl", "eqlv2"):
        for amp in (False, True):
            precision = f"AMP ({bench_losses.amp_dtype(device)})".replace("torch.", "") if amp else "fp32"
            if not budget.allows(f"loss {loss} {precision}"):
                continue
            timing = bench_losses.timing_worker(loss, s["n"], device, s["loss_reps"], s["impls"], amp=amp)
            ref = timing["impls"].get("reference")
            width = bench_losses.C + (1 if loss == "eqlv2" else 0)
            dtype = bench_losses.amp_dtype(device) if amp else torch.float32
            floor = copy_floor_s(s["n"], width, dtype, device)
            traffic = 2 * s["n"] * width * torch.empty((), dtype=dtype).element_size()
            for impl in s["impls"]:
                res = timing["impls"][impl]
                mem = bench_losses.memory_worker(loss, s["n"], impl, device, amp=amp)
                rows.append({
                    "loss": loss, "n": s["n"], "classes": bench_losses.C, "impl": impl,
                    "precision": precision,
                    "median_s": res["median_s"],
                    "speedup_vs_reference": (statistics.median(
                        r / f for r, f in zip(ref["wall_s"], res["wall_s"])) if ref else None),
                    "peak_mib": mem["peak_increase_bytes"] / 2**20,
                    "peak_method": mem["peak_method"],
                    "floor_s": floor,
                    "x_floor": res["median_s"] / floor,
                    "effective_gb_s": traffic / res["median_s"] / 1e9,
                })
                if device == "cuda":
                    torch.cuda.empty_cache()
            if report:
                report(rows)
    return rows


# ----------------------------------------------------------------------------- (b) training


def register_train_metadata(num_classes):
    """An LVIS-like long-tailed training set, as metadata only (no images are read)."""
    from detectron2.data import MetadataCatalog

    from eql_d2.data.synthetic import frequency_group

    if TRAIN_DATASET in MetadataCatalog.list():
        MetadataCatalog.remove(TRAIN_DATASET)
    num_images = 100_170
    counts = [max(1, int(20_000 / (j + 1) ** 1.1)) for j in range(num_classes)]
    MetadataCatalog.get(TRAIN_DATASET).set(
        thing_classes=[f"category_{j + 1}" for j in range(num_classes)],
        class_image_count=[{"id": j + 1, "image_count": n} for j, n in enumerate(counts)],
        class_frequency=[frequency_group(n) for n in counts],
        num_train_images=num_images, evaluator_type="lvis")


def build_cfg(name, s, amp, device):
    from eql_d2.config import get_eql_cfg

    config, _ = MODELS[name]
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device,
            "DATASETS.TRAIN", f"('{TRAIN_DATASET}',)", "DATASETS.TEST", "()",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.AMP.ENABLED", str(amp),
            # timing does not need learning; a small rate keeps random-init losses finite
            "SOLVER.BASE_LR", "1e-5",
            "INPUT.MIN_SIZE_TRAIN", f"({s['height']},)", "INPUT.MAX_SIZE_TRAIN", str(s["width"]),
            "MODEL.RESNETS.DEPTH", str(s["depth"])]
    for key in NUM_CLASSES_KEYS:
        opts += [key, str(s["classes"])]
    if s["depth"] < 50:  # R18/R34 blocks have 64 res2 channels
        opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    opts += s["opts"]
    cfg = get_eql_cfg(os.path.join(ROOT, config), opts)
    cfg.freeze()
    return cfg


def synthetic_batch(s, device, seed=0):
    """Batch 2 of what the training mapper gives: CHW float images of height x width, and
    Instances with boxes, classes, polygon masks and the LVIS image-level labels."""
    from detectron2.structures import Boxes, Instances, PolygonMasks

    from eql_d2.data.image_labels import ImageLabels

    g = torch.Generator().manual_seed(seed)
    h, w, c = s["height"], s["width"], s["classes"]
    batch = []
    for _ in range(2):
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        k = s["objects"]
        wh = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4]) + 16
        xy = torch.rand(k, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        # long-tailed classes, as LVIS training samples them
        classes = torch.multinomial(1.0 / torch.arange(1, c + 1).float(), k, replacement=True,
                                    generator=g)
        polygons = [[[x0, y0, x1, y0, x1, y1, (x0 + x1) / 2, y1 + (y0 - y1) / 2, x0, y1]]
                    for x0, y0, x1, y1 in boxes.tolist()]
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = classes
        inst.gt_masks = PolygonMasks(polygons)
        # image-level labels as eql_d2's training mapper attaches them: the image's vectors
        # (positives and verified negatives; not-exhaustive categories) for all its rows
        verified = torch.zeros(c, dtype=torch.bool)
        verified[classes] = True
        verified[torch.randint(0, c, (5,), generator=g)] = True
        not_exhaustive = torch.zeros(c, dtype=torch.bool)
        not_exhaustive[torch.randint(0, c, (1,), generator=g)] = True
        inst.image_labels = ImageLabels.for_image(verified, not_exhaustive, k)
        batch.append({"image": image, "height": h, "width": w, "instances": inst})
    return batch


def _trainer(cfg, batch):
    from detectron2.engine import AMPTrainer, SimpleTrainer
    from detectron2.modeling import build_model
    from eql_d2.solver import build_optimizer  # full-model clipping of the one-stage configs

    import eql_d2.modeling  # noqa: F401  (registers eql_d2's heads and architectures)

    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
    return cls(model, itertools.repeat(batch), optimizer)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def train_row(name, s, amp, device, count_syncs):
    from detectron2.utils.events import EventStorage

    cfg = build_cfg(name, s, amp, device)
    batch = synthetic_batch(s, device)
    trainer = _trainer(cfg, batch)
    row = {"model": name, "config": MODELS[name][0], "amp": amp, "classes": s["classes"],
           "image": f"{s['height']}x{s['width']}", "batch": 2, "depth": s["depth"]}
    times = []
    with EventStorage(0) as storage:
        try:
            for i in range(s["warmup"] + s["iters"]):
                storage.iter = trainer.iter = i
                _sync()
                if i == s["warmup"] and device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                trainer.run_step()
                _sync()
                if i >= s["warmup"]:
                    times.append(time.perf_counter() - t0)
            if count_syncs:
                row.update(count_host_syncs(trainer, storage, s["warmup"] + s["iters"]))
                row["loss_syncs"] = loss_sync_check(trainer, storage, s["warmup"] + s["iters"] + 1,
                                                    amp)
        except FloatingPointError as e:  # random init can diverge; report instead of stopping
            row["error"] = str(e).splitlines()[0]
    row["s_per_iter"] = statistics.median(times) if times else None
    row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    del trainer, batch
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def count_host_syncs(trainer, storage, it):
    """Synchronising CUDA calls of one training iteration (warnings of the sync debug mode),
    with the source lines they come from, most frequent first."""
    storage.iter = trainer.iter = it
    _sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.run_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = {}
    for w in syncs:
        key = f"{os.path.relpath(w.filename, ROOT) if w.filename.startswith(ROOT) else w.filename}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    return {"syncs_per_iter": len(syncs),
            "sync_sites": sorted(where.items(), key=lambda kv: -kv[1])}


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def _where(exc):
    """file:line of the innermost frame of `exc`'s traceback inside this repository."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(ROOT)]
    f = frames[-1] if frames else traceback.extract_tb(exc.__traceback__)[-1]
    return f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else f.filename}:{f.lineno}"


def loss_sync_check(trainer, storage, it, amp, debug_mode=None):
    """Replay the classification losses of one training step under a sync debug mode of
    "error": forward (``head_loss`` on the step's own logits, labels and inputs) and
    backward. Returns ``{module path: {"loss", "sync_free", "error", "where"}}``.

    `debug_mode` sets the mode (default ``torch.cuda.set_sync_debug_mode``)."""
    from eql_d2.modeling.cls_losses import ClassificationLoss

    debug_mode = debug_mode or torch.cuda.set_sync_debug_mode
    model = getattr(trainer.model, "module", trainer.model)
    losses = {n: m for n, m in model.named_modules() if isinstance(m, ClassificationLoss)}
    calls = {}

    def recorder(name, original):
        def head_loss(*args, **kwargs):
            calls.setdefault(name, (_detached(args), {k: _detached(v) for k, v in kwargs.items()}))
            return original(*args, **kwargs)
        return head_loss

    for name, m in losses.items():
        m.head_loss = recorder(name, m.head_loss)
    try:
        storage.iter = trainer.iter = it
        trainer.run_step()
    finally:
        for m in losses.values():
            del m.head_loss  # the class's method again
    device_type = next(model.parameters()).device.type
    out = {}
    for name, (args, kwargs) in calls.items():
        logits = args[0].clone().requires_grad_()
        _sync()
        error = where = None
        debug_mode("error")
        try:
            with torch.autocast(device_type, dtype=torch.float16, enabled=amp):
                loss = losses[name].head_loss(logits, *args[1:], **kwargs)
            loss.backward()
        except RuntimeError as e:
            error, where = str(e).splitlines()[0], _where(e)
        finally:
            debug_mode("default")
        _sync()
        out[name or "(model)"] = {"loss": type(losses[name]).__name__, "sync_free": error is None,
                                  "error": error, "where": where}
    return out


def train_rows(device, s, budget=None, report=None):
    budget = budget or Budget()
    register_train_metadata(s["classes"])
    rows = []
    for amp in s["amp"]:
        for name in MODELS:
            if not budget.allows(f"training {name} AMP {'on' if amp else 'off'}"):
                continue
            first = amp == s["amp"][0]
            rows.append(train_row(name, s, amp, device, count_syncs=(device == "cuda" and first)))
            print(_train_line(rows[-1]), flush=True)
            _ratios(rows)
            if report:
                report(rows)
    return rows


def _ratios(rows):
    for row in rows:
        base = MODELS[row["model"]][1]
        ref = next((r for r in rows if r["model"] == base and r["amp"] == row["amp"]), None)
        if ref and row["s_per_iter"] and ref["s_per_iter"]:
            row["time_ratio"] = row["s_per_iter"] / ref["s_per_iter"]
            if row["peak_gpu_mib"]:
                row["memory_ratio"] = row["peak_gpu_mib"] / ref["peak_gpu_mib"]


def _train_line(r):
    mem = f", peak {r['peak_gpu_mib']:.0f} MiB" if r["peak_gpu_mib"] else ""
    t = f"{r['s_per_iter']:.3f} s/iter" if r["s_per_iter"] else f"failed: {r.get('error')}"
    return f"{r['model']:18s} AMP {'on ' if r['amp'] else 'off'} {t}{mem}"


# ----------------------------------------------------------------------------- report


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(result):
    env = result["environment"]
    lines = [f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), "
             f"Python {env['python']}, numpy {env['numpy']}, detectron2 {env['detectron2']}.", ""]
    for note in result["notes"]:
        lines.append(f"- {note}")
    lines += ["", "| loss | N x C | precision | implementation | median s/step | x reference | "
              "peak MiB | x floor | GB/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["losses"]:
        lines.append(f"| {r['loss']} | {r['n']} x {r['classes']} | {r['precision']} | {r['impl']} | "
                     f"{r['median_s']:.4f} | {_fmt(r['speedup_vs_reference'], '.1f')} | {r['peak_mib']:.0f} | "
                     f"{_fmt(r.get('x_floor'), '.1f')} | {_fmt(r.get('effective_gb_s'), '.1f')} |")
    floors = {(r["loss"], r["precision"]): r["floor_s"] for r in result["losses"] if r.get("floor_s")}
    if floors:
        lines += ["", "Floor (copy of the logits: one read + one write): " + "; ".join(
            f"{loss} {prec} {t * 1e3:.3f} ms" for (loss, prec), t in floors.items())]
    lines += ["", "| model | AMP | image, batch, classes | s/iter | peak GPU MiB | time / baseline | "
              "memory / baseline | host syncs / iter | losses sync-free |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["training"]:
        s_it = _fmt(r["s_per_iter"], ".3f") if "error" not in r else f"failed: {r['error']}"
        checks = r.get("loss_syncs")
        free = "-" if checks is None else (
            "yes" if all(c["sync_free"] for c in checks.values()) and checks else
            "no" if checks else "no loss")
        lines.append(f"| {r['model']} (R{r['depth']}) | {'on' if r['amp'] else 'off'} | {r['image']}, {r['batch']}, "
                     f"{r['classes']} | {s_it} | {_fmt(r['peak_gpu_mib'], '.0f')} | "
                     f"{_fmt(r.get('time_ratio'), '.2f')} | {_fmt(r.get('memory_ratio'), '.2f')} | "
                     f"{r.get('syncs_per_iter', '-')} | {free} |")
    sites = [(r["model"], r["amp"], r["sync_sites"]) for r in result["training"] if r.get("sync_sites")]
    if sites:
        lines += ["", "Where the syncs of one training iteration come from (top 8 per model):", ""]
        for model, amp, where in sites:
            lines.append(f"- {model} (AMP {'on' if amp else 'off'}): "
                         + "; ".join(f"{k} x{n}" for k, n in where[:8]))
    failed = [(r["model"], name, c) for r in result["training"]
              for name, c in (r.get("loss_syncs") or {}).items() if not c["sync_free"]]
    if failed:
        lines += ["", "Classification losses that synchronise (set_sync_debug_mode('error')):", ""]
        for model, name, c in failed:
            lines.append(f"- {model}: {c['loss']} at {name}: {c['where']}: {c['error']}")
    return "\n".join(lines) + "\n"


def write_report(out, result):
    """gpu_check.json and gpu_check.md in `out`, rewritten whole (each an atomic rename)."""
    for name, text in (("gpu_check.json", json.dumps(result, indent=1)),
                       ("gpu_check.md", markdown(result))):
        tmp = os.path.join(out, f".{name}.partial")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def environment(device):
    import numpy

    try:
        import detectron2
        d2 = detectron2.__version__
    except ImportError:
        d2 = "not importable"
    return {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "numpy": numpy.__version__, "detectron2": d2, "threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="folder for gpu_check.json / .md (default: a temporary one)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--parts", nargs="+", default=["losses", "training"], choices=["losses", "training"])
    ap.add_argument("--iters", type=int, default=None, help="timed training iterations")
    ap.add_argument("--loss-reps", type=int, default=None, help="timed loss rounds")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new measurement after this many seconds")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    s = settings(cuda)
    if args.iters is not None:
        s["iters"] = args.iters
    if args.loss_reps is not None:
        s["loss_reps"] = args.loss_reps
    out = args.out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out, exist_ok=True)

    notes = []
    if not cuda:
        notes += ["Reduced CPU check: losses at N = 2000 without the compiled variant (AMP = "
                  "bfloat16 autocast), training with R18-FPN, 20 classes, "
                  f"{s['height']} x {s['width']} images, {' '.join(s['opts'])}, "
                  f"{s['iters']} timed iteration(s) without warm-up.",
                  "AMP training skipped (detectron2's AMPTrainer needs CUDA); host-sync counting "
                  "and the losses' sync check skipped (torch.cuda.set_sync_debug_mode needs CUDA).",
                  "Loss peak MiB on CPU: growth of the process's peak RSS (VmHWM) during a step; "
                  "memory freed by earlier rows is reused, so small steps read ~0."]
    else:
        notes += [f"Training: {s['warmup']} warm-up + {s['iters']} timed iterations, median; "
                  "random init, SOLVER.BASE_LR 1e-5 (timing only); synthetic batch reused.",
                  "Host syncs counted over one training iteration after the timed ones, and the "
                  "classification losses replayed under set_sync_debug_mode('error'), on the "
                  "first setting of each model (AMP on)."]
    result = {"environment": environment(device), "settings": s, "notes": notes,
              "losses": [], "training": []}

    def report(part):
        def write(rows):
            result[part] = rows
            write_report(out, result)
        return write

    if "losses" in args.parts:
        result["losses"] = loss_rows(device, s, budget, report("losses"))
    if "training" in args.parts:
        result["training"] = train_rows(device, s, budget, report("training"))
    result["elapsed_s"] = time.monotonic() - budget.start
    if budget.skipped:
        notes.append(f"Not run, past --budget-s {args.budget_s:g}: {', '.join(budget.skipped)}.")
    write_report(out, result)
    md = markdown(result)
    print(md)
    print(f"written: {os.path.join(out, 'gpu_check.json')}, {os.path.join(out, 'gpu_check.md')}")
    return result


if __name__ == "__main__":
    main()
