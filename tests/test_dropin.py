"""Drop-in parity with PyTorch, on PyTorch's own sample sets (issue 15).

Every sample of the OpInfo of ``nn.functional.cross_entropy``
(``torch.testing._internal.common_methods_invocations.op_db``) and of the
ModuleInfo of ``nn.CrossEntropyLoss`` (``common_modules.module_db``) is run
through ``autobalance.parametric_cross_entropy`` (passing exactly what the
sample passes: identity scale and shift) and through
``ParametricCE(K, **constructor kwargs)`` (its learnable offsets start at 0,
so the module starts at identity tables), on both backends (``"fused"`` and
``"reference"``), for float32 and float64 samples. Each must equal PyTorch's
result at ``torch.testing.assert_close``'s default tolerances for the dtype:

- the output: value, dtype and shape (NaN exactly where PyTorch gives NaN);
- the gradient, for one fixed random cotangent of the output's shape, with
  respect to every sample tensor that requires grad: the input, and the
  probability target where it requires grad.

What the sample sets hold (torch 2.13): the OpInfo has 21 samples per dtype:
``[N, K]``, ``[N, K, d1..dk]`` (k = 1, 2, 3) logits, class-index targets and
probability targets (``requires_grad=True``, values in [0, 1) that do not
sum to 1), the three reductions, ``[K]`` class weights drawn from
[-9, 9] (so negative weights, and a weighted mean whose denominator may be
near 0), and ``ignore_index=1``. No label smoothing and no unbatched input.
The ModuleInfo has 105 samples per dtype: ``[N, K]``, ``[N, K, d1..dk]``
(k up to 4) and unbatched ``[K]`` logits, probability targets (softmaxes
of a tensor that requires grad, so they sum to 1 and require grad; the
gradient is compared w.r.t. the target itself), class weights (negative ones too),
``ignore_index=1``, ``label_smoothing=0.15`` (with class indices, with
ignore_index and with probability targets) and the three reductions.
``test_sample_forms`` counts each form and fails if one disappears.

``test_moduleinfo_error_inputs`` runs the ModuleInfo's error inputs (7:
wrong target dtype or shape, a weight of the wrong length, a probability
target with ``ignore_index``, ``label_smoothing`` out of [0, 1]): where
PyTorch raises, the functional and the module (at construction or in
forward) must raise too; the exception type and message may differ.

The samples are drawn under a fixed seed (``SEED``), so every run compares
the same values; ``test_module_float64_class_weight`` adds one fixed case
that the random draws hit only by chance (a float64 class weight that is not
a float32, in a weighted sum that nearly cancels).

Dtypes compared: float32 and float64, every sample of each, none skipped.
Not compared: the float16 and bfloat16 samples (the OpInfo lists both on the
CPU, the ModuleInfo float16). The package supports these dtypes, but it
computes in float32 and casts once, while PyTorch's CPU kernels round
intermediate results to the half dtype, so the two differ by an ulp or a few
of the half dtype on many samples: at the default tolerances (atol 1e-5)
8 of 21 OpInfo and 52 of 105 ModuleInfo float16 samples differ, 7 and 45 in
bfloat16 (torch 2.13, fused backend). PyTorch's own ModuleInfo loosens its
float16 CPU forward tolerance to atol 3e-2 for the same reason.
``tests/test_ops.py`` checks the half dtypes against a float64 oracle.

``torch.testing._internal`` imports ``expecttest`` (a test dependency, in
the Makefile's setup and the ``test`` extra). That import also freezes
``torch.backends``' global flags (``disable_global_flags``); the flag is restored right after it,
so the rest of a pytest session is unaffected. The import of the sample sets
takes about 12 s on two cores; everything else here a few seconds.
"""
import inspect
import random
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autobalance import ParametricCE, parametric_cross_entropy

_FLAGS_FROZEN = torch.backends.flags_frozen()
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

# common_utils freezes torch.backends' global flags on import (for its own
# test classes); undo that for the rest of the pytest session.
if not _FLAGS_FROZEN and torch.backends.flags_frozen():
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
assert torch.backends.flags_frozen() == _FLAGS_FROZEN

DTYPES = (torch.float32, torch.float64)
SEED = 0
BACKENDS = ("fused", "reference")
# nn.CrossEntropyLoss's constructor, to name positional constructor arguments
_CE_INIT = inspect.signature(nn.CrossEntropyLoss.__init__)


def _opinfo():
    found = [op for op in op_db if op.name == "nn.functional.cross_entropy" and op.variant_test_name == ""]
    assert len(found) == 1, f"expected one OpInfo for nn.functional.cross_entropy, found {len(found)}"
    return found[0]


