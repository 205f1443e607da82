"""The torch.compile'd fused kernels agree with the eager ones (loss, gradient, statistics).

Compiling on CPU takes several seconds per kernel variant (less with inductor's on-disk
cache), so this file covers the three training variants only.
"""

import functools
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


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # the tests below compile with their own backends
    yield
    torch._dynamo.reset()


def _compile_with(monkeypatch, backend):
    """Make the loss kernels compile through Dynamo with ``backend`` (no C++ compiler needed)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend=backend))


def test_compile_failure_falls_back_to_eager_naming_the_cause(monkeypatch, fresh_dynamo):
    from torch._inductor.exc import InvalidCxxCompiler

    from eql_d2.losses import _fused

    attempts = []

    def no_compiler(gm, example_inputs):  # what inductor meets without a C++ compiler
        attempts.append(1)
        raise InvalidCxxCompiler("g++")

    _compile_with(monkeypatch, no_compiler)
    monkeypatch.setattr(_fused, "focal_kernel", _fused._Kernel(_fused._focal_block))
    logits, labels, _, _ = _batch(50, 6, 0)
    expected = EqualizedFocalLoss(6, use_compile=False)(logits, labels, 2.0)
    with pytest.warns(RuntimeWarning, match="BackendCompilerFailed.*Compiler: g\+\+ is not found"):
        first = EqualizedFocalLoss(6, use_compile=True)(logits, labels, 2.0)
    assert attempts
    tried = len(attempts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, then eager silently
        second = EqualizedFocalLoss(6, use_compile=True)(logits, labels, 2.0)
    assert len(attempts) == tried  # no second compile attempt
    assert torch.equal(first, expected) and torch.equal(second, expected)


@pytest.mark.parametrize("failure", ["entry point", "unsupported", "triton missing",
                                     "cpp compile error", "oom", "device assert"])
def test_any_compiled_failure_falls_back_to_eager_once(monkeypatch, failure):
    """Whatever the compiled kernel raises, one warning names it and the eager kernel gives
    the result, then and from then on, without another compile attempt."""
    from torch._dynamo.exc import Unsupported
    from torch._inductor.exc import CppCompileError, InductorError, TritonMissing

    from eql_d2.losses import _fused

    exc = {"entry point": RuntimeError("torch.compile is not supported on Python 3.99"),
           "unsupported": Unsupported("call_function: data-dependent branch"),
           "triton missing": TritonMissing(None),
           "cpp compile error": InductorError(CppCompileError(["g++", "k.cpp"], "k.cpp:1: error"),
                                              None),
           "oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
           "device assert": RuntimeError("CUDA error: device-side assert triggered")}[failure]
    compiles = []

    def fake_compile(fn, **kwargs):
        compiles.append(fn)
        if failure == "entry point":
            raise exc

        def run(*args):
            raise exc
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    kernel = _fused._Kernel(lambda x: x * 2)
    with pytest.warns(RuntimeWarning, match=type(exc).__name__):
        out = kernel(True, torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0)) and kernel._failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = kernel(True, torch.ones(3))
    assert torch.equal(again, out) and len(compiles) == 1


def test_error_of_the_kernel_itself_reaches_the_caller(monkeypatch, fresh_dynamo):
    """Dynamo compiles the kernel (eager backend), which then fails while running: the
    eager kernel runs the same call and raises the same error to the caller."""
    from eql_d2.losses import _fused

    graphs = []

    def counting_eager(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    _compile_with(monkeypatch, counting_eager)

    def pick(z, idx):
        return z.gather(1, idx) * 2

    kernel = _fused._Kernel(pick)
    z = torch.arange(12.0).reshape(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="out of bounds"):
            kernel(True, z, torch.tensor([[0], [9], [1]]))  # index 9 of 4 columns
    assert graphs and kernel._failed  # it was compiled, then failed to run
    assert sum("using the eager kernel" in str(w.message) for w in caught) == 1
    out = kernel(True, z, torch.tensor([[0], [3], [1]]))
    assert torch.equal(out, torch.tensor([[0.0], [14.0], [18.0]]))
