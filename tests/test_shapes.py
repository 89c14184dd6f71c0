"""The input forms of ``nn.CrossEntropyLoss`` (docs/math.md section 8):
unbatched ``[K]`` logits with a 0-d target and ``[N, K, d1, ..., dk]`` logits
with ``[N, d1, ..., dk]`` targets, each with class indices (plain or with label
smoothing) and with probability targets of the logits' shape, through the
fused kernels and the reference path."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import autobalance
from conftest import examples

from conftest import pce  # noqa: E402
IGNORE = -100
# (logits shape, channels-last): one per form, the class dimension is 1 (0 when unbatched)
FORMS = {
    "unbatched": ((5,), False),
    "2d": ((6, 5), False),
    "3d": ((3, 5, 4), False),
    "4d": ((2, 5, 3, 4), False),
    "4d_channels_last": ((2, 5, 3, 4), True),
    "5d": ((2, 5, 2, 3, 2), False),
}


# target kinds: (probability target, label smoothing)
KINDS = {"index": (False, 0.0), "smoothed": (False, 0.2), "probs": (True, 0.0),
         "probs_smoothed": (True, 0.3)}


def _problem(form, dtype, seed=0, groups=1, ignore=True, kind="index"):
    """Logits, target, group, K; a probability target (kind "probs*") is a random
    distribution per position, laid out like the logits (channels-last too)."""
    shape, channels_last = FORMS[form]
    gen = torch.Generator().manual_seed(seed)
    classes = shape[0] if len(shape) == 1 else shape[1]
    z = 3 * torch.randn(shape, generator=gen, dtype=dtype)
    layout = (lambda t: t.contiguous(memory_format=torch.channels_last)) if channels_last else (lambda t: t)
    z = layout(z)
    index_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    g = torch.randint(0, groups, index_shape, generator=gen) if groups > 1 else None
    if KINDS[kind][0]:
        return z, layout(torch.rand(shape, generator=gen, dtype=dtype).softmax(min(1, len(shape) - 1))), g, classes
    y = torch.randint(0, classes, index_shape, generator=gen)
    if ignore and y.dim() > 0:
        y[torch.rand(index_shape, generator=gen) < 0.25] = IGNORE
    return z, y, g, classes


def _identity(classes, dtype, weighted, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(classes, generator=gen, dtype=dtype) + 0.5 if weighted else torch.ones(classes, dtype=dtype)
    return w, w[None].clone(), torch.ones(1, classes, dtype=dtype), torch.zeros(1, classes, dtype=dtype)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("weighted", (False, True), ids=("unweighted", "weighted"))
@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
@pytest.mark.parametrize("kind", KINDS)
def test_identity_tables_match_cross_entropy(form, dtype, weighted, reduction, kind):
    z, y, _, classes = _problem(form, dtype, kind=kind)
    eps = KINDS[kind][1]
    w, *tables = _identity(classes, dtype, weighted)
    z1, z2 = z.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    ours = pce(z1, y, *tables, reduction=reduction, ignore_index=IGNORE, label_smoothing=eps)
    theirs = F.cross_entropy(z2, y, weight=w if weighted else None, reduction=reduction, ignore_index=IGNORE,
                             label_smoothing=eps)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ours, theirs, **tol)
    cot = torch.randn_like(theirs)
    (g1,) = torch.autograd.grad(ours, z1, cot)
    (g2,) = torch.autograd.grad(theirs, z2, cot)
    assert g1.shape == z.shape
    torch.testing.assert_close(g1, g2, **tol)


@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_unbatched_ignored_target(reduction):
    z = torch.randn(4, dtype=torch.float64)
    y = torch.tensor(IGNORE)
    _, *tables = _identity(4, torch.float64, False)
    ours = pce(z, y, *tables, reduction=reduction)
    theirs = F.cross_entropy(z, y, reduction=reduction)
    assert ours.shape == () == theirs.shape
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def _random_tables(groups, classes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(groups, classes, generator=gen, dtype=dtype) + 0.5).requires_grad_(),
            (torch.rand(groups, classes, generator=gen, dtype=dtype) + 0.5).requires_grad_(),
            torch.randn(groups, classes, generator=gen, dtype=dtype).requires_grad_()]


@settings(max_examples=examples(15))
@given(form=st.sampled_from(sorted(FORMS)), dtype=st.sampled_from((torch.float32, torch.float64)),
       groups=st.integers(1, 3), reduction=st.sampled_from(("none", "sum", "mean")), seed=st.integers(0, 2**16),
       kind=st.sampled_from(sorted(KINDS)))
def test_fused_matches_reference_and_flat_rows(form, dtype, groups, reduction, seed, kind):
    """Random tables and groups: the fused N-d loss equals the reference path's,
    and both equal the [R, K] loss of the rows in the target's order (and the
    probability target's gradient likewise)."""
    z, y, g, classes = _problem(form, dtype, seed, groups, kind=kind)
    probs, eps = KINDS[kind]
    tables = _random_tables(groups, classes, dtype, seed + 1)
    z = z.requires_grad_()
    if probs:
        y = y.requires_grad_()
    inputs = [z, *tables] + ([y] if probs else [])

    def rows(t):
        return t[None] if t.dim() == 1 else t.movedim(1, -1).reshape(-1, classes)
    index_shape = z.shape if z.dim() < 2 else (z.shape[0], *z.shape[2:])
    flat = (rows(z), rows(y) if probs else y.reshape(-1), None if g is None else g.reshape(-1))
    kw = dict(reduction=reduction, label_smoothing=eps)
    outs = [pce(z, y, *tables, g, backend=b, **kw) for b in ("fused", "reference")]
    outs.append(pce(*flat[:2], *tables, flat[2], backend="reference", **kw).reshape(outs[0].shape))
    assert outs[0].shape == ((() if z.dim() == 1 else index_shape) if reduction == "none" else ())
    cot = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, inputs, cot) for o in outs]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    for o, gr in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(outs[0], o, **tol)
        for a, b in zip(grads[0], gr):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("reduction", ("none", "mean"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "nhwc"))
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_and_gradgradcheck_nd(reduction, channels_last, kind):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    z.requires_grad_()
    probs, eps = KINDS[kind]
    if probs:
        y = torch.rand(z.shape, generator=gen, dtype=torch.float64).contiguous(memory_format=z_format(z))
    else:
        y = torch.randint(0, 3, (2, 2, 2), generator=gen)
        y[0, 1, 0] = IGNORE
    g = torch.randint(0, 2, (2, 2, 2), generator=gen)
    tables = _random_tables(2, 3, torch.float64, 4)

    def f(z, w, s, l):
        return pce(z, y, w, s, l, g, reduction=reduction, ignore_index=IGNORE, label_smoothing=eps)
    assert torch.autograd.gradcheck(f, [z, *tables])
    assert torch.autograd.gradgradcheck(f, [z, *tables])
    if probs:  # the probability target's own gradient (once: a second derivative w.r.t. it raises)
        assert torch.autograd.gradcheck(lambda p: pce(z.detach(), p, *tables, g, reduction=reduction,
                                                      label_smoothing=eps), [y.requires_grad_()])