def _moduleinfo():
    found = [m for m in module_db if m.module_cls is nn.CrossEntropyLoss]
    assert len(found) == 1, f"expected one ModuleInfo for nn.CrossEntropyLoss, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------ samples as plain cases

class Case:
    """One sample: ``input``, ``target`` and keyword arguments of the loss (the
    module's constructor arguments for ModuleInfo samples). ``desc`` names it
    in failure messages."""

    def __init__(self, desc, input, target, kwargs):
        self.desc, self.input, self.target, self.kwargs = desc, input, target, kwargs

    @property
    def num_classes(self):
        return self.input.shape[1] if self.input.dim() >= 2 else self.input.shape[0]

    def leaves(self):
        """Fresh leaf copies of the input and target (keeping requires_grad)."""
        def leaf(t):
            return t.detach().clone().requires_grad_(t.requires_grad)
        return leaf(self.input), leaf(self.target)

    def describe(self):
        kw = {k: (f"tensor{list(v.shape)} min {v.min().item():.3g}" if isinstance(v, torch.Tensor) else v)
              for k, v in self.kwargs.items()}
        t = self.target
        kind = "probability target" if t.is_floating_point() else "index target"
        return (f"{self.desc}: input {list(self.input.shape)} {self.input.dtype}, {kind} {list(t.shape)}"
                f"{' (requires grad)' if t.requires_grad else ''}, {kw}")


def opinfo_cases(dtype):
    op, cases = _opinfo(), []
    for i, s in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
        assert len(s.args) == 1, f"OpInfo sample {i}: expected (input, target), got {len(s.args) + 1} arguments"
        cases.append(Case(f"OpInfo sample {i}", s.input, s.args[0], dict(s.kwargs)))
    return cases


def moduleinfo_cases(dtype):
    mi, cases = _moduleinfo(), []
    for i, m in enumerate(mi.module_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=True, training=True)):
        ci, fi = m.constructor_input, m.forward_input
        bound = _CE_INIT.bind(None, *ci.args, **ci.kwargs)  # positional constructor args by name
        kwargs = {k: v for k, v in bound.arguments.items() if k != "self"}
        assert len(fi.args) == 2 and not fi.kwargs, f"ModuleInfo sample {m.desc}: expected forward(input, target)"
        cases.append(Case(f"ModuleInfo sample {i} ({m.desc})", fi.args[0], fi.args[1], kwargs))
    return cases


_CACHE = {}


def cases(kind, dtype):
    """The samples, drawn (by ``make_tensor``, from the global generators)
    under a fixed seed, so that every run compares the same values."""
    key = (kind, dtype)
    if key not in _CACHE:
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        torch.manual_seed(SEED)
        random.seed(SEED)
        try:
            _CACHE[key] = (opinfo_cases if kind == "opinfo" else moduleinfo_cases)(dtype)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
    return _CACHE[key]


# ------------------------------------------------------------------ comparison

def _run(loss_fn, case, seed):
    """Output and the gradients w.r.t. the leaves that require grad, for a
    fixed random cotangent."""
    x, t = case.leaves()
    out = loss_fn(x, t)
    leaves = [v for v in (x, t) if v.requires_grad]
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, cot, allow_unused=True) if out.requires_grad and leaves else ()
    return out, [name for name, v in (("input", x), ("target", t)) if v.requires_grad], grads


def _compare(case, ours, theirs, seed):
    """None if ``ours`` equals PyTorch's ``theirs`` on ``case``, else the reason."""
    try:
        expected, names, expected_grads = _run(theirs, case, seed)
    except Exception as e:  # PyTorch rejects it too: not a drop-in sample
        return f"PyTorch itself raised {type(e).__name__}: {e}"
    try:
        actual, _, actual_grads = _run(ours, case, seed)
    except Exception as e:
        return f"raised {type(e).__name__}: {e}"
    try:
        torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"output: {m}")
        if len(actual_grads) != len(expected_grads):
            return f"gradients: {len(actual_grads)} returned, PyTorch has {len(expected_grads)} ({names})"
        for name, a, e in zip(names, actual_grads, expected_grads):
            if a is None:
                return f"no gradient w.r.t. the {name} (PyTorch has one)"
            torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m, name=name: f"grad of {name}: {m}")
    except AssertionError as e:
        return str(e)
    return None


def _functional(backend, kwargs):
    return lambda x, t: parametric_cross_entropy(x, t, **kwargs, backend=backend)


def _module(backend, case):
    module = ParametricCE(case.num_classes, **case.kwargs, backend=backend)
    return lambda x, t: module(x, t)


