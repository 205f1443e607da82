"""Fused path of the sigmoid and focal losses: loss, analytic gradient and per-class
gradient sums in one pass.

Written with autograd ops, these losses keep several [N, C] temporaries alive until
backward, and the gradient-guided ones add a backward hook for their statistics. Here
each family has one block kernel (a plain function of tensors) that, for a block of rows,
returns the loss sum and the per-class statistics and writes the gradient of the loss
w.r.t. the logits into its slice of a preallocated [N, C] tensor. :class:`_FusedLoss`
(a custom ``autograd.Function``) runs the kernel over row blocks in ``forward`` and hands
the stored gradient out in ``backward``: only the gradient outlives the call, and
temporaries are block-sized (time and memory: docs/PERFORMANCE.md, "Loss speed and
memory"; benchmarks/bench_losses.py).

The kernels run eagerly or through ``torch.compile``, decided per call by the
``use_compile`` argument of the loss module, else the environment variable
``EQL_D2_COMPILE_LOSSES`` (``1``, ``0`` or ``auto``), else ``auto``: compile on CUDA, eager
elsewhere (on CPU the compiled kernels were slower, and each variant costs a compile of
10-20 s). ``dynamic=True`` keeps the varying row count of detectors from recompiling. If a
compiled call raises anything, a warning names the cause once and the eager kernel runs
from then on, starting with that call (so an error that is not the compiler's, such as
running out of memory, reaches the caller from the eager kernel).

Mixed precision: float16 and bfloat16 logits are computed in float32, and the gradient
stays float32 until backward has applied the upstream gradient (under
``torch.amp.GradScaler``, the loss scale); only then is it rounded to the logits' dtype,
as autograd does for the reference formula under autocast. Rounding the unscaled gradient
would flush the small gradients of easy negatives to zero.

Nothing here reads a device tensor back to the host during training (no ``.item()``, no
data-dependent shapes, no host-to-device copies of constants).
"""

import os
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _checks

__all__ = ["COMPILE_ENV", "average", "compute_dtype", "focal_family_loss", "resolve_compile",
           "sigmoid_bce_loss"]

COMPILE_ENV = "EQL_D2_COMPILE_LOSSES"

# Elements per row block. Eager CPU blocks of ~1 MB (fp32) keep the temporaries in cache;
# compiled kernels parallelise inside a block, and on a GPU large blocks amortise launches.
_EAGER_CPU_BLOCK = 1 << 18
_BLOCK = 1 << 22


def resolve_compile(use_compile: Optional[bool], device: torch.device) -> bool:
    """Whether the kernels run through torch.compile: ``use_compile`` when given, else
    ``EQL_D2_COMPILE_LOSSES``, else only on CUDA."""
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
    """A block kernel and its lazily built ``torch.compile`` twin, with one fall-back: any
    exception from the compiled one warns once and the eager kernel runs from then on."""

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
            except Exception as exc:
                self._failed = True
                cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:600]
                warnings.warn(f"torch.compile of the {self.fn.__name__} loss kernel failed "
                              f"({cause}); using the eager kernel from now on.",
                              RuntimeWarning, stacklevel=4)
        return self.fn(*args)


# The kernels below avoid torch.where/masked_fill and bool tensors over [R, K]: on CPU
# those run about 30x slower per element than float arithmetic (measured 4 ns vs 0.13 ns
# per element, one thread). A row has at most one positive entry, so everything specific
# to positives is read with gather and written with scatter over R entries.


def _positive_entries(labels, width: int):
    """Column of each row's positive entry, col [R, 1] (clamped), and has_pos [R, 1] bool."""
    col = labels.clamp(0, width - 1)[:, None]
    has_pos = ((labels >= 0) & (labels < width))[:, None]
    return col, has_pos


def _flip_positives(zf, col, has_pos):
    """u = z on negative entries and -z on positive ones: the logit of the wrong answer."""
    u = zf.clone()
    z_at = zf.gather(1, col)
    return u.scatter_(1, col, torch.where(has_pos, -z_at, z_at))


def _write_gradient(out, m, col, has_pos):
    """out = m with the sign of the positive entries flipped."""
    out.copy_(m)
    at = out.gather(1, col)
    out.scatter_(1, col, torch.where(has_pos, -at, at))


def _split_statistics(m, col, has_pos):
    """Per-class sums of the gradient magnitudes m [R, K] over positive / negative entries
    (consumes m)."""
    at = m.gather(1, col)
    pos_sum = torch.zeros(m.shape[1], dtype=m.dtype, device=m.device).index_add_(
        0, col[:, 0], (at * has_pos)[:, 0])
    m.scatter_(1, col, torch.where(has_pos, 0.0, at))
    return pos_sum, m.sum(0)


