"""Every bad input raises a clear error of the right type that names the
argument: on the raw fused op, the reference op, the fake (meta) kernels,
``parametric_cross_entropy`` (both backends) and ``ParametricCE``."""
import pytest
import torch

import autobalance
from autobalance import ParametricCE, frequency_clusters, loss_tables, reference
from conftest import OPS

from conftest import pce  # noqa: E402
N, K, G = 6, 5, 2
# The C++ checks print c10 dtype names, the Python ones torch names; accept either.
F32, F64 = r"(torch\.float32|Float)", r"(torch\.float64|Double)"

# Callers: all take (logits, target, group, weight, scale, shift, ignore_index).
VALUE_CALLERS = ["op", "reference_op", "fused", "reference", "module"]  # see the data
SHAPE_CALLERS = VALUE_CALLERS + ["meta"]                                  # fake kernels too
TABLE_CALLERS = ["op", "reference_op", "fused", "reference", "meta"]      # take tables


def call(caller, logits, target, group, weight, scale, shift, ignore_index=-100):
    if caller == "op":
        return OPS.parametric_ce(logits, target, group, weight, scale, shift, ignore_index)
    if caller == "reference_op":
        return reference.parametric_ce(logits, target, group, weight, scale, shift, ignore_index)
    if caller == "meta":
        def meta(t):
            return t.to("meta") if isinstance(t, torch.Tensor) else t
        return OPS.parametric_ce(*(meta(t) for t in (logits, target, group, weight, scale, shift)), ignore_index)
    if caller in ("fused", "reference"):
        return pce(logits, target, weight, scale, shift, group, ignore_index=ignore_index, backend=caller,
                   reduction="sum")
    if caller == "module":
        groups, classes = weight.shape if weight.dim() == 2 else (1, weight.shape[-1])
        module = ParametricCE(classes, num_groups=groups, ignore_index=ignore_index, weight=weight.float(),
                              reduction="sum")
        return module(logits, target, group)
    raise AssertionError(caller)