def _check_all(kind, dtype, form, backend):
    """Compare every sample; fail listing each sample that differs, and unless
    the number compared equals the number of samples."""
    samples = cases(kind, dtype)
    assert samples, f"no {kind} samples for {dtype}"
    failures, compared = [], 0
    for i, case in enumerate(samples):
        if form == "functional":
            reason = _compare(case, _functional(backend, case.kwargs), lambda x, t: F.cross_entropy(x, t, **case.kwargs),
                              seed=i)
        else:
            try:
                ours = _module(backend, case)
            except Exception as e:
                reason = f"ParametricCE({case.num_classes}, **{sorted(case.kwargs)}) raised {type(e).__name__}: {e}"
            else:
                theirs = nn.CrossEntropyLoss(**case.kwargs)
                reason = _compare(case, ours, theirs, seed=i)
        if reason is None:
            compared += 1
        else:
            failures.append(f"{case.describe()}\n    {reason}")
    assert not failures, (f"{len(failures)} of {len(samples)} {kind} samples differ from PyTorch "
                          f"({form}, backend={backend!r}, {dtype}):\n" + "\n".join(failures))
    assert compared == len(samples), f"compared {compared} of {len(samples)} {kind} samples"
    return compared


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,form", [("opinfo", "functional"), ("opinfo", "module"),
                                       ("moduleinfo", "module"), ("moduleinfo", "functional")])
def test_every_sample_matches_pytorch(kind, form, dtype, backend):
    """On every OpInfo (``F.cross_entropy``) and ModuleInfo
    (``nn.CrossEntropyLoss``) sample, ``parametric_cross_entropy(input, target,
    **kwargs)`` == ``F.cross_entropy`` and ``ParametricCE(K, **kwargs)`` ==
    ``nn.CrossEntropyLoss(**kwargs)`` (an OpInfo sample's keyword arguments are
    all constructor arguments; a ModuleInfo sample's constructor arguments all
    keyword arguments of the functional)."""
    _check_all(kind, dtype, form, backend)


def _error_cases(dtype):
    mi = _moduleinfo()
    out = []
    for i, e in enumerate(mi.module_error_inputs_func(mi, device="cpu", dtype=dtype, requires_grad=False,
                                                       training=True)):
        m = e.module_error_input
        ci, fi = m.constructor_input, m.forward_input
        kwargs = {k: v for k, v in _CE_INIT.bind(None, *ci.args, **ci.kwargs).arguments.items() if k != "self"}
        out.append((f"error input {i} ({e.error_regex!r})", kwargs, fi.args))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_moduleinfo_error_inputs(backend):
    """Where PyTorch raises on a ModuleInfo error input, ours raises too."""
    cases_ = _error_cases(torch.float32)
    assert cases_, "the ModuleInfo has no error inputs"
    silent = []
    for desc, kwargs, args in cases_:
        with pytest.raises(Exception):
            nn.CrossEntropyLoss(**kwargs)(*args)
        try:
            parametric_cross_entropy(*args, **kwargs, backend=backend)
        except (RuntimeError, ValueError, TypeError, IndexError):
            pass
        else:
            silent.append(f"functional: {desc}")
        try:
            k = args[0].shape[1] if args[0].dim() >= 2 else args[0].shape[0]
            ParametricCE(k, **kwargs, backend=backend)(*args)
        except (RuntimeError, ValueError, TypeError, IndexError):
            pass
        else:
            silent.append(f"module: {desc}")
    assert not silent, "PyTorch raises but ours does not:\n" + "\n".join(silent)


# ------------------------------------------------------------------ what the samples hold

def _forms(case):
    x, t, kw = case.input, case.target, case.kwargs
    forms = {"all"}
    forms.add("unbatched [K]" if x.dim() == 1 else "[N, K]" if x.dim() == 2 else "N-d [N, K, d1..dk]")
    if t.is_floating_point():
        forms.add("probability target")
        if t.requires_grad:
            forms.add("probability target requiring grad")
        if not torch.allclose(t.detach().sum(1 if x.dim() >= 2 else 0), torch.ones((), dtype=t.dtype)):
            forms.add("probability target not summing to 1")
    forms.add(f"reduction={kw.get('reduction', 'mean')}")
    if kw.get("label_smoothing", 0.0):
        forms.add("label smoothing")
    if kw.get("ignore_index", -100) != -100:
        forms.add("ignore_index")
    w = kw.get("weight")
    if w is not None:
        forms.add("class weight")
        if (w < 0).any():
            forms.add("negative class weight")
    return forms