def _total(x):
    """Sum of a block [R, K] through its column sums: a compiled kernel accumulates a flat
    sum sequentially, which lost 1.8e-5 of a 20000 x 1204 EQLv2 loss in fp32."""
    return x.sum(0).sum()


def _nonfinite_probe(zf):
    """0 for finite logits, NaN otherwise: added to the loss so that the caller detects an
    inf/NaN logit from the scalar alone, even where the loss is flat (a -inf negative, a
    +inf positive). One read of the block, no [R, K] temporary; min and max of finite
    values are finite, so huge finite logits do not trip it."""
    lo, hi = torch.aminmax(zf)
    return (lo + hi) * 0.0


# Rows per column product in _column_log_sums: a product of up to 125 factors in
# [0.5, 1] stays above 2^-125, in float32's normal range.
_PRODUCT_ROWS = 120


def _column_log_sums(m):
    """sum_i log(m_ij) [K] for m [R, K] with entries in [0.5, 1] (consumes nothing).

    Eager: the log of column products over chunks of ``_PRODUCT_ROWS`` rows. A log costs
    about ten multiplications on CPU, and each multiplication adds one rounding, as the
    rounding of m_ij itself does: the error is that of summing the logs. Compiled: the per-entry
    logs, which the compiler fuses into the reduction (no chunk loop to specialise on R).
    """
    if torch.compiler.is_compiling():
        return torch.log(m).sum(0)
    total = None
    for start in range(0, m.shape[0], _PRODUCT_ROWS):
        part = torch.log(m[start:start + _PRODUCT_ROWS].prod(0))
        total = part if total is None else total.add_(part)
    return total


def _sigmoid_bce_block(z, labels, verified, pos_weight, neg_weight_fg, neg_weight_bg,
                       num_fg: int, scale, out, want_grad: bool, want_stats: bool):
    """Weighted sigmoid cross-entropy of one row block (EQL eq. 6, EQLv2, plain BCE).

    z [R, K] logits; labels [R] in 0..num_fg (num_fg = background); verified [R, Kv] bool
    with Kv <= K or None; pos_weight, neg_weight_fg [K]: weight of positive entries and of
    negative entries in foreground rows; neg_weight_bg [K] for background rows, or None
    when equal to neg_weight_fg; scale: 0-dim. Target y_ij = [labels_i == j], so with
    K = num_fg + 1 the last column is the background/objectness column. A verified
    negative has weight 1.

    With u = z for a negative entry and -z for a positive one (the logit of the wrong
    answer), BCE = softplus(u) and |dBCE/dz| = sigmoid(u).

    The [R, K] passes treat every entry as a negative, on s = sigmoid(z) with the R
    positive entries set to 0 (so that column sums of s are sums over negatives); the
    positive entries are then computed and corrected on [R, 1]. BCE of a negative is
    softplus(z) = relu(z) - log(max(s, 1 - s)), from the sigmoid the gradient needs
    anyway. Its absolute error (~1e-7 in fp32 for a tiny BCE) is that of
    F.binary_cross_entropy_with_logits, which also takes the log of a sum near 1. At a
    zeroed positive entry it reads relu(z), which the correction removes. Where the
    negative weights are q_j (or 1 on verified entries) only column sums of the BCE are
    needed, and the logs are taken of column products (:func:`_column_log_sums`).

    Returns (scale * sum_ij w_ij BCE_ij, pos [K], neg [K]) with pos/neg the sums of
    |w_ij dBCE/dz_ij| (unscaled) over positive/negative entries, or None when not wanted;
    writes scale * w_ij dBCE/dz_ij into ``out`` [R, K] (compute dtype) when ``want_grad``.
    """
    zf = z.to(pos_weight.dtype)
    width = zf.shape[1]
    col, has_pos = _positive_entries(labels, width)
    pos_f = has_pos.to(zf.dtype)
    z_at = zf.gather(1, col)
    probe = _nonfinite_probe(zf)

    # Negative weights: q_j (EQLv2, plain BCE: a row vector, no [R, K] tensor), q_j or 1
    # on verified entries (EQLv2 with a mask), or per row (EQL: background rows differ).
    one = torch.ones((), dtype=zf.dtype, device=zf.device)
    vf = None if verified is None else verified.to(zf.dtype)
    kv = 0 if verified is None else verified.shape[1]  # columns past C are never verified
    w = None
    if neg_weight_bg is not None:
        fg = (labels < num_fg).to(zf.dtype)[:, None]
        w = neg_weight_bg + fg * (neg_weight_fg - neg_weight_bg)
    elif vf is not None:
        w = torch.empty_like(zf).copy_(neg_weight_fg)
    if vf is not None:
        w[:, :kv].lerp_(one, vf)  # 1 where verified
    q_at = neg_weight_fg[col] if w is None else w.gather(1, col)  # [R, 1] as counted below

    s = torch.sigmoid(zf, out=out) if want_grad else torch.sigmoid(zf)
    s.scatter_(1, col, s.gather(1, col) * (1.0 - pos_f))  # positives out of the [R, K] sums
    m = torch.rsub(s, 1.0)
    torch.maximum(m, s, out=m)  # max(s, 1 - s) = sigmoid(|z|), in [0.5, 1]
    relu = torch.clamp(zf, min=0.0)
    if neg_weight_bg is None:
        # Weights q_j, and 1 = q_j + (1 - q_j) on verified entries: the BCE sum needs only
        # column sums, so the logs can be taken of column products.
        neg_bce = ((relu.sum(0) - _column_log_sums(m)) * neg_weight_fg).sum()
        if vf is not None:
            m_v = m[:, :kv].sub_(1.0).mul_(vf).add_(1.0)  # m on verified entries, else 1
            bce_v = relu[:, :kv].mul_(vf).sum(0) - _column_log_sums(m_v)
            neg_bce = neg_bce + (bce_v * (1.0 - neg_weight_fg[:kv])).sum()
    else:
        neg_bce = _total(relu.sub_(m.log_()).mul_(w))
    del m, relu
    # The positive entries: BCE softplus(-z), weight r; the [R, K] sum counted q relu(z).
    r_at = pos_weight[col]
    pos_bce = (pos_f * (r_at * F.softplus(-z_at) - q_at * torch.clamp(z_at, min=0.0))).sum()
    loss = (neg_bce + pos_bce) * scale + probe
    if not (want_grad or want_stats):
        return loss, None, None
    m_at = pos_f * r_at * torch.sigmoid(-z_at)  # |w dBCE/dz| of the positive entries
    # The gradient of a negative is s (w scale), with the product w scale formed first in
    # both branches: an entry whose weight is q_j gets the same bits with or without a
    # verified mask elsewhere.
    neg = None
    if w is None:
        if want_stats:
            neg = s.sum(0) * neg_weight_fg
        s.mul_(neg_weight_fg * scale)
    else:
        s.mul_(w.mul_(scale))
        if want_stats:
            neg = s.sum(0) / scale
    if want_grad:
        s.scatter_(1, col, torch.where(has_pos, -(m_at * scale), s.gather(1, col)))
    if not want_stats:
        return loss, None, None
    pos = torch.zeros(width, dtype=zf.dtype, device=zf.device).index_add_(0, col[:, 0],
                                                                          m_at[:, 0])
    return loss, pos, neg


