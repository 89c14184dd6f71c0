"""The input forms of ``nn.CrossEntropyLoss`` with class-index targets
(docs/math.md section 8): unbatched ``[K]`` logits with a 0-d target and
``[N, K, d1, ..., dk]`` logits with ``[N, d1, ..., dk]`` targets, through the
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


def _problem(form, dtype, seed=0, groups=1, ignore=True):
    shape, channels_last = FORMS[form]
    gen = torch.Generator().manual_seed(seed)
    classes = shape[0] if len(shape) == 1 else shape[1]
    z = 3 * torch.randn(shape, generator=gen, dtype=dtype)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    index_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    y = torch.randint(0, classes, index_shape, generator=gen)
    if ignore and y.dim() > 0:
        y[torch.rand(index_shape, generator=gen) < 0.25] = IGNORE
    g = torch.randint(0, groups, index_shape, generator=gen) if groups > 1 else None
    return z, y, g, classes


def _identity(classes, dtype, weighted, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(classes, generator=gen, dtype=dtype) + 0.5 if weighted else torch.ones(classes, dtype=dtype)
    return w, w[None].clone(), torch.ones(1, classes, dtype=dtype), torch.zeros(1, classes, dtype=dtype)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("weighted", (False, True), ids=("unweighted", "weighted"))
@pytest.mark.parametrize("reduction", ("none", "sum", "mean"))
def test_identity_tables_match_cross_entropy(form, dtype, weighted, reduction):
    z, y, _, classes = _problem(form, dtype)
    w, *tables = _identity(classes, dtype, weighted)
    z1, z2 = z.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    ours = pce(z1, y, *tables, reduction=reduction, ignore_index=IGNORE)
    theirs = F.cross_entropy(z2, y, weight=w if weighted else None, reduction=reduction, ignore_index=IGNORE)
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
       groups=st.integers(1, 3), reduction=st.sampled_from(("none", "sum", "mean")), seed=st.integers(0, 2**16))
def test_fused_matches_reference_and_flat_rows(form, dtype, groups, reduction, seed):
    """Random tables and groups: the fused N-d loss equals the reference path's,
    and both equal the [R, K] loss of the rows in the target's order."""
    z, y, g, classes = _problem(form, dtype, seed, groups)
    tables = _random_tables(groups, classes, dtype, seed + 1)
    z = z.requires_grad_()
    inputs = [z, *tables]
    if z.dim() == 1:
        flat = z[None], y.reshape(1), None if g is None else g.reshape(1)
    else:
        flat = (z.movedim(1, -1).reshape(-1, classes), y.reshape(-1), None if g is None else g.reshape(-1))
    outs = [pce(z, y, *tables, g, reduction=reduction, backend=b) for b in ("fused", "reference")]
    outs.append(pce(*flat[:2], *tables, flat[2], reduction=reduction, backend="reference").reshape(outs[0].shape))
    assert outs[0].shape == (y.shape if reduction == "none" else ())
    cot = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, inputs, cot) for o in outs]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    for o, gr in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(outs[0], o, **tol)
        for a, b in zip(grads[0], gr):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("reduction", ("none", "mean"))
@pytest.mark.parametrize("channels_last", (False, True), ids=("nchw", "nhwc"))
def test_gradcheck_and_gradgradcheck_nd(reduction, channels_last):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    z.requires_grad_()
    y = torch.randint(0, 3, (2, 2, 2), generator=gen)
    y[0, 1, 0] = IGNORE
    g = torch.randint(0, 2, (2, 2, 2), generator=gen)
    tables = _random_tables(2, 3, torch.float64, 4)

    def f(z, w, s, l):
        return pce(z, y, w, s, l, g, reduction=reduction, ignore_index=IGNORE)
    assert torch.autograd.gradcheck(f, [z, *tables])
    assert torch.autograd.gradgradcheck(f, [z, *tables])


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
def test_deterministic(form):
    z, y, g, classes = _problem(form, torch.float32, 11, groups=2)
    tables = _random_tables(2, classes, torch.float32, 12)
    runs = []
    for _ in range(2):
        zz = z.detach().clone().requires_grad_()
        loss = pce(zz, y, *tables, g)
        runs.append((loss, *torch.autograd.grad(loss, [zz, *tables])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


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