def test_sample_forms():
    """Counts the samples of each form (printed with ``pytest -s``), and fails
    if a form these tests rely on has vanished from PyTorch's sample sets."""
    counts = {}
    for kind in ("opinfo", "moduleinfo"):
        for dtype in DTYPES:
            c = Counter(f for case in cases(kind, dtype) for f in _forms(case))
            counts[kind, dtype] = c
            print(f"\n{kind} {dtype}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    for dtype in DTYPES:
        op, mod = counts["opinfo", dtype], counts["moduleinfo", dtype]
        assert op["all"] > 0 and mod["all"] > 0
        for form in ("[N, K]", "N-d [N, K, d1..dk]", "probability target requiring grad",
                     "negative class weight", "ignore_index", "reduction=none", "reduction=sum", "reduction=mean"):
            assert op[form] > 0, f"OpInfo ({dtype}) has no sample of form {form!r}"
            assert mod[form] > 0, f"ModuleInfo ({dtype}) has no sample of form {form!r}"
        assert op["probability target not summing to 1"] > 0, f"OpInfo ({dtype}): every probability target sums to 1"
        for form in ("unbatched [K]", "label smoothing"):
            assert mod[form] > 0, f"ModuleInfo ({dtype}) has no sample of form {form!r}"


# ------------------------------------------------------------------ keyword parity

def test_functional_signature_starts_with_cross_entropy():
    ours = list(inspect.signature(parametric_cross_entropy).parameters.values())
    theirs = list(inspect.signature(F.cross_entropy).parameters.values())
    assert len(ours) >= len(theirs)
    for a, b in zip(ours, theirs):
        assert (a.name, a.kind, a.default) == (b.name, b.kind, b.default), \
            f"parametric_cross_entropy's parameter {a} differs from F.cross_entropy's {b}"
    for a in ours[len(theirs):]:  # scale, shift, group, backend: keyword-only extras
        assert a.kind == inspect.Parameter.KEYWORD_ONLY, f"extra parameter {a} must be keyword-only"


def test_module_accepts_cross_entropy_loss_keywords():
    ours = inspect.signature(ParametricCE.__init__).parameters
    for name, p in _CE_INIT.parameters.items():
        if name == "self":
            continue
        assert name in ours, f"ParametricCE does not accept nn.CrossEntropyLoss's keyword {name!r}"
        q = ours[name]
        assert q.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD), q
        assert q.default == p.default, f"ParametricCE's {name} defaults to {q.default!r}, PyTorch's to {p.default!r}"
    ours_fwd = list(inspect.signature(ParametricCE.forward).parameters)[1:3]
    assert ours_fwd == list(inspect.signature(nn.CrossEntropyLoss.forward).parameters)[1:3]


@pytest.mark.filterwarnings("ignore::UserWarning")  # PyTorch's deprecation warning for size_average / reduce
@pytest.mark.parametrize("size_average", [None, True, False])
@pytest.mark.parametrize("reduce", [None, True, False])
def test_legacy_size_average_reduce(size_average, reduce):
    """The legacy ``size_average`` / ``reduce`` keywords mean what they mean in PyTorch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (6, 3), generator=g)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    kw = dict(weight=w, size_average=size_average, reduce=reduce)
    case = Case("legacy", x.requires_grad_(), y, kw)
    for backend in BACKENDS:
        reason = _compare(case, _functional(backend, kw), lambda x, t: F.cross_entropy(x, t, **kw), seed=0)
        assert reason is None, f"functional, backend={backend}: {reason}"
        reason = _compare(case, _module(backend, case), nn.CrossEntropyLoss(**kw), seed=0)
        assert reason is None, f"module, backend={backend}: {reason}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_module_float64_class_weight(reduction, backend):
    """``ParametricCE(K, weight=w)`` with a float64 class weight on float64
    logits equals ``nn.CrossEntropyLoss(weight=w)`` at float64 tolerance: the
    weight must not pass through float32 on the way. (PyTorch's ModuleInfo
    draws its weights at random from [-9, 9]; rounded to float32 they make a
    few float64 samples of most draws differ by 1e-7 to 5e-7 relative; here
    1 + 1e-7 is not a float32 and rows 0 and 1 have the same loss with weights
    1 + 1e-7 and -1, so the sum nearly cancels and shows it on every run.
    Per row, float32 rounding stays below float64's rtol, so "none" cannot.)"""
    w = torch.tensor([1 + 1e-7, -1.0, 1 / 3], dtype=torch.float64)
    x = torch.tensor([[0.0, 0.0, 20.0], [0.0, 0.0, 20.0], [-3.0, -3.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    case = Case("float64 class weight", x.requires_grad_(), y, dict(weight=w, reduction=reduction))
    reason = _compare(case, _functional(backend, case.kwargs),
                      lambda x, t: F.cross_entropy(x, t, weight=w, reduction=reduction), seed=0)
    assert reason is None, f"functional: {reason}"
    reason = _compare(case, _module(backend, case), nn.CrossEntropyLoss(weight=w, reduction=reduction), seed=0)
    assert reason is None, f"module: {reason}"
