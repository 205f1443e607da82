"""No host-device synchronisation in the training path of the losses and of their logging.

On CUDA, reading a tensor's value on the host (``.item()``, ``.tolist()``, ``bool(t)``,
``float(t)``, ...), an op whose output shape depends on values (``nonzero``, boolean-mask
indexing) or a copy of host data to the device (``torch.tensor(x, device=...)``) waits
for the device. These tests run on the CPU: the losses are told that no tensor is on the
host (``_checks._values_on_host`` patched to False, as for CUDA tensors) and every such
call, from any thread, is recorded by patching ``torch.Tensor`` and ``torch``.
"""

import contextlib
import threading
import traceback

import pytest
import torch
from detectron2.utils.events import EventStorage

from eql_d2.losses import (EQLLoss, EQLv2Loss, EqualizedFocalLoss, EqualizedQualityFocalLoss,
                           FocalLoss, QualityFocalLoss, SigmoidCELoss, SoftmaxCELoss,
                           SoftmaxEQLLoss)
from eql_d2.losses import _checks
from eql_d2.modeling.cls_losses.efl import EFL
from eql_d2.modeling.meta_arch.dense_loss import DenseClassificationLoss
from eql_d2.modeling.stats_logging import put_group_means, put_scalar_periodically

pytestmark = pytest.mark.usefixtures("one_thread")

C = 12
# Tensor methods that read values on the host or produce value-dependent shapes.
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu",
         "nonzero", "unique", "masked_select", "argwhere")
# torch functions with the same effect, and host-data-to-device constructors.
TORCH_READS = ("nonzero", "unique", "masked_select", "argwhere", "tensor", "as_tensor")


def _mask_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in items)


