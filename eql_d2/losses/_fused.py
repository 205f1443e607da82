"""Fused fast path: loss, analytic gradient and per-class gradient sums in one pass.

The published implementations build each loss from autograd ops over [N, C] and collect
gradient statistics with a backward hook; every op keeps an [N, C] temporary alive until
backward, and the hook adds more passes. Here each family has one chunk kernel (a plain
function of tensors) that, for a block of rows, returns the loss sum and the per-class
statistics and writes the gradient of the loss w.r.t. the logits into its slice of a
preallocated [N, C] tensor. :class:`_FusedLoss` (a custom ``autograd.Function``) runs the
kernel over row blocks in ``forward`` and hands the stored gradient out in ``backward``.
Only the gradient outlives the call; temporaries are block-sized.

The kernels are written once and run either eagerly or through ``torch.compile`` (which
fuses a block's ~25 element-wise ops into one loop). Which one runs is decided per call:

- the ``use_compile`` argument of the loss module, when it is not None;
- else the environment variable ``EQL_D2_COMPILE_LOSSES`` (``1``/``0``, ``auto``);
- else ``auto``: compile on CUDA, eager elsewhere. On these project CPUs (2 threads) a
  fresh compile takes about 17 s (about 4 s with inductor's on-disk cache), against a
  measured gain of about 0.3 s per 20000 x 1203 forward, so a short CPU run or a test
  never pays it back; see BENCHMARKS.md, "Loss fast path (issue 3)".

Compilation uses ``dynamic=True`` so the varying row count of the last block (detectors
see a different N every iteration) does not recompile. If compiling fails (no C++
compiler, no Triton, unsupported Python), a warning is issued once and the eager kernel
is used from then on.
"""

import os
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from ._checks import raise_if_nonfinite

__all__ = ["COMPILE_ENV", "compute_dtype", "focal_family_loss", "resolve_compile",
           "sigmoid_bce_loss"]

COMPILE_ENV = "EQL_D2_COMPILE_LOSSES"

# Elements per row block. On CPU a block of ~1 MB (fp32) keeps the eager kernel's
# temporaries in cache (measured: 2^18 ran 1.6x faster than 2^22 at 20000 x 1203);
# on a GPU bigger blocks amortise kernel launches.
_BLOCK_ELEMENTS = {"cpu": 1 << 18}
_BLOCK_ELEMENTS_DEFAULT = 1 << 22


def resolve_compile(use_compile: Optional[bool], device: torch.device) -> bool:
    if use_compile is not None:
        return bool(use_compile)
    env = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    if env not in ("", "auto"):
        raise ValueError(f"{COMPILE_ENV} must be 1, 0 or auto, got {env!r}")
    return device.type == "cuda"


