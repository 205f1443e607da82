"""Fused loss path vs a reference-style implementation: time and peak memory.

For EFL and EQLv2 at N x 1203 (N = 20000 and 100000 by default) and fp32, each
implementation runs forward + backward + statistics on the same seeded inputs:

- ``reference``: plain autograd over the formula, as the published implementations
  write it (one-hot targets, masked selection, element-wise ops), with the per-class
  gradient statistics collected by a backward hook on the logits;
- ``fused-eager``: eql_d2.losses with ``use_compile=False`` (the CPU default);
- ``fused-compiled``: eql_d2.losses with ``use_compile=True`` (compiled during warm-up);
- with ``--baseline DIR``, ``baseline-eager`` and ``baseline-compiled``: the same from the
  ``eql_d2/losses`` package of another checkout (for example ``git worktree add DIR REF``),
  imported side by side under another name, to compare two versions of the fused path in
  the same process. The fused variants are then also reported relative to them.

Time: one process per (loss, size) holds the inputs and every implementation, warms each
up with one step, then runs ``--reps`` rounds in which each implementation does one step,
in an order that rotates every round. Reported per implementation: the median wall time
and process CPU time of a step, and the median over rounds of the reference's step time
divided by its step time in the same round; on a shared machine whose load drifts, that
per-round ratio is the steadier figure. Agreement of loss, gradient samples and
statistics with the reference is checked after these identical steps.

Memory: each implementation in a fresh process: one warm-up step, then the peak of one
step, on CPU as the peak resident set (VmHWM, reset through /proc/self/clear_refs;
ru_maxrss when that is unavailable) minus the resident set before the step, which already
holds the logits; on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before.
Both sides end the step holding logits.grad, which is counted.

    OMP_NUM_THREADS=2 python benchmarks/bench_losses.py            # CPU (and CUDA if present)
    python benchmarks/bench_losses.py --sizes 20000 --reps 3       # quicker
    git worktree add --detach /tmp/before HEAD~1                   # this tree against another
    python benchmarks/bench_losses.py --baseline /tmp/before --impls fused-eager baseline-eager
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

C = 1203
IMPLS = ("reference", "fused-eager", "fused-compiled", "baseline-eager", "baseline-compiled")


# ----------------------------------------------------------------------------------------
# Reference-style implementations (autograd + hook), kept here on purpose.


class ReferenceEFL:
    """EFL as published: autograd over eq. 4, statistics from a hook on the logits."""

    def __init__(self, num_classes, gamma_b=2.0, scale=8.0, alpha=0.25):
        self.c, self.gamma_b, self.scale, self.alpha = num_classes, gamma_b, scale, alpha
        self.pos_grad = torch.zeros(num_classes)
        self.neg_grad = torch.zeros(num_classes)
        self.pos_neg = torch.ones(num_classes)

    def __call__(self, logits, labels, normalizer):
        n = logits.shape[0]
        target = logits.new_zeros(n, self.c + 1)
        target[torch.arange(n), labels.clamp(min=0)] = 1  # label C -> background column
        target = target[:, :self.c]
        mask = labels >= 0
        inputs, targets = logits[mask], target[mask]
        pred = torch.sigmoid(inputs)
        pred_t = pred * targets + (1 - pred) * (1 - targets)
        gamma = (self.gamma_b + self.scale * (1 - self.pos_neg)).to(logits.device)
        ff = gamma.view(1, -1).expand_as(inputs)
        wf = ff / self.gamma_b
        ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        loss = ce * torch.pow(1 - pred_t, ff) * wf
        alpha_t = self.alpha * targets + (1 - self.alpha) * (1 - targets)
        loss = (alpha_t * loss).sum() / normalizer

        def hook(grad):
            g = grad.abs()[mask]
            self.pos_grad += (g * targets).sum(0).to(self.pos_grad.device)
            self.neg_grad += (g * (1 - targets)).sum(0).to(self.neg_grad.device)
            self.pos_neg = (self.pos_grad / (self.neg_grad + 1e-10)).clamp(0, 1)

        logits.register_hook(hook)
        return loss


class ReferenceEQLv2:
    """EQLv2 as published (weights from the ratio, objectness column), hook statistics."""

    def __init__(self, num_classes, gamma=12.0, mu=0.8, alpha=4.0):
        self.c, self.gamma, self.mu, self.alpha = num_classes, gamma, mu, alpha
        self.pos_grad = torch.zeros(num_classes)
        self.neg_grad = torch.zeros(num_classes)

    def __call__(self, logits, labels):
        n, width = logits.shape
        target = logits.new_zeros(n, width)
        target[torch.arange(n), labels] = 1
        started = self.neg_grad > 0
        ratio = self.pos_grad / self.neg_grad.clamp(min=1e-30)
        q = torch.where(started, torch.sigmoid(self.gamma * (ratio - self.mu)),
                        torch.ones_like(ratio))
        neg_w = torch.cat([q, q.new_ones(1)]).to(logits.device)
        pos_w = 1 + self.alpha * (1 - neg_w)
        weight = pos_w.view(1, -1).expand(n, width) * target + \
            neg_w.view(1, -1).expand(n, width) * (1 - target)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = (loss * weight).sum() / n

        def hook(grad):
            g = (grad * n).abs()[:, :self.c]
            t = target[:, :self.c]
            self.pos_grad += (g * t).sum(0).to(self.pos_grad.device)
            self.neg_grad += (g * (1 - t)).sum(0).to(self.neg_grad.device)

        logits.register_hook(hook)
        return loss


# ----------------------------------------------------------------------------------------
# One case in a fresh process


def amp_dtype(device):
    """The half dtype of a mixed-precision step: float16 on CUDA (detectron2's AMPTrainer),
    bfloat16 on CPU (what CPU autocast supports)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def _inputs(loss, n, device, amp=False):
    """Seeded logits [n, C (+1 for EQLv2)], labels [n], normalizer; with `amp` the logits are
    in the half dtype, as a classifier run under autocast hands them to its loss."""
    g = torch.Generator().manual_seed(1234)
    width = C + 1 if loss == "eqlv2" else C
    logits = torch.empty(n, width).normal_(generator=g).mul_(2.0).sub_(4.0)  # in place
    labels = torch.randint(0, C, (n,), generator=g)
    bg = torch.rand(n, generator=g) < (0.98 if loss == "efl" else 0.75)
    labels[bg] = C
    if loss == "efl":
        labels[torch.rand(n, generator=g) < 0.02] = -1
    normalizer = float(((labels >= 0) & (labels < C)).sum().clamp(min=1))
    dtype = amp_dtype(device) if amp else torch.float32
    return logits.to(device, dtype), labels.to(device), normalizer


def _baseline_losses(root):
    """``root``/eql_d2/losses imported as the package ``baseline_eql_d2_losses``; its
    absolute imports of other eql_d2 modules resolve to this tree."""
    name = "baseline_eql_d2_losses"
    if name not in sys.modules:
        init = os.path.join(os.path.abspath(root), "eql_d2", "losses", "__init__.py")
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _build(loss, impl, baseline=None):
    if impl == "reference":
        return ReferenceEFL(C) if loss == "efl" else ReferenceEQLv2(C)
    if impl.startswith("baseline-"):
        losses = _baseline_losses(baseline)
    else:
        import eql_d2.losses as losses
    compiled = impl.endswith("-compiled")
    if loss == "efl":
        return losses.EqualizedFocalLoss(C, use_compile=compiled).train()
    return losses.EQLv2Loss(C, use_compile=compiled).train()


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak():
    """Reset VmHWM; False if the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kb(reset_ok):
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _step_fn(fn, loss, z, labels, normalizer, cuda, amp=False):
    def step():
        z.grad = None
        # A fresh view per step, as a detector head's output is: the reference's hook is
        # registered on it and does not pile up on the leaf.
        x = z.view_as(z)
        with torch.autocast(z.device.type, dtype=amp_dtype(z.device), enabled=amp):
            out = fn(x, labels, normalizer) if loss == "efl" else fn(x, labels)
        out.backward()
        if cuda:
            torch.cuda.synchronize()
        return out.detach()
    return step


def _warm(fn, impl, loss, step, z, labels, normalizer):
    """One full step; the compiled variant first compiles on a slice (dynamic shapes)."""
    if impl.endswith("-compiled"):
        small = z.detach()[:2000].clone().requires_grad_()
        out = fn(small, labels[:2000], normalizer) if loss == "efl" else fn(small, labels[:2000])
        out.backward()
        fn.reset_statistics()
    step()


def memory_worker(loss, n, impl, device, amp=False, baseline=None):
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    z, labels, normalizer = _inputs(loss, n, dev, amp)
    z.requires_grad_()
    fn = _build(loss, impl, baseline)
    step = _step_fn(fn, loss, z, labels, normalizer, cuda, amp)
    _warm(fn, impl, loss, step, z, labels, normalizer)
    z.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        reset_ok = True
    else:
        reset_ok = _reset_peak()
        base = _rss_kb() * 1024
    step()
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak_kb(reset_ok) * 1024) - base
    return {"peak_increase_bytes": peak,
            "peak_method": "cuda max_memory_allocated" if cuda else
            ("VmHWM after clear_refs" if reset_ok else "ru_maxrss")}


def timing_worker(loss, n, device, reps, impls, amp=False, baseline=None):
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    z, labels, normalizer = _inputs(loss, n, dev, amp)
    z.requires_grad_()
    fns = {impl: _build(loss, impl, baseline) for impl in impls}
    steps = {impl: _step_fn(fns[impl], loss, z, labels, normalizer, cuda, amp) for impl in impls}
    for impl in impls:
        _warm(fns[impl], impl, loss, steps[impl], z, labels, normalizer)
    wall = {impl: [] for impl in impls}
    cpu = {impl: [] for impl in impls}
    last, grads = {}, {}
    for r in range(reps):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            t0, c0 = time.perf_counter(), time.process_time()
            last[impl] = steps[impl]()
            wall[impl].append(time.perf_counter() - t0)
            cpu[impl].append(time.process_time() - c0)
            flat = z.grad.reshape(-1)
            grads[impl] = flat[torch.arange(0, flat.numel(), 7919, device=flat.device)]
    z.grad = None
    out = {}
    for impl in impls:
        out[impl] = {
            "wall_s": wall[impl], "cpu_s": cpu[impl],
            "median_s": statistics.median(wall[impl]),
            "cpu_median_s": statistics.median(cpu[impl]),
            "last_loss": float(last[impl]),
            "grad_samples": grads[impl].double().cpu().tolist(),
            "pos_grad": fns[impl].pos_grad.double().cpu().tolist(),
            "neg_grad": fns[impl].neg_grad.double().cpu().tolist(),
        }
    return {"threads": torch.get_num_threads(), "impls": out}


# ----------------------------------------------------------------------------------------
# Driver


def _rel(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def _run_worker(*args, baseline=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *map(str, args)]
    if baseline:
        cmd += ["--baseline", baseline]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"worker {' '.join(map(str, args))} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--losses", nargs="+", default=["efl", "eqlv2"],
                    choices=["efl", "eqlv2"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[20000, 100000])
    ap.add_argument("--impls", nargs="+", default=None, choices=IMPLS,
                    help="default: reference, fused-eager, fused-compiled")
    ap.add_argument("--devices", nargs="+", default=None,
                    help="default: cpu, plus cuda when available")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds")
    ap.add_argument("--baseline", metavar="DIR",
                    help="a checkout whose eql_d2/losses runs as baseline-eager / "
                         "baseline-compiled (default impls: reference, fused-eager, "
                         "baseline-eager)")
    ap.add_argument("--json", help="also write all results to this file")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, loss, n, device, *rest = args.worker
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        if kind == "memory":
            print(json.dumps(memory_worker(loss, int(n), rest[0], device,
                                           baseline=args.baseline)))
        else:
            print(json.dumps(timing_worker(loss, int(n), device, int(rest[0]), rest[1:],
                                           baseline=args.baseline)))
        return

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    default = ("reference", "fused-eager", "baseline-eager") if args.baseline else IMPLS[:3]
    impls = [i for i in IMPLS if i in (args.impls or default)]
    if not args.baseline and any(i.startswith("baseline-") for i in impls):
        ap.error("the baseline implementations need --baseline DIR")
    base = args.baseline
    results = []
    for device in devices:
        for loss in args.losses:
            for n in args.sizes:
                timing = _run_worker("timing", loss, n, device, args.reps, *impls,
                                     baseline=base)
                case = {"device": device, "loss": loss, "n": n, "reps": args.reps,
                        "threads": timing["threads"], "impls": timing["impls"]}
                for impl in impls:
                    res = case["impls"][impl]
                    res.update(_run_worker("memory", loss, n, device, impl, baseline=base))
                    print(f"{device:4s} {loss:5s} {n:6d}x{C} {impl:14s} median "
                          f"{res['median_s']:7.3f} s (process CPU {res['cpu_median_s']:7.3f} s)"
                          f"  peak +{res['peak_increase_bytes'] / 2**20:6.0f} MiB", flush=True)
                ref = case["impls"].get("reference")
                for impl in impls:
                    res = case["impls"][impl]
                    if ref is None or impl == "reference":
                        continue
                    res["speedup_per_round"] = statistics.median(
                        r / f for r, f in zip(ref["wall_s"], res["wall_s"]))
                    res["cpu_speedup_per_round"] = statistics.median(
                        r / f for r, f in zip(ref["cpu_s"], res["cpu_s"]))
                    res["memory_ratio"] = res["peak_increase_bytes"] / ref["peak_increase_bytes"]
                    res["agreement"] = {
                        "loss": _rel([res["last_loss"]], [ref["last_loss"]]),
                        "grad": _rel(res["grad_samples"], ref["grad_samples"]),
                        "pos_grad": _rel(res["pos_grad"], ref["pos_grad"]),
                        "neg_grad": _rel(res["neg_grad"], ref["neg_grad"]),
                    }
                    print(f"     -> {impl}: {res['speedup_per_round']:.1f}x faster (median per "
                          f"round; CPU time {res['cpu_speedup_per_round']:.1f}x), "
                          f"{res['memory_ratio']:.3f} of the reference's peak memory; max rel "
                          f"diff loss {res['agreement']['loss']:.1e} grad "
                          f"{res['agreement']['grad']:.1e} stats "
                          f"{max(res['agreement']['pos_grad'], res['agreement']['neg_grad']):.1e}",
                          flush=True)
                for impl in impls:
                    res = case["impls"][impl]
                    before = case["impls"].get(impl.replace("fused-", "baseline-"))
                    if not impl.startswith("fused-") or before is None:
                        continue
                    res["baseline_time_ratio"] = statistics.median(
                        f / b for f, b in zip(res["wall_s"], before["wall_s"]))
                    res["baseline_cpu_ratio"] = statistics.median(
                        f / b for f, b in zip(res["cpu_s"], before["cpu_s"]))
                    res["baseline_memory_ratio"] = (res["peak_increase_bytes"]
                                                    / before["peak_increase_bytes"])
                    res["baseline_agreement"] = {
                        "loss": _rel([res["last_loss"]], [before["last_loss"]]),
                        "grad": _rel(res["grad_samples"], before["grad_samples"]),
                        "stats": max(_rel(res["pos_grad"], before["pos_grad"]),
                                     _rel(res["neg_grad"], before["neg_grad"])),
                    }
                    print(f"     -> {impl} / baseline: step time x{res['baseline_time_ratio']:.3f}"
                          f" (median per round; CPU time x{res['baseline_cpu_ratio']:.3f}), "
                          f"peak memory x{res['baseline_memory_ratio']:.3f}; max rel diff loss "
                          f"{res['baseline_agreement']['loss']:.1e} grad "
                          f"{res['baseline_agreement']['grad']:.1e} stats "
                          f"{res['baseline_agreement']['stats']:.1e}", flush=True)
                results.append(case)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