def _focal_block(z, labels, quality, gamma, weight, alpha, inv_norm, soft: bool, out,
                 want_grad: bool, want_stats: bool):
    """Class-wise focal loss of one row block (focal, EFL eq. 4, QFL, EQFL eq. 5).

    z [R, C]; labels [R] in {-1 ignore, 0..C-1, C background}; quality [R] (soft targets,
    used when ``soft``) or None; gamma, weight [C]: focusing and weighting factor of each
    class; alpha: 0-dim (positives alpha, negatives 1 - alpha) or None; inv_norm: 0-dim,
    1 / avg_factor. Each element is scaled by w = weight_j alpha_t inv_norm, 0 on ignored
    rows.

    Binary targets (EFL, focal): with u = z for negatives and -z for the positive entry,
    -log p_t = softplus(u) and log(1 - p_t) = u - softplus(u), so the element loss
    w (1 - p_t)^gamma (-log p_t) (eq. 4) and its derivative magnitude
    w (1 - p_t)^gamma (gamma p_t (-log p_t) + 1 - p_t) (eq. 6 x alpha_t) need three exps,
    with no cancellation for confident predictions; the derivative is negative on
    positive entries.

    Soft targets (QFL, EQFL): with target t (quality for the labelled class, else 0),
    p = sigmoid(z) and d = p - t, the element loss is w |d|^gamma BCE(z, t) and its
    derivative w (gamma sign(d) |d|^(gamma-1) p (1-p) BCE + |d|^gamma d).

    Returns (loss sum, pos [C], neg [C]) with pos/neg the sums of |gradient| over
    positive/negative entries, or None when not wanted; writes the gradient into ``out``.
    """
    zf = z.to(gamma.dtype)
    width = zf.shape[1]
    col, has_pos = _positive_entries(labels, width)
    row = ((labels >= 0).to(zf.dtype) * inv_norm)[:, None]
    a_neg, a_pos = (1.0, 1.0) if alpha is None else (1.0 - alpha, alpha)
    w = (weight * a_neg) * row
    w.scatter_(1, col, torch.where(has_pos, (weight * a_pos)[col] * row, w.gather(1, col)))
    probe = _nonfinite_probe(zf)
    if soft:
        t = torch.zeros_like(zf).scatter_(
            1, col, torch.where(has_pos, quality.to(zf.dtype)[:, None], 0.0))
        p = torch.sigmoid(zf)
        q = torch.sigmoid(-zf)  # 1 - p without cancellation
        bce = torch.relu(zf) - t * zf + torch.log1p(torch.exp(-zf.abs()))
        d = p - t
        # for positives d = (1 - t) - (1 - p): no cancellation when t = 1 and p -> 1
        t_at = t.gather(1, col)
        d.scatter_(1, col, torch.where(has_pos, (1.0 - t_at) - q.gather(1, col),
                                       d.gather(1, col)))
        focal = torch.exp(gamma * torch.log(d.abs()))  # |d|^gamma, 0 where d = 0
        wf = w * focal
        loss = _total(wf * bce) + probe
        if not (want_grad or want_stats):
            return loss, None, None
        # sign(d) |d|^(gamma-1) p (1-p) = |d|^gamma p q / d, taken as 0 at d = 0 (0/0): the
        # limit for gamma >= 1, a subgradient choice for gamma < 1.
        slope = torch.nan_to_num(focal * p * q / d, nan=0.0, posinf=float("inf"),
                                 neginf=float("-inf"))
        g = w * (gamma * bce * slope) + wf * d
        if want_grad:
            out.copy_(g)
        m = g.abs_()
        if not want_stats:
            return loss, None, None
        return (loss, *_split_statistics(m, col, has_pos))
    u = _flip_positives(zf, col, has_pos)
    nlog_pt = F.softplus(u)          # -log p_t
    log_1m_pt = u.sub_(nlog_pt)      # log(1 - p_t)
    wf = w.mul_(torch.exp(gamma * log_1m_pt))  # w (1 - p_t)^gamma
    loss = _total(wf * nlog_pt) + probe
    if not (want_grad or want_stats):
        return loss, None, None
    m = wf.mul_(gamma * torch.exp(-nlog_pt) * nlog_pt + log_1m_pt.exp_())
    if want_grad:
        _write_gradient(out, m, col, has_pos)
    if not want_stats:
        return loss, None, None
    return (loss, *_split_statistics(m, col, has_pos))


