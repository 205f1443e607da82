"""The torch.compile'd fused kernels agree with the eager ones (loss, gradient, statistics).

Compiling on CPU takes several seconds per kernel variant (less with inductor's on-disk
cache), so this file covers the three training variants only.
"""

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from eql_d2.losses import COMPILE_ENV, EQLv2Loss, EqualizedFocalLoss, EqualizedQualityFocalLoss
from eql_d2.losses._fused import resolve_compile

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel_close(a, b, rtol=1e-5):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rtol * b.double().abs().max().item(), err


def _batch(n, c, seed, objectness=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c + objectness, generator=g) * 4 - 2
    labels = torch.randint(0, c, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.6] = c
    if not objectness:
        labels[torch.rand(n, generator=g) < 0.1] = -1
    quality = torch.rand(n, generator=g)
    verified = torch.rand(n, c, generator=g) < 0.2
    return logits, labels, quality, verified


@pytest.mark.parametrize("family", ["efl", "eqfl", "eqlv2"])
def test_compiled_kernel_matches_eager(family):
    c = 37
    make = {"efl": lambda m: EqualizedFocalLoss(c, use_compile=m),
            "eqfl": lambda m: EqualizedQualityFocalLoss(c, use_compile=m),
            "eqlv2": lambda m: EQLv2Loss(c, use_compile=m)}[family]
    eager, compiled = make(False).train(), make(True).train()
    graphs_before = counters["stats"]["unique_graphs"]
    # Several steps with a different N each (the detectors' case): one dynamic graph.
    for step, n in enumerate((3000, 1234, 400)):
        logits, labels, quality, verified = _batch(n, c, step, objectness=family == "eqlv2")
        args = {"efl": (labels, 5.0), "eqfl": (labels, quality, 5.0),
                "eqlv2": (labels, verified)}[family]
        results = []
        for loss_fn in (eager, compiled):
            z = logits.clone().requires_grad_()
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # no silent eager fallback
                loss = loss_fn(z, *args)
            loss.backward()
            results.append((loss.detach(), z.grad))
        _rel_close(results[1][0], results[0][0])
        _rel_close(results[1][1], results[0][1])
        _rel_close(compiled.pos_grad, eager.pos_grad)
        _rel_close(compiled.neg_grad, eager.neg_grad)
    assert counters["stats"]["unique_graphs"] - graphs_before <= 1  # no recompile per N


def test_compile_switch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert resolve_compile(None, cpu) is False and resolve_compile(None, cuda) is True
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert resolve_compile(None, cpu) is True
    assert resolve_compile(False, cpu) is False  # the constructor argument wins
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert resolve_compile(None, cuda) is False and resolve_compile(True, cuda) is True
    monkeypatch.setenv(COMPILE_ENV, "maybe")
    with pytest.raises(ValueError, match=COMPILE_ENV):
        resolve_compile(None, cpu)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    from eql_d2.losses import _fused

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = _fused._Kernel(_fused._focal_block)
    monkeypatch.setattr(_fused, "focal_kernel", kernel)
    logits, labels, _, _ = _batch(50, 6, 0)
    expected = EqualizedFocalLoss(6, use_compile=False)(logits, labels, 2.0)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        first = EqualizedFocalLoss(6, use_compile=True)(logits, labels, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then eager silently
        second = EqualizedFocalLoss(6, use_compile=True)(logits, labels, 2.0)
    assert torch.equal(first, expected) and torch.equal(second, expected)