def valid_inputs(groups=G, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = torch.randn(N, K, generator=gen).to(dtype)
    target = torch.tensor([0, 4, 2, 1, 3, 2])
    group = torch.tensor([0, 1, 1, 0, 1, 0]) if groups > 1 else None
    weight = (torch.rand(groups, K, generator=gen) + 0.5).to(acc)
    scale = (torch.rand(groups, K, generator=gen) + 0.5).to(acc)
    shift = torch.randn(groups, K, generator=gen).to(acc)
    return dict(logits=logits, target=target, group=group, weight=weight, scale=scale, shift=shift)


def call_with(caller, ignore_index=-100, **changes):
    inputs = valid_inputs()
    inputs.update(changes)
    return call(caller, ignore_index=ignore_index, **inputs)


@pytest.mark.parametrize("caller", SHAPE_CALLERS)
def test_valid_inputs_pass(caller):
    loss = call_with(caller)
    assert loss is not None


# ------------------------------------------------------- label ranges

@pytest.mark.parametrize("caller", VALUE_CALLERS)
@pytest.mark.parametrize("bad", [5, 7, -3, -1])
def test_target_out_of_range(caller, bad):
    target = torch.tensor([0, 4, bad, 1, 3, 2])
    with pytest.raises(IndexError, match=rf"`target\[2\]` = {bad} is out of range.*\[0, 5\)"):
        call_with(caller, target=target)


@pytest.mark.parametrize("caller", VALUE_CALLERS)
@pytest.mark.parametrize("ignore_index", [-100, -1, 17])
def test_ignored_rows_may_hold_any_label(caller, ignore_index):
    target = torch.tensor([0, ignore_index, 2, ignore_index, 3, 2])
    loss = call_with(caller, target=target, ignore_index=ignore_index)
    if isinstance(loss, tuple):  # the raw ops return (loss, lse)
        loss, lse = loss
        assert lse[1] == 0 and lse[3] == 0
        assert loss[1] == 0 and loss[3] == 0 and (loss[[0, 2, 4, 5]] > 0).all()
    assert torch.isfinite(loss).all()
    # ... but the default ignore_index no longer covers them
    if ignore_index != -100:
        with pytest.raises(IndexError, match=rf"`target\[1\]` = {ignore_index}"):
            call_with(caller, target=target, ignore_index=-100)


@pytest.mark.parametrize("caller", VALUE_CALLERS)
@pytest.mark.parametrize("bad", [2, 9, -1])
def test_group_out_of_range(caller, bad):
    group = torch.tensor([0, 1, 1, bad, 1, 0])
    with pytest.raises(IndexError, match=rf"`group\[3\]` = {bad} is out of range.*\[0, 2\)"):
        call_with(caller, group=group)


@pytest.mark.parametrize("where", ["forward", "backward", "backward_no_tables", "double_backward"])
def test_out_of_range_label_in_a_large_threaded_batch(where):
    """The check inside the parallel row loop must surface as IndexError."""
    n, k = 5000, 40
    logits = torch.randn(n, k)
    target = torch.randint(0, k, (n,))
    target[3777] = k + 2
    tables = [torch.ones(1, k), torch.ones(1, k), torch.zeros(1, k)]
    lse = torch.zeros(n)
    gamma = torch.ones(n)
    with pytest.raises(IndexError, match=r"`target\[3777\]` = 42"):
        if where == "forward":
            OPS.parametric_ce(logits, target, None, *tables, -100)
        elif where == "double_backward":
            OPS.parametric_ce_double_backward(gamma, logits, target, None, *tables, lse, logits, None,
                                              tables[0], None, -100, True)
        else:
            OPS.parametric_ce_backward(gamma, logits, target, None, *tables, lse, -100, where == "backward")


# ---------------------------------------------------------------- ranks

@pytest.mark.parametrize("caller", SHAPE_CALLERS)
@pytest.mark.parametrize("shape", [(N * K,), (N, K, 1), ()])
def test_logits_rank(caller, shape):
    """The ops take [N, K] only; the functional and the module also take [K]
    with a 0-d target and [N, K, d1..dk] with [N, d1..dk] targets (tests/test_shapes.py),
    so there an [N] target is the argument in error."""
    logits = torch.randn(N * K).reshape(shape) if shape else torch.tensor(1.0)
    message = r"`logits` must have shape \[N, K\]"
    if caller in ("fused", "reference", "module"):
        message = {(N * K,): r"`target` must be a 0-d \(scalar\) tensor for unbatched \[C\] logits",
                   (N, K, 1): r"`target` must have shape \[N, d1, ..., dk\] = \[6, 1\]",
                   (): r"`input` must have shape \[C\], \[N, C\] or \[N, C, d1, ..., dk\]"}[shape]
        if caller == "module" and shape == (N * K,):
            message = r"`input` must have K = num_classes = 5 classes"
    with pytest.raises(ValueError, match=message):
        call_with(caller, logits=logits)


@pytest.mark.parametrize("caller", SHAPE_CALLERS)
def test_target_rank(caller):
    with pytest.raises(ValueError, match=r"`target` must have shape \[N\] = \[6\]"):
        call_with(caller, target=torch.zeros(N, 1, dtype=torch.long))


@pytest.mark.parametrize("caller", SHAPE_CALLERS)
def test_group_rank(caller):
    with pytest.raises(ValueError, match=r"`group` must have shape \[N\] = \[6\]"):
        call_with(caller, group=torch.zeros(N, 1, dtype=torch.long))


@pytest.mark.parametrize("caller", TABLE_CALLERS)
@pytest.mark.parametrize("name", ["weight", "scale", "shift"])
@pytest.mark.parametrize("shape", [(K,), (G, K, 1)])
def test_table_rank(caller, name, shape):
    """The ops take [G, K] tables; the functional also takes a [C] table (a class
    weight, as F.cross_entropy takes it), the same as [1, C]."""
    table = torch.ones(shape)
    if caller in ("fused", "reference"):
        if shape == (K,):
            torch.testing.assert_close(call_with(caller, **{name: table}), call_with(caller, **{name: table[None]}))
            return
        message = rf"`{name}` must have shape \[C\] or \[G, C\], got \[2, 5, 1\]"
    else:
        message = rf"`{name}` must have shape \[G, K\]"
    with pytest.raises(ValueError, match=message):
        call_with(caller, **{name: table})


# ------------------------------------------------------- shape mismatch

@pytest.mark.parametrize("caller", SHAPE_CALLERS)
@pytest.mark.parametrize("length", [N - 1, N + 1, 0])
def test_target_length_mismatch(caller, length):
    with pytest.raises(ValueError, match=rf"`target` must have shape \[N\] = \[6\].*got \[{length}\]"):
        call_with(caller, target=torch.zeros(length, dtype=torch.long))


@pytest.mark.parametrize("caller", SHAPE_CALLERS)
def test_group_length_mismatch(caller):
    with pytest.raises(ValueError, match=r"`group` must have shape \[N\] = \[6\].*got \[7\]"):
        call_with(caller, group=torch.zeros(N + 1, dtype=torch.long))


@pytest.mark.parametrize("caller", TABLE_CALLERS)
@pytest.mark.parametrize("name", ["weight", "scale", "shift"])
@pytest.mark.parametrize("shape", [(G, K + 1), (G, K - 1)])
def test_table_classes_mismatch(caller, name, shape):
    with pytest.raises(ValueError, match=rf"`{name}` must have shape \[G, K\] = \[2, 5\]"):
        call_with(caller, **{name: torch.ones(shape)})


@pytest.mark.parametrize("caller", TABLE_CALLERS)
@pytest.mark.parametrize("name", ["scale", "shift"])
def test_table_groups_mismatch(caller, name):
    """G comes from `weight`; the other tables must agree with it."""
    message = rf"`{name}` must have shape \[G, K\] = \[2, 5\].*got \[3, 5\]"
    if caller in ("fused", "reference"):
        message = rf"`{name}` must have shape \[C\], \[1, C\] or \[G, C\] with G = 2 \(from `weight`\), got \[3, 5\]"
    with pytest.raises(ValueError, match=message):
        call_with(caller, **{name: torch.ones(G + 1, K)})


@pytest.mark.parametrize("caller", TABLE_CALLERS)
def test_tables_with_zero_groups(caller):
    with pytest.raises(ValueError, match=r"G >= 1.*`weight`"):
        call_with(caller, group=None, weight=torch.ones(0, K), scale=torch.ones(0, K), shift=torch.ones(0, K))


@pytest.mark.parametrize("caller", SHAPE_CALLERS)
def test_zero_classes(caller):
    empty = dict(weight=torch.ones(G, 0), scale=torch.ones(G, 0), shift=torch.ones(G, 0))
    if caller == "module":  # the module refuses K = 0 itself
        with pytest.raises(ValueError, match="`num_classes`"):
            ParametricCE(0)
        return
    with pytest.raises(ValueError, match=r"`logits` needs K >= 1"):
        call_with(caller, logits=torch.zeros(N, 0), **empty)


def test_module_class_count_mismatch_names_both_sizes():
    module = ParametricCE(K)
    with pytest.raises(ValueError, match=rf"`input` must have K = num_classes = {K}.*\[{N}, {K + 1}\]"):
        module(torch.randn(N, K + 1), torch.zeros(N, dtype=torch.long))


# --------------------------------------------------------------- dtypes

@pytest.mark.parametrize("caller", SHAPE_CALLERS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_logits_dtype(caller, dtype):
    with pytest.raises(TypeError, match=r"`logits` must be float32, float64, bfloat16 or float16"):
        call_with(caller, logits=torch.ones(N, K).to(dtype))


@pytest.mark.parametrize("caller", SHAPE_CALLERS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_target_dtype(caller, dtype):
    with pytest.raises(TypeError, match=r"`target` must have dtype torch.int64"):
        call_with(caller, target=torch.zeros(N).to(dtype))


@pytest.mark.parametrize("caller", SHAPE_CALLERS)
def test_floating_target_is_a_probability_target(caller):
    """A floating [N] target reads as a probability target of the wrong shape."""
    with pytest.raises(ValueError, match=r"probability target and must have the shape of logits.*"
                                         r"class-index targets must have dtype torch.int64"):
        call_with(caller, target=torch.zeros(N))


@pytest.mark.parametrize("caller", SHAPE_CALLERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
def test_group_dtype(caller, dtype):
    with pytest.raises(TypeError, match=r"`group` must have dtype torch.int64"):
        call_with(caller, group=torch.zeros(N).to(dtype))


@pytest.mark.parametrize("caller", ["op", "reference_op", "meta"])
@pytest.mark.parametrize("name", ["weight", "scale", "shift"])
@pytest.mark.parametrize("logits_dtype,table_dtype", [(torch.float32, torch.float64),
                                                      (torch.bfloat16, torch.bfloat16),
                                                      (torch.float16, torch.float64),
                                                      (torch.float64, torch.float32)])
def test_raw_op_table_dtype(caller, name, logits_dtype, table_dtype):
    inputs = valid_inputs(dtype=logits_dtype)
    inputs[name] = inputs[name].to(table_dtype)
    expected = F64 if logits_dtype == torch.float64 else F32
    with pytest.raises(TypeError, match=rf"`{name}` must have dtype {expected}"):
        call(caller, **inputs)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_functional_casts_float_tables(backend):
    inputs = valid_inputs()
    as64 = {n: inputs[n].double() for n in ("weight", "scale", "shift")}
    expected = call(backend, **inputs)
    got = call(backend, **{**inputs, **as64})
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name", ["weight", "scale", "shift"])
def test_functional_integer_table(backend, name):
    with pytest.raises(TypeError, match=rf"`{name}` must be a floating-point tensor, got torch.int64"):
        call_with(backend, **{name: torch.ones(G, K, dtype=torch.long)})


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_functional_logits_not_a_tensor(backend):
    with pytest.raises(TypeError, match=r"`input` must be a Tensor"):
        pce([[0.0, 1.0]], torch.zeros(1, dtype=torch.long), torch.ones(1, 2), torch.ones(1, 2),
            torch.zeros(1, 2), backend=backend)


# --------------------------------------------------- group None, G > 1

@pytest.mark.parametrize("caller", SHAPE_CALLERS)
def test_group_required_when_tables_have_several_rows(caller):
    with pytest.raises(ValueError, match=r"`group` is required when the tables have G = 2 > 1 rows"):
        call_with(caller, group=None)


# ------------------------------------------------- reduction / backend

@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("reduction", ["avg", "", None, "Mean"])
def test_bad_reduction(backend, reduction):
    inputs = valid_inputs()
    with pytest.raises(ValueError, match=r"`reduction` must be one of"):
        pce(inputs["logits"], inputs["target"], inputs["weight"], inputs["scale"], inputs["shift"],
            inputs["group"], reduction=reduction, backend=backend)
    with pytest.raises(ValueError, match=r"`reduction` must be one of"):
        ParametricCE(K, reduction=reduction, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "cuda", "", "Fused"])
def test_bad_backend(backend):
    inputs = valid_inputs()
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        pce(inputs["logits"], inputs["target"], inputs["weight"], inputs["scale"], inputs["shift"],
            inputs["group"], backend=backend)
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        ParametricCE(K, backend=backend)


# ------------------------------------------- backward / double backward

def _backward_args(caller_dtype=torch.float32):
    inputs = valid_inputs(dtype=caller_dtype)
    args = [inputs[n] for n in ("logits", "target", "group", "weight", "scale", "shift")]
    _, lse = OPS.parametric_ce(*args, -100)
    return args, lse


BACKWARD_IMPLS = {"op": OPS, "reference_op": reference, "meta": "meta"}


def _run_backward(impl_name, grad_loss, args, lse):
    if impl_name == "meta":
        def meta(t):
            return t.to("meta") if isinstance(t, torch.Tensor) else t
        grad_loss, lse, args = meta(grad_loss), meta(lse), [meta(a) for a in args]
        impl = OPS
    else:
        impl = BACKWARD_IMPLS[impl_name]
    return impl.parametric_ce_backward(grad_loss, *args, lse, -100, True)


@pytest.mark.parametrize("impl", list(BACKWARD_IMPLS))
@pytest.mark.parametrize("bad,exc,match", [
    (torch.ones(N + 1), ValueError, r"`grad_loss` must have shape \[N\] = \[6\]"),
    (torch.ones(N, 1), ValueError, r"`grad_loss` must have shape \[N\] = \[6\]"),
    (torch.ones(N, dtype=torch.float64), TypeError, rf"`grad_loss` must have dtype {F32}"),
])
def test_backward_grad_loss(impl, bad, exc, match):
    args, lse = _backward_args()
    with pytest.raises(exc, match=match):
        _run_backward(impl, bad, args, lse)


@pytest.mark.parametrize("impl", list(BACKWARD_IMPLS))
@pytest.mark.parametrize("bad,exc,match", [
    (torch.ones(N - 1), ValueError, r"`lse` must have shape \[N\] = \[6\]"),
    (torch.ones(N, dtype=torch.bfloat16), TypeError, rf"`lse` must have dtype {F32}"),
])
def test_backward_lse(impl, bad, exc, match):
    args, _ = _backward_args()
    with pytest.raises(exc, match=match):
        _run_backward(impl, torch.ones(N), args, bad)


def test_backward_op_checks_labels():
    args, lse = _backward_args()
    args[1] = torch.tensor([0, 4, 2, 1, 5, 2])
    for impl in (OPS, reference):
        with pytest.raises(IndexError, match=r"`target\[4\]` = 5"):
            impl.parametric_ce_backward(torch.ones(N), *args, lse, -100, True)


DOUBLE_CASES = [
    ("u_logits", torch.ones(N, K + 1), ValueError, r"`u_logits` must have the shape of logits"),
    ("u_logits", torch.ones(K, N), ValueError, r"`u_logits` must have the shape of logits"),
    ("u_logits", torch.ones(N * K), ValueError, r"`u_logits` must have the shape of logits"),
    ("u_logits", torch.ones(N, K, dtype=torch.float64), TypeError, r"`u_logits` must have the dtype of logits"),
    ("u_weight", torch.ones(G, K + 1), ValueError, r"`u_weight` must have shape \[G, K\] = \[2, 5\]"),
    ("u_scale", torch.ones(G + 1, K), ValueError, r"`u_scale` must have shape \[G, K\] = \[2, 5\]"),
    ("u_shift", torch.ones(K), ValueError, r"`u_shift` must have shape \[G, K\] = \[2, 5\]"),
    ("u_scale", torch.ones(G, K, dtype=torch.float64), TypeError, rf"`u_scale` must have dtype {F32}"),
]


@pytest.mark.parametrize("impl", list(BACKWARD_IMPLS))
@pytest.mark.parametrize("name,bad,exc,match", DOUBLE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DOUBLE_CASES)])
def test_double_backward_cotangents(impl, name, bad, exc, match):
    args, lse = _backward_args()
    cot = dict(u_logits=None, u_weight=None, u_scale=None, u_shift=None)
    cot[name] = bad
    gamma = torch.ones(N)
    if impl == "meta":
        def meta(t):
            return t.to("meta") if isinstance(t, torch.Tensor) else t
        gamma, lse, args = meta(gamma), meta(lse), [meta(a) for a in args]
        cot = {k: meta(v) for k, v in cot.items()}
        fn = OPS
    else:
        fn = BACKWARD_IMPLS[impl]
    with pytest.raises(exc, match=match):
        fn.parametric_ce_double_backward(gamma, *args, lse, cot["u_logits"], cot["u_weight"], cot["u_scale"],
                                         cot["u_shift"], -100, True)


# ----------------------------------------------- ParametricCE constructor

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_classes=0), ValueError, r"`num_classes` must be an int >= 1, got 0"),
    (dict(num_classes=-3), ValueError, r"`num_classes` must be an int >= 1"),
    (dict(num_classes=True), ValueError, r"`num_classes` must be an int >= 1"),
    (dict(num_classes=5.0), ValueError, r"`num_classes` must be an int >= 1"),
    (dict(num_classes=5, num_groups=0), ValueError, r"`num_groups` must be an int >= 1"),
    (dict(num_classes=5, clusters=2), ValueError, r"`clusters` given as a cluster size needs `class_counts`"),
    (dict(num_classes=5, clusters=2, class_counts=[3, 2, 1]), ValueError, r"`class_counts` must have K = 5"),
    (dict(num_classes=5, clusters=torch.zeros(4, dtype=torch.long)), ValueError, r"`clusters` map must be an int64 tensor of shape \[K\] = \[5\]"),
    (dict(num_classes=5, clusters=torch.zeros(1, 5, dtype=torch.long)), ValueError, r"`clusters` map must be an int64 tensor of shape \[K\]"),
    (dict(num_classes=5, clusters=torch.zeros(5, dtype=torch.int32)), ValueError, r"`clusters` map must be an int64 tensor"),
    (dict(num_classes=5, clusters=torch.zeros(5)), ValueError, r"`clusters` map must be an int64 tensor"),
    (dict(num_classes=5, clusters=torch.tensor([0, 1, -1, 0, 1])), ValueError, r"`clusters` map must be non-negative"),
    (dict(num_classes=5, clusters=[0, 0, 1, 1, 2]), TypeError, r"`clusters` must be None, an int cluster size or a LongTensor"),
    (dict(num_classes=5, scale=2.5), ValueError, r"initial `scale` must lie in the open interval \(0, scale_max = 2.0\)"),
    (dict(num_classes=5, scale=2.0), ValueError, r"initial `scale` must lie in the open interval"),
    (dict(num_classes=5, scale=0.0), ValueError, r"initial `scale` must lie in the open interval"),
    (dict(num_classes=5, scale=[0.5, 1.0, -0.1, 1.0, 1.0]), ValueError, r"initial `scale` must lie in the open interval"),
    (dict(num_classes=5, scale=0.9, scale_max=0.5), ValueError, r"initial `scale` must lie in the open interval \(0, scale_max = 0.5\)"),
    (dict(num_classes=5, scale_max=-1.0), ValueError, r"`scale_max` must be a positive finite float"),
    (dict(num_classes=5, scale_max=float("inf")), ValueError, r"`scale_max` must be a positive finite float"),
    (dict(num_classes=5, weight=torch.ones(6)), ValueError, r"initial `weight` must be a scalar, \[K\] = \[5\] or \[G, K\] = \[1, 5\]"),
    (dict(num_classes=5, num_groups=2, shift=torch.ones(3, 5)), ValueError, r"initial `shift` must be a scalar, \[K\] = \[5\] or \[G, K\] = \[2, 5\]"),
    (dict(num_classes=5, learn=("scale", "temperature")), ValueError, r"`learn` must be a subset of \('weight', 'scale', 'shift'\)"),
    (dict(num_classes=5, learn="margin"), ValueError, r"`learn` must be a subset of"),
    (dict(num_classes=5, learn=("shifts",)), ValueError, r"`learn` must be a subset of"),
])
def test_parametric_ce_constructor(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ParametricCE(**kwargs)


@pytest.mark.parametrize("counts,init,kwargs,match", [
    ([10, 0, 5], "la", {}, r"init='la' needs every count to be positive"),
    ([10, 0, 5], "balanced", {}, r"init='balanced' needs every count to be positive"),
    ([10, 0, 5], "vs", {}, r"init='vs' needs every count to be positive"),
    ([10, 0, 5], "cdt", {}, r"init='cdt' needs every count to be positive"),
    ([[10, 3, 5], [2, 0, 1]], "group_la", {}, r"init='group_la' needs every count to be positive"),
    ([10, 3, 5], "group_la", {}, r"init='group_la' needs \[G, K\] counts"),
    ([10, 3, 5], "focal", {}, r"`init` must be one of"),
    ([10, -3, 5], "ce", {}, r"`counts` must be non-negative"),
    ([10, float("nan"), 5], "ce", {}, r"`counts` must be finite"),
    ([], "ce", {}, r"`counts` must be a non-empty \[K\] or \[G, K\] tensor"),
    ([[[1, 2]]], "ce", {}, r"`counts` must be a non-empty \[K\] or \[G, K\] tensor"),
])
def test_from_counts_errors(counts, init, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParametricCE.from_counts(counts, init, **kwargs)
    with pytest.raises(ValueError, match=match):
        loss_tables(counts, init, **kwargs)


def test_from_counts_with_zero_counts_is_fine_for_plain_ce():
    module = ParametricCE.from_counts([10, 0, 5], "ce")
    assert torch.equal(module.tables().shift, torch.zeros(1, 3))


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "2"])
def test_frequency_clusters_bad_size(size):
    with pytest.raises(ValueError, match=r"`cluster_size` must be an int >= 1"):
        frequency_clusters([3, 2, 1], size)


@pytest.mark.parametrize("min_count", [0, -1.0, float("nan"), float("inf")])
def test_frequency_clusters_bad_min_count(min_count):
    with pytest.raises(ValueError, match=r"`min_count` must be a positive finite"):
        frequency_clusters([3, 2, 1], min_count=min_count)


def test_module_group_checks():
    module = ParametricCE(K, num_groups=2)
    logits, target = torch.randn(N, K), torch.zeros(N, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`group` is required"):
        module(logits, target)
    with pytest.raises(IndexError, match=r"`group\[0\]` = 2"):
        module(logits, target, torch.full((N,), 2))