def z_format(z):
    return torch.channels_last if z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous() \
        else torch.contiguous_format


def test_unbatched_gradgradcheck():
    z = torch.randn(4, dtype=torch.float64, requires_grad=True)
    tables = _random_tables(1, 4, torch.float64, 5)
    f = lambda z, w, s, l: pce(z, torch.tensor(2), w, s, l)  # noqa: E731
    assert torch.autograd.gradcheck(f, [z, *tables])
    assert torch.autograd.gradgradcheck(f, [z, *tables])


@pytest.mark.parametrize("backend", ("fused", "reference"))
def test_bad_shapes_are_clear_errors(backend):
    _, *tables = _identity(5, torch.float32, False)
    t2 = [torch.ones(2, 5), torch.ones(2, 5), torch.zeros(2, 5)]
    z = torch.randn(2, 5, 3, 4)
    cases = [
        (z, torch.zeros(2, 3, dtype=torch.long), None, tables, "`target` must have shape [N, d1, ..., dk] = [2, 3, 4]"),
        (z, torch.zeros(2, 3, 5, dtype=torch.long), None, tables, "`target` must have shape"),
        (z, torch.zeros(2, 5, 3, 4, dtype=torch.long), None, tables, "`target` must have shape"),
        (z, torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 12, dtype=torch.long), t2,
         "`group` must have the target's index shape [2, 3, 4]"),
        (torch.randn(5), torch.zeros(1, dtype=torch.long), None, tables, "`target` must be a 0-d (scalar) tensor"),
        (torch.randn(5), torch.zeros(3, dtype=torch.long), None, tables, "`target` must be a 0-d"),
        (torch.randn(()), torch.tensor(0), None, tables, "`input` must have shape [C], [N, C]"),
    ]
    for logits, target, group, tabs, message in cases:
        with pytest.raises(ValueError) as err:
            pce(logits, target, *tabs, group, backend=backend)
        assert message in str(err.value), str(err.value)
    with pytest.raises(TypeError, match="`target` must be a Tensor"):
        pce(torch.randn(5), 1, *tables, backend=backend)
    with pytest.raises(TypeError, match="`target` must have dtype torch.int64"):
        pce(z, torch.zeros(2, 3, 4, dtype=torch.int32), *tables, backend=backend)
    with pytest.raises(IndexError, match="out of range"):
        pce(z, torch.full((2, 3, 4), 5), *tables, backend=backend)