class _Kernel:
    """A chunk kernel and its lazily built ``torch.compile`` twin."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled = None
        self._failed = False

    def __call__(self, use_compile: bool, *args):
        if use_compile and not self._failed:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, dynamic=True)
                return self._compiled(*args)
            except Exception as exc:  # any compiler/toolchain failure: keep training eagerly
                self._failed = True
                warnings.warn(f"torch.compile of the {self.fn.__name__} loss kernel failed "
                              f"({type(exc).__name__}: {exc}); using the eager kernel.",
                              RuntimeWarning, stacklevel=3)
        return self.fn(*args)


def _sigmoid_bce_block(z, labels, verified, pos_weight, neg_weight_fg, neg_weight_bg,
                       num_fg: int, scale, out, want_grad: bool, want_stats: bool):
    """Weighted sigmoid cross-entropy of one row block (EQL eq. 6, EQLv2, plain BCE).

    z [R, K] logits; labels [R] in 0..num_fg (num_fg = background); verified [R, Kv] bool
    with Kv <= K or None; pos_weight, neg_weight_fg, neg_weight_bg [K]: weight of positive
    entries, of negative entries in foreground rows and in background rows; scale: 0-dim.
    Target y_ij = [labels_i == j], so with K = num_fg + 1 the last column is the
    background/objectness column. A verified negative has weight 1.

    Returns (sum_ij w_ij BCE_ij * scale, pos [K], neg [K]) with pos/neg the sums of
    |w_ij dBCE/dz_ij| (unscaled) over positive/negative entries, or None when not wanted;
    writes scale * w_ij dBCE/dz_ij into ``out`` [R, K] when ``want_grad``.
    """
    zf = z.to(pos_weight.dtype)
    width = zf.shape[1]
    pos = labels[:, None] == torch.arange(width, device=zf.device)
    neg_w = torch.where((labels < num_fg)[:, None], neg_weight_fg, neg_weight_bg)
    if verified is not None:
        if verified.shape[1] < width:  # columns past C (objectness) are never verified
            pad = verified.new_zeros(verified.shape[0], width - verified.shape[1])
            verified = torch.cat([verified, pad], dim=1)
        neg_w = torch.where(verified, 1.0, neg_w)
    w = torch.where(pos, pos_weight, neg_w)
    e = torch.exp(-zf.abs())
    bce = torch.relu(zf) - torch.where(pos, zf, 0.0) + torch.log1p(e)
    # 0 * sum(z) is 0 for finite logits and NaN otherwise, so the caller can detect an
    # inf/NaN logit from the scalar loss alone, whatever its weight.
    loss = (w * bce).sum() * scale + zf.sum() * 0.0
    if not (want_grad or want_stats):
        return loss, None, None
    sig_abs = 1.0 / (1.0 + e)  # sigmoid(|z|)
    sig_neg_abs = e * sig_abs  # sigmoid(-|z|), exact for large |z|
    nonneg = zf >= 0
    # dBCE/dz = p - y: p for negatives, -(1 - p) = -sigmoid(-z) for positives, each taken
    # from the branch that does not cancel.
    d = torch.where(pos, -torch.where(nonneg, sig_neg_abs, sig_abs),
                    torch.where(nonneg, sig_abs, sig_neg_abs))
    g = w * d
    if want_grad:
        out.copy_(g * scale)
    if not want_stats:
        return loss, None, None
    ag = g.abs()
    return loss, torch.where(pos, ag, 0.0).sum(0), torch.where(pos, 0.0, ag).sum(0)


def _focal_block(z, labels, quality, gamma, weight, alpha, inv_norm, soft: bool, out,
                 want_grad: bool, want_stats: bool):
    """Class-wise focal loss of one row block (focal, EFL eq. 4, QFL, EQFL eq. 5).

    z [R, C]; labels [R] in {-1 ignore, 0..C-1, C background}; quality [R] (soft targets,
    used when ``soft``) or None; gamma, weight [C]: focusing and weighting factor of each
    class; alpha: 0-dim (positives alpha, negatives 1 - alpha) or None; inv_norm: 0-dim,
    1 / normalizer.

    With target t (1, or quality, for the labelled class; 0 otherwise), p = sigmoid(z) and
    d = p - t, the element loss is  a w |d|^gamma BCE(z, t)  (for t in {0, 1} this is
    -a w (1 - p_t)^gamma log p_t, EFL eq. 4) and its derivative
        a w (gamma sign(d) |d|^(gamma-1) p (1-p) BCE + |d|^gamma d),
    which for binary targets equals EFL eq. 6 times alpha_t. Both are scaled by inv_norm
    and are 0 on ignored rows.

    Returns (loss sum, pos [C], neg [C]) with pos/neg the sums of |gradient| (scaled) over
    positive/negative entries, or None when not wanted; writes the gradient into ``out``.
    """
    zf = z.to(gamma.dtype)
    pos = labels[:, None] == torch.arange(zf.shape[1], device=zf.device)
    w = weight * ((labels >= 0).to(zf.dtype) * inv_norm)[:, None]
    if alpha is not None:
        w = w * torch.where(pos, alpha, 1.0 - alpha)
    e = torch.exp(-zf.abs())
    log1pe = torch.log1p(e)
    log_p = -(torch.relu(-zf) + log1pe)  # log sigmoid(z)
    log_q = -(torch.relu(zf) + log1pe)   # log sigmoid(-z)
    sig_abs = 1.0 / (1.0 + e)
    sig_neg_abs = e * sig_abs
    nonneg = zf >= 0
    p = torch.where(nonneg, sig_abs, sig_neg_abs)
    q = torch.where(nonneg, sig_neg_abs, sig_abs)
    if soft:
        t = torch.where(pos, quality.to(zf.dtype)[:, None], 0.0)
        bce = torch.relu(zf) - t * zf + log1pe
        # for positives d = (1 - t) - (1 - p): no cancellation when t = 1 and p -> 1
        d = torch.where(pos, (1.0 - t) - q, p)
        # log|d| = -inf where d = 0 gives |d|^gamma = 0 (gamma > 0)
        log_abs_d = torch.where(pos, torch.log(d.abs()), log_p)
    else:
        bce = -torch.where(pos, log_p, log_q)
        d = torch.where(pos, -q, p)
        log_abs_d = torch.where(pos, log_q, log_p)  # exact, no log of a rounded |d|
    focal = torch.exp(gamma * log_abs_d)  # |d|^gamma
    loss = (w * focal * bce).sum() + zf.sum() * 0.0  # 0 * sum(z): see _sigmoid_bce_block
    if not (want_grad or want_stats):
        return loss, None, None
    # sign(d) |d|^(gamma-1) = |d|^gamma / d; its product with p(1-p) BCE vanishes at d = 0
    # for binary targets and for gamma >= 1 (0 there is also the subgradient we take for a
    # soft target exactly met with gamma < 1).
    slope = torch.where(d != 0, focal * p * q / d, 0.0)
    g = w * (gamma * bce * slope + focal * d)
    if want_grad:
        out.copy_(g)
    if not want_stats:
        return loss, None, None
    ag = g.abs()
    return loss, torch.where(pos, ag, 0.0).sum(0), torch.where(pos, 0.0, ag).sum(0)


sigmoid_bce_kernel = _Kernel(_sigmoid_bce_block)
focal_kernel = _Kernel(_focal_block)


class _Job:
    """Everything one fused call needs besides the logits (kept out of autograd's view)."""

    def __init__(self, kernel: _Kernel, rows: Sequence[Optional[torch.Tensor]],
                 consts: Sequence, want_grad: bool, want_stats: bool, use_compile: bool):
        self.kernel, self.rows, self.consts = kernel, rows, consts
        self.want_grad, self.want_stats, self.use_compile = want_grad, want_stats, use_compile

    def run(self, logits: torch.Tensor):
        n, width = logits.shape
        compute = compute_dtype(logits)
        block = _BLOCK_ELEMENTS.get(logits.device.type, _BLOCK_ELEMENTS_DEFAULT)
        step = max(1, block // max(width, 1))
        grad = torch.empty_like(logits) if self.want_grad else None
        loss = torch.zeros((), dtype=compute, device=logits.device)
        stats = torch.zeros(2, width, dtype=compute, device=logits.device)
        for start in range(0, n, step):
            end = min(n, start + step)
            rows = [None if r is None else r[start:end] for r in self.rows]
            out = grad[start:end] if grad is not None else None
            block_loss, pos, neg = self.kernel(
                self.use_compile, logits[start:end], *rows, *self.consts, out,
                self.want_grad, self.want_stats)
            loss += block_loss
            if self.want_stats:
                stats[0] += pos
                stats[1] += neg
        return loss, grad, stats


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True if unknown."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return True if probe is None else bool(probe())
    except RuntimeError:
        return True


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, job):
        loss, grad, stats = job.run(logits)
        if grad is not None:
            # Autograd frees a saved tensor right after this node's backward unless the
            # graph is retained, so the returned gradient is then the only reference and
            # becomes logits.grad (a leaf) or flows upstream without a copy.
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        # On CPU reading the upstream scale is free: skip the pass over [N, C] for the
        # usual 1. Elsewhere scale in place unless a retained graph still needs the
        # saved gradient.
        if grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            return grad, None
        if _keeps_graph():
            return grad * grad_loss, None
        return grad.mul_(grad_loss), None


def fused_loss(kernel: _Kernel, logits: torch.Tensor, rows: Sequence[Optional[torch.Tensor]],
               consts: Sequence, *, want_stats: bool, use_compile: Optional[bool]):
    """Run ``kernel`` over ``logits`` [N, K] in row blocks through :class:`_FusedLoss`.

    rows: per-row tensors (first dim N) or None, sliced with the logits; consts: passed
    to every block unchanged (per-class vectors already in the compute dtype, scalars).
    Returns (loss 0-dim, stats [2, K] with row 0 positive and row 1 negative sums; zeros
    when ``want_stats`` is False).
    """
    logits_c = logits.contiguous()
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    job = _Job(kernel, rows, consts, want_grad, want_stats,
               resolve_compile(use_compile, logits.device))
    return _FusedLoss.apply(logits_c, job)


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def sigmoid_bce_loss(logits, labels, verified, pos_weight, neg_weight_fg, neg_weight_bg,
                     num_fg: int, *, want_stats: bool, use_compile: Optional[bool]):
    """sum_ij w_ij BCE(z_ij, y_ij) / N through the fused path (inputs already validated).

    pos_weight, neg_weight_fg, neg_weight_bg: [K] weights, see ``_sigmoid_bce_block``.
    Returns (loss, stats [2, K] of unnormalised |w dBCE/dz| sums).
    """
    dtype = compute_dtype(logits)
    dev = logits.device
    scale = torch.tensor(1.0 / max(logits.shape[0], 1), dtype=dtype, device=dev)
    consts = [t.to(device=dev, dtype=dtype) for t in (pos_weight, neg_weight_fg, neg_weight_bg)]
    loss, stats = fused_loss(sigmoid_bce_kernel, logits, (labels, verified),
                             (*consts, num_fg, scale), want_stats=want_stats,
                             use_compile=use_compile)
    raise_if_nonfinite(loss, logits)
    return loss, stats


def focal_family_loss(logits, labels, quality, gamma, weight, alpha: Optional[float],
                      normalizer, *, want_stats: bool,
                      use_compile: Optional[bool]):
    """sum of a w |d|^gamma BCE / normalizer through the fused path (inputs validated).

    gamma, weight: [C] focusing and weighting factors; quality None for binary targets.
    Returns (loss, stats [2, C] of |gradient| sums, normalizer included).
    """
    dtype = compute_dtype(logits)
    dev = logits.device
    a = None if alpha is None else torch.tensor(alpha, dtype=dtype, device=dev)
    consts = (gamma.to(device=dev, dtype=dtype), weight.to(device=dev, dtype=dtype), a,
              1.0 / torch.as_tensor(normalizer, dtype=dtype, device=dev), quality is not None)
    loss, stats = fused_loss(focal_kernel, logits, (labels, quality), consts,
                             want_stats=want_stats, use_compile=use_compile)
    raise_if_nonfinite(loss, logits)
    return loss, stats