sigmoid_bce_kernel = _Kernel(_sigmoid_bce_block)
focal_kernel = _Kernel(_focal_block)


def _run_blocks(kernel: _Kernel, logits: torch.Tensor, rows, consts, want_grad: bool,
                want_stats: bool, use_compile: bool):
    """(loss 0-dim, gradient [N, K] or None, stats [2, K]) of ``kernel`` over row blocks."""
    n, width = logits.shape
    compute = compute_dtype(logits)
    block = _EAGER_CPU_BLOCK if logits.device.type == "cpu" and not use_compile else _BLOCK
    step = max(1, block // max(width, 1))
    # The gradient is kept in the compute dtype: for half-precision logits it gets their
    # dtype only in backward, after the upstream gradient (a loss scale) is applied.
    grad = torch.empty(logits.shape, dtype=compute, device=logits.device) if want_grad else None
    loss = torch.zeros((), dtype=compute, device=logits.device)
    stats = torch.zeros(2, width, dtype=compute, device=logits.device)
    for start in range(0, n, step):
        end = min(n, start + step)
        block_rows = [None if r is None else r[start:end] for r in rows]
        out = None if grad is None else grad[start:end]
        block_loss, pos, neg = kernel(use_compile, logits[start:end], *block_rows, *consts,
                                      out, want_grad, want_stats)
        loss += block_loss
        if want_stats:
            stats[0] += pos
            stats[1] += neg
    return loss, grad, stats


class _FusedLoss(torch.autograd.Function):
    """loss, stats = _FusedLoss.apply(logits, kernel, rows, consts, want_stats, use_compile);
    the gradient w.r.t. the logits is computed in forward and saved for backward."""

    @staticmethod
    def forward(ctx, logits, kernel, rows, consts, want_stats, use_compile):
        loss, grad, stats = _run_blocks(kernel, logits.detach(), rows, consts,
                                        ctx.needs_input_grad[0], want_stats, use_compile)
        if grad is not None:
            # Autograd frees a saved tensor after this node's backward unless the graph is
            # retained, so a gradient returned unchanged becomes logits.grad (a leaf) or
            # flows upstream without a copy.
            ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        (grad,) = ctx.saved_tensors
        none = (None,) * 5
        if grad.dtype != ctx.logits_dtype:
            # Half-precision logits: scale in the compute dtype, then round once.
            out = torch.empty(grad.shape, dtype=ctx.logits_dtype, device=grad.device)
            return (torch.mul(grad, grad_loss, out=out), *none)
        # The usual upstream gradient 1 skips a pass over [N, C] where it can be read
        # without a device synchronisation (on the CPU). The saved gradient is not scaled
        # in place: a retained graph may still need it.
        if _checks._values_on_host(grad_loss) and grad_loss.item() == 1.0:
            return (grad, *none)
        return (grad * grad_loss, *none)


def _fused(kernel: _Kernel, logits: torch.Tensor, rows: Sequence[Optional[torch.Tensor]],
           consts: Sequence, want_stats: bool, use_compile: Optional[bool]):
    """Run ``kernel`` over ``logits`` [N, K] in row blocks through :class:`_FusedLoss`.

    rows: per-row tensors (first dim N) or None, sliced with the logits; consts: passed to
    every block unchanged (per-class vectors in the compute dtype, scalars). Returns (loss
    0-dim, stats [2, K]: row 0 positive, row 1 negative sums; zeros without ``want_stats``).
    """
    loss, stats = _FusedLoss.apply(logits.contiguous(), kernel, tuple(rows), tuple(consts),
                                   want_stats, resolve_compile(use_compile, logits.device))
    _checks.raise_if_nonfinite(loss, logits)
    return loss, stats


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def average(total: torch.Tensor, avg_factor, rows: int) -> torch.Tensor:
    """total / avg_factor in total's dtype (avg_factor as returned by ``check_avg_factor``;
    None: ``rows``, 1 when there are none). For the losses that do not run fused."""
    if avg_factor is None:
        return total / max(rows, 1)
    if isinstance(avg_factor, torch.Tensor):
        return total / avg_factor.to(total.dtype)
    return total / avg_factor


def _inverse(avg_factor, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / avg_factor as a 0-dim tensor on the logits' device; None means the number of rows
    (1 for an empty batch). A number is filled on the device (``torch.tensor`` would copy
    from the host and wait); a tensor stays on the device."""
    if isinstance(avg_factor, torch.Tensor):
        return torch.reciprocal(avg_factor.to(device=logits.device, dtype=dtype))
    value = max(logits.shape[0], 1) if avg_factor is None else avg_factor
    return torch.full((), 1.0 / value, dtype=dtype, device=logits.device)


def sigmoid_bce_loss(logits, labels, verified, pos_weight, neg_weight_fg, neg_weight_bg,
                     num_fg: int, avg_factor=None, *, want_stats: bool,
                     use_compile: Optional[bool]):
    """sum_ij w_ij BCE(z_ij, y_ij) / avg_factor through the fused path (inputs validated;
    avg_factor as returned by ``check_avg_factor``).

    pos_weight, neg_weight_fg [K], neg_weight_bg [K] or None: weights, see
    ``_sigmoid_bce_block``. Returns (loss, stats [2, K] of |w dBCE/dz| sums, without the
    1 / avg_factor).
    """
    dtype = compute_dtype(logits)
    dev = logits.device
    consts = [None if t is None else t.to(device=dev, dtype=dtype)
              for t in (pos_weight, neg_weight_fg, neg_weight_bg)]
    return _fused(sigmoid_bce_kernel, logits, (labels, verified),
                  (*consts, num_fg, _inverse(avg_factor, logits, dtype)), want_stats,
                  use_compile)


def focal_family_loss(logits, labels, quality, gamma, weight, alpha: Optional[float],
                      avg_factor=None, *, want_stats: bool, use_compile: Optional[bool]):
    """sum of a w |d|^gamma BCE / avg_factor through the fused path (inputs validated).

    gamma, weight: [C] focusing and weighting factors; quality None for binary targets.
    Returns (loss, stats [2, C] of |gradient| sums, 1 / avg_factor included).
    """
    dtype = compute_dtype(logits)
    dev = logits.device
    a = None if alpha is None else torch.full((), alpha, dtype=dtype, device=dev)
    consts = (gamma.to(device=dev, dtype=dtype), weight.to(device=dev, dtype=dtype), a,
              _inverse(avg_factor, logits, dtype), quality is not None)
    return _fused(focal_kernel, logits, (labels, quality), consts, want_stats, use_compile)