def test_module_takes_the_nd_forms():
    z, y, g, classes = _problem("4d", torch.float32, 7, groups=2)
    crit = autobalance.ParametricCE(classes, num_groups=2, weight=torch.rand(2, classes) + 0.5)
    out = crit(z, y, g)
    torch.testing.assert_close(out, pce(z, y, *crit.tables(), g))
    assert crit(z[0, :, 0, 0], y[0, 0, 0].clamp(min=0), g[0, 0, 0]).shape == ()
    crit.reduction = "none"
    assert crit(z, y, g).shape == y.shape
    with pytest.raises(ValueError, match="K = num_classes = 5 classes"):
        crit(z.movedim(1, -1), y, g)
    with pytest.raises(ValueError, match="K = num_classes = 5 classes"):
        crit(torch.randn(4), torch.tensor(1), torch.tensor(0))


@pytest.mark.parametrize("form", ("4d", "4d_channels_last", "unbatched"))
@pytest.mark.parametrize("kind", KINDS)
def test_deterministic(form, kind):
    z, y, g, classes = _problem(form, torch.float32, 11, groups=2, kind=kind)
    tables = _random_tables(2, classes, torch.float32, 12)
    runs = []
    for _ in range(2):
        zz = z.detach().clone().requires_grad_()
        loss = pce(zz, y, *tables, g, label_smoothing=KINDS[kind][1])
        runs.append((loss, *torch.autograd.grad(loss, [zz, *tables])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_nchw_sum_and_mean_make_no_copy_of_the_logits():
    """A sum or mean of NCHW-contiguous logits reaches the reduced op as a
    [N, K, D] view, and on the CPU fast path no op copies or transposes a tensor
    of the logits' size; with "none" the rows are one copy."""
    z = torch.randn(2, 5, 6, 7, requires_grad=True)
    y = torch.randint(0, 5, (2, 6, 7))
    for reduction, copies in (("mean", 0), ("sum", 0), ("none", 1)):
        with torch.profiler.profile(record_shapes=True) as prof:
            pce(z, y, reduction=reduction).sum().backward()
        copied = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
                  and any(list(shape) in ([2, 5, 6, 7], [84, 5], [2, 6, 7, 5]) for shape in e.input_shapes)]
        assert len({e.name for e in copied} & {"aten::copy_"}) == (copies > 0), (reduction, copied)


def test_channels_last_rows_are_a_view():
    """The fused kernels get channels-last logits in place; NCHW logits are copied once."""
    from autobalance.functional import _as_rows
    z = torch.randn(2, 5, 3, 4)
    y = torch.zeros(2, 3, 4, dtype=torch.long)
    cl = z.contiguous(memory_format=torch.channels_last)
    rows, target, _ = _as_rows(cl, y, None, y.shape)
    assert rows.shape == (24, 5) and rows.is_contiguous() and target.shape == (24,)
    assert rows.data_ptr() == cl.data_ptr()
    assert _as_rows(z, y, None, y.shape)[0].data_ptr() != z.data_ptr()


@pytest.mark.parametrize("backend", ("fused", "reference"))
def test_bad_targets_and_label_smoothing_are_clear_errors(backend):
    z = torch.randn(2, 5, 3, 4)
    _, *tables = _identity(5, torch.float32, False)
    value_errors = [
        (z, torch.rand(2, 5, 3, 3), {}, "probability target and must have the input's shape [2, 5, 3, 4], "
                                        "got [2, 5, 3, 3]; class-index targets are int64 of shape [2, 3, 4]"),
        (z[:, :, 0, 0], torch.rand(2, 4), {}, "probability target and must have the shape of logits [2, 5]"),
        (torch.randn(5), torch.rand(4), {}, "must have the input's shape [5], got [4]"),
        (z, torch.zeros(2, 3, 4, dtype=torch.long), {"label_smoothing": -0.1}, "`label_smoothing` must be in [0, 1]"),
        (z, torch.zeros(2, 3, 4, dtype=torch.long), {"label_smoothing": 1.5}, "`label_smoothing` must be in [0, 1]"),
        (z, torch.rand(2, 5, 3, 4), {"label_smoothing": float("nan")}, "`label_smoothing` must be in [0, 1], got nan"),
    ]
    for logits, target, kw, message in value_errors:
        with pytest.raises(ValueError) as err:
            pce(logits, target, *tables, backend=backend, **kw)
        assert message in str(err.value), str(err.value)
    with pytest.raises(TypeError, match=r"probability `target` must have the dtype of logits \(torch.float32\), "
                                        r"got torch.float64"):
        pce(z, torch.rand(2, 5, 3, 4, dtype=torch.float64), *tables, backend=backend)
    with pytest.raises(TypeError, match="`label_smoothing` must be a float in"):
        pce(z, torch.zeros(2, 3, 4, dtype=torch.long), *tables, label_smoothing="0.1", backend=backend)
    with pytest.raises(ValueError, match=r"`label_smoothing` must be in \[0, 1\], got 2"):
        autobalance.ParametricCE(5, label_smoothing=2, backend=backend)


def test_module_matches_cross_entropy_loss_with_its_keywords():
    """nn.CrossEntropyLoss(**kw) and ParametricCE(K, **kw) agree on every target form."""
    w = torch.rand(5) + 0.5
    for kw in (dict(weight=w, label_smoothing=0.1), dict(ignore_index=2, reduction="sum"),
               dict(reduction="none", label_smoothing=0.3), dict(size_average=False)):
        ours, theirs = autobalance.ParametricCE(5, **kw), torch.nn.CrossEntropyLoss(**kw)
        for kind in KINDS:
            z, y, _, _ = _problem("4d", torch.float32, 5, kind=kind)
            if not KINDS[kind][0]:
                y = y.clamp(min=0)
            elif "ignore_index" in kw:
                with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
                    theirs(z, y)
                with pytest.raises(ValueError, match="`ignore_index` is not supported for a probability target"):
                    ours(z, y)
                continue
            torch.testing.assert_close(ours(z, y), theirs(z, y))


@pytest.mark.parametrize("kind", ("smoothed", "probs", "probs_smoothed"))
@pytest.mark.parametrize("reduction", ("sum", "mean"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_reduced_fast_path_with_target_distributions(kind, reduction, dtype):
    """A sum or mean on the CPU computes its gradients in the forward (the fast
    path, taken when the target needs no gradient); against the reference path,
    with random tables and groups, and against the same loss differentiated
    again (create_graph takes the plain backward op)."""
    probs, eps = KINDS[kind]
    gen = torch.Generator().manual_seed(21)
    rows, classes, groups = 517, 13, 3
    z = 3 * torch.randn(rows, classes, generator=gen, dtype=dtype)
    g = torch.randint(0, groups, (rows,), generator=gen)
    if probs:
        y = torch.rand(rows, classes, generator=gen, dtype=dtype) * 1.5 - 0.2  # not normalised
    else:
        y = torch.randint(0, classes, (rows,), generator=gen)
        y[:40] = IGNORE
    tables = _random_tables(groups, classes, dtype, 22)
    results = []
    for backend, create_graph in (("fused", False), ("fused", True), ("reference", False)):
        zz = z.detach().clone().requires_grad_()
        loss = pce(zz, y, *tables, g, reduction=reduction, label_smoothing=eps, backend=backend)
        results.append((loss, *torch.autograd.grad(loss, [zz, *tables], create_graph=create_graph)))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a.detach(), b.detach(), **tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_spatial_reduced_ops_equal_their_rows_bit_for_bit(kind, dtype):
    """The reduced ops on [B, K, D] logits (the CPU fast path reads them with
    class stride D) give the bits of the same ops on the [B D, K] rows; opcheck
    on the spatial form."""
    from conftest import OPS
    probs, eps = KINDS[kind]
    gen = torch.Generator().manual_seed(31)
    B, K, D, G = 3, 6, 70, 2
    z = torch.randn(B, K, D, generator=gen, dtype=dtype)
    g = torch.randint(0, G, (B, D), generator=gen)
    if probs:
        y = torch.rand(B, K, D, generator=gen, dtype=dtype)
        y_rows = y.movedim(1, -1).reshape(-1, K)
    else:
        y = torch.randint(0, K, (B, D), generator=gen)
        y[0, :9] = IGNORE
        y_rows = y.reshape(-1)
    tables = [t.detach() for t in _random_tables(G, K, dtype, 32)]
    rows = z.movedim(1, -1).reshape(-1, K)
    for mean in (False, True):
        spatial = OPS._parametric_ce_reduced_with_gradient(z, y, g, *tables, IGNORE, mean, True, eps)
        flat = OPS._parametric_ce_reduced_with_gradient(rows, y_rows, g.reshape(-1), *tables, IGNORE, mean, True, eps)
        assert spatial[3].shape == z.shape
        for i, (a, b) in enumerate(zip(spatial, flat)):
            assert torch.equal(a, b.reshape(B, D, K).movedim(2, 1) if i == 3 else b), i
        torch.library.opcheck(OPS._parametric_ce_reduced_with_gradient, (z, y, g, *tables, IGNORE, mean, True, eps))
        torch.library.opcheck(OPS.parametric_ce_reduced, (z.requires_grad_(), y, g, *tables, IGNORE, mean, eps))
        z = z.detach()
    with pytest.raises(ValueError, match=r"`group` must have shape \[B, D\] = \[3, 70\] to match spatial logits"):
        OPS._parametric_ce_reduced_with_gradient(z, y, g.reshape(-1), *tables, IGNORE, True, True, eps)
    with pytest.raises(ValueError, match=r"`logits` must have shape \[N, K\], got \[3, 6, 70\]"):
        OPS.parametric_ce(z, y, g, *tables, IGNORE, eps)


def test_spatial_fallbacks_make_rows():
    """NCHW sums and means that the CPU fast path does not take (reduced
    precision; a non-finite incoming gradient, which recomputes) give what the
    rows give."""
    gen = torch.Generator().manual_seed(41)
    z = torch.randn(2, 5, 3, 4, generator=gen)
    y = torch.randint(0, 5, (2, 3, 4), generator=gen)

    def loss_and_grad(z, y, scale=1.0):
        z = z.detach().requires_grad_()
        loss = pce(z, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss * scale, z)
        return loss, grad
    rows = z.movedim(1, -1).reshape(-1, 5)
    for dtype in (torch.bfloat16, torch.float32):
        a, b = loss_and_grad(z.to(dtype), y), loss_and_grad(rows.to(dtype), y.reshape(-1))
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1].reshape(2, 3, 4, 5).movedim(-1, 1))
    nan_grad = loss_and_grad(z, y, float("inf"))[1]
    assert nan_grad.shape == z.shape and not torch.isfinite(nan_grad).all()


@pytest.mark.parametrize("shape", [(0, 5, 3, 4), (2, 5, 0, 4), (2, 1, 3, 4)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_empty_and_single_class_nd_inputs(shape, kind, reduction):
    """No rows (N = 0 or a zero extra dimension) and K = 1, as F.cross_entropy
    gives them (a mean over no rows is NaN)."""
    probs, eps = KINDS[kind]
    gen = torch.Generator().manual_seed(51)
    z = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(shape, generator=gen, dtype=torch.float64) if probs else \
        torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    ours = pce(z, y, reduction=reduction, label_smoothing=eps)
    theirs = F.cross_entropy(z, y, reduction=reduction, label_smoothing=eps)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    if z.numel() and reduction != "none":
        torch.testing.assert_close(*(torch.autograd.grad(t, z)[0] for t in (ours, theirs)), equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("reduction", ("sum", "mean"))
def test_nchw_by_positions_matches_rows(kind, dtype, reduction, restore_threads):
    """With one group row the CPU fast path runs NCHW logits in vectors of
    positions, one class at a time (no transposes): against the reference path
    on rows, with random tables, ignored positions, a NaN logit (its own
    position NaN, the others exact), ragged vector tails (D = 37) and several
    row blocks; bit-identical across runs and thread counts."""
    probs, eps = KINDS[kind]
    gen = torch.Generator().manual_seed(61)
    B, K, H, Wd = 3, 7, 37, 40
    z = 3 * torch.randn(B, K, H, Wd, generator=gen, dtype=dtype)
    if probs:
        y = torch.rand(B, K, H, Wd, generator=gen, dtype=dtype) * 1.5 - 0.2
    else:
        y = torch.randint(0, K, (B, H, Wd), generator=gen)
        y[torch.rand(B, H, Wd, generator=gen) < 0.2] = IGNORE
    tables = _random_tables(1, K, dtype, 62)

    def run(logits, target, backend="fused"):
        zz = logits.detach().clone().requires_grad_()
        loss = pce(zz, target, *tables, reduction=reduction, label_smoothing=eps, backend=backend)
        return (loss, *torch.autograd.grad(loss, [zz, *tables]))
    fused, reference = run(z, y), run(z, y, "reference")
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, **tol)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(fused, run(z, y)))
    bad = z.clone()
    bad[1, 2, 5, 6] = float("nan")
    if not probs:
        y[1, 5, 6] = 0  # not ignored
    zz = bad.requires_grad_()
    (grad,) = torch.autograd.grad(pce(zz, y, *tables, reduction="sum", label_smoothing=eps), zz)
    assert torch.isnan(grad[1, :, 5, 6]).all() and torch.isfinite(grad[0]).all() and torch.isfinite(grad[2]).all()
    grad[1, :, 5, 6] = 0
    assert torch.isfinite(grad).all()