def _where():
    """The innermost frame of eql_d2 (or of this file) that made the call."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "eql_d2" in frame.filename or frame.filename == __file__:
            return f"{frame.filename.split('/')[-1]}:{frame.lineno} {frame.line}"
    return "?"


@contextlib.contextmanager
def recorded_host_reads():
    """Yields a list that receives (what, where) for every host read while active."""
    calls, lock = [], threading.Lock()

    def record(what):
        with lock:
            calls.append((what, _where()))

    saved = []

    def patch(owner, name, make):
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def method(name):
        def make(original):
            def wrapper(*args, **kwargs):
                record(f"Tensor.{name}")
                return original(*args, **kwargs)
            return wrapper
        return make

    def function(name):
        def make(original):
            def wrapper(*args, **kwargs):
                if name not in ("tensor", "as_tensor") or not isinstance(args[0], torch.Tensor):
                    record(f"torch.{name}")
                return original(*args, **kwargs)
            return wrapper
        return make

    def indexing(name):
        def make(original):
            def wrapper(self, index, *rest):
                if _mask_index(index):
                    record(f"Tensor.{name} with a mask")
                return original(self, index, *rest)
            return wrapper
        return make

    try:
        for name in READS:
            patch(torch.Tensor, name, method(name))
        for name in TORCH_READS:
            patch(torch, name, function(name))
        for name in ("__getitem__", "__setitem__"):
            patch(torch.Tensor, name, indexing(name))
        yield calls
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@pytest.fixture
def device_tensors(monkeypatch):
    """Every tensor is treated as living on an accelerator, with debug checks off."""
    monkeypatch.setattr(_checks, "_values_on_host", lambda t: False)
    monkeypatch.delenv(_checks.DEBUG_CHECKS_ENV, raising=False)


def _batch(n=90, seed=0, objectness=False, ignore=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, C + objectness, generator=g) * 3 - 2).to(dtype)
    labels = torch.randint(0, C, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.5] = C
    if ignore:
        labels[torch.rand(n, generator=g) < 0.1] = -1
    verified = torch.rand(n, C, generator=g) < 0.3
    quality = torch.rand(n, generator=g)
    return logits, labels, verified, quality


def _stateful(loss_fn):
    loss_fn.neg_grad.fill_(10.0)
    loss_fn.pos_grad.copy_(torch.linspace(0.5, 15.0, loss_fn.num_classes))
    return loss_fn.train()


def _training_steps():
    """(name, loss module, logits, args, upstream scale) for every loss and path."""
    z, y, v, q = _batch()
    zo, yo, vo, _ = _batch(seed=1, objectness=True)
    zi, yi, _, qi = _batch(seed=2, ignore=True)
    freq = torch.linspace(1e-4, 0.2, C)
    norm_t = torch.tensor(17.0)  # a device tensor in these tests: passed on, not read
    yield "eql", EQLLoss(freq, lambda_=0.05), z, (y, v), None
    yield "eql no verified", EQLLoss(freq, lambda_=0.05), z, (y,), None
    yield "sigmoid", SigmoidCELoss(), z, (y,), None
    yield "eqlv2", _stateful(EQLv2Loss(C)), zo, (yo, vo), None
    yield "eqlv2 no verified", _stateful(EQLv2Loss(C)), zo, (yo,), None
    yield "efl", _stateful(EqualizedFocalLoss(C)), zi, (yi, 17.0), None
    yield "efl tensor avg_factor", _stateful(EqualizedFocalLoss(C)), zi, (yi, norm_t), None
    yield "eqfl", _stateful(EqualizedQualityFocalLoss(C)), zi, (yi, qi, norm_t), None
    yield "focal", FocalLoss(), zi, (yi, 17.0), None
    yield "qfl", QualityFocalLoss(), zi, (yi, qi, 17.0), None
    yield "softmax", SoftmaxCELoss(), zo, (yo,), None  # K = C + 1 with background
    yield "seql", SoftmaxEQLLoss(freq, lambda_=0.05, gamma=0.9), z[:, :C], (y % C,), None
    # every loss takes a device avg_factor (two-stage heads pass theirs too) or none
    yield "eql tensor avg_factor", EQLLoss(freq, lambda_=0.05), z, (y, v, norm_t), None
    yield "eqlv2 tensor avg_factor", _stateful(EQLv2Loss(C)), zo, (yo, vo, norm_t), None
    yield "softmax tensor avg_factor", SoftmaxCELoss(), zo, (yo, norm_t), None
    yield "seql tensor avg_factor", SoftmaxEQLLoss(freq, lambda_=0.05, gamma=0.9), z[:, :C], \
        (y % C, norm_t), None
    yield "efl no avg_factor", _stateful(EqualizedFocalLoss(C)), zi, (yi,), None
    # the upstream gradient is a tensor (a loss weight, a GradScaler scale): backward
    # scales without reading it
    yield "efl scaled", _stateful(EqualizedFocalLoss(C)), zi, (yi, norm_t), 1024.0
    yield "eqlv2 half scaled", _stateful(EQLv2Loss(C)), zo.half(), (yo, vo), 65536.0
    yield "eql bfloat16", EQLLoss(freq, lambda_=0.05), z.bfloat16(), (y, v), None


def _run(loss_fn, z, args, scale):
    z = z.detach().clone().requires_grad_()
    loss = loss_fn(z, *args)
    if scale is not None:
        loss = loss * torch.full((), scale)
    loss.backward()
    return z.grad


def test_recorder_sees_host_reads_on_the_cpu_and_under_the_debug_switch(monkeypatch):
    """The detector works: on the CPU the checks read labels (free there); with device
    tensors they do so only under EQL_D2_DEBUG_CHECKS=1, where bad labels are caught."""
    z, y, _, _ = _batch(objectness=True)
    with recorded_host_reads() as calls:
        _run(EQLv2Loss(C).train(), z, (y,), None)
    assert any(what == "Tensor.tolist" for what, _ in calls)

    monkeypatch.setattr(_checks, "_values_on_host", lambda t: False)
    monkeypatch.setenv(_checks.DEBUG_CHECKS_ENV, "1")
    with recorded_host_reads() as calls:
        _run(EQLv2Loss(C).train(), z, (y,), None)
    assert any(what == "Tensor.tolist" for what, _ in calls)
    bad = y.clone()
    bad[3] = C + 1
    with pytest.raises(ValueError, match="labels"):
        EQLv2Loss(C)(z, bad)
    monkeypatch.setenv(_checks.DEBUG_CHECKS_ENV, "maybe")
    with pytest.raises(ValueError, match=_checks.DEBUG_CHECKS_ENV):
        EQLv2Loss(C)(z, y)


@pytest.mark.parametrize("case", [c[0] for c in _training_steps()])
def test_training_step_reads_nothing_back(device_tensors, case):
    _, loss_fn, z, args, scale = next(c for c in _training_steps() if c[0] == case)
    _run(loss_fn, z, args, scale)  # once outside: lazy set-up may read what it likes
    with recorded_host_reads() as calls:
        grad = _run(loss_fn, z, args, scale)
    assert not calls, calls
    assert grad.dtype == z.dtype and torch.isfinite(grad.float()).all()


def test_threads_and_retained_graph_read_nothing_back(device_tensors, monkeypatch):
    """Several intra-op threads, many row blocks and a retained graph."""
    import eql_d2.losses._fused as fused

    monkeypatch.setattr(fused, "_EAGER_CPU_BLOCK", 7 * C)
    z, y, _, _ = _batch(n=200, seed=3, ignore=True)
    loss_fn = _stateful(EqualizedFocalLoss(C))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _run(loss_fn, z, (y, 5.0), None)
        with recorded_host_reads() as calls:
            x = z.clone().requires_grad_()
            loss = loss_fn(x, y, 5.0)
            loss.backward(retain_graph=True)
            loss.backward()
    finally:
        torch.set_num_threads(previous)
    assert not calls, calls


def test_logging_reads_only_on_logging_iterations(device_tensors):
    groups = ["r"] * 3 + ["c"] * 4 + ["f"] * (C - 7)
    head = DenseClassificationLoss(criterion=EFL(C), class_frequency=groups,
                                   log_period=20).train()
    z, y, _, _ = _batch(seed=4, ignore=True)
    z, y = z[None], y[None]  # one image, every anchor
    pos = (y >= 0) & (y < C)
    with EventStorage(start_iter=1) as storage:
        with recorded_host_reads() as calls:
            head(z.clone().requires_grad_(), y, pos, 9.0)
            put_scalar_periodically("num_pos_anchors", (y >= 0).sum() / 2)
        assert not calls, calls
        assert not storage.latest()
        storage.iter = 20
        head(z.clone().requires_grad_(), y, pos, 9.0)
        put_scalar_periodically("num_pos_anchors", (y >= 0).sum() / 2)
        latest = storage.latest()
    for name in ("efl/gradient_ratio", "efl/focusing_factor"):
        assert all(latest[f"{name}/{g}"][1] == 20 for g in "rcf")
    expected = head.criterion.focusing_factor
    assert latest["efl/focusing_factor/c"][0] == pytest.approx(expected[3:7].mean().item())
    assert latest["num_pos_anchors"] == (pytest.approx((y >= 0).sum().item() / 2), 20)
    assert storage.smoothing_hints()["num_pos_anchors"] is False


def test_group_means_validate_and_skip_empty_groups():
    with EventStorage(start_iter=0) as storage:
        with pytest.raises(ValueError, match="class_frequency"):
            put_group_means("x", torch.ones(3), ["r", "c"])
        with pytest.raises(ValueError, match="'r', 'c' or 'f'"):
            put_group_means("x", torch.ones(2), ["r", "rare"])
        put_group_means("x", torch.tensor([1.0, 3.0, float("inf")]), ["c", "c", "f"])
        latest = storage.latest()
    assert latest["x/c"][0] == 2.0 and latest["x/f"][0] == float("inf")
    assert "x/r" not in latest
