"""The CUDA kernels against the plain-PyTorch reference (docs/math.md sections 1,
3, 4) on the same GPU inputs, within the tolerance model of conftest.py; with
target distributions (section 8) against the CPU kernels; plus determinism,
opcheck, torch.compile, device mix-ups and edge cases.
Skipped without a CUDA device."""
import dataclasses
import itertools

import pytest
import torch

import autobalance
import autobalance_ext
from conftest import (FLOAT_DTYPES, OPS, POISONS, Oracle, acc_dtype, assert_all_zero, assert_within,
                      check_extreme_logits, check_missing_table_cotangent_is_zero, check_poison_stays_in_its_row,
                      cotangents, make_problem, poisoned_logits, reference, tolerance)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CLASSES = [1, 10, 100, 1000, 8142, 32000]
PRESENT = list(itertools.product([False, True], repeat=4))  # (Uz, UW, US, UL) given?


def present_id(present):
    return "".join("zWSL"[i] if x else "-" for i, x in enumerate(present))


def on_gpu(x):
    """A Problem, tensor or tuple of them (None kept) moved to the GPU."""
    if isinstance(x, tuple):
        return tuple(on_gpu(t) for t in x)
    if x is None or isinstance(x, torch.Tensor):
        return None if x is None else x.cuda()
    return dataclasses.replace(x, logits=x.logits.cuda(), target=x.target.cuda(),
                               group=on_gpu(x.group), weight=x.weight.cuda(),
                               scale=x.scale.cuda(), shift=x.shift.cuda())


def rows_for(classes):
    """Enough rows for many row chunks at small K, few enough for the oracle."""
    return max(3, min(3000, 300_000 // classes))


def check_all_ops(p):
    """Every output of the three ops, for every cotangent combination and both
    table_grads, against reference.py on the same GPU inputs. Tolerances come
    from the float64 oracle's magnitudes of the (CPU) problem `p`."""
    q = on_gpu(p)
    ignored = (p.target == p.ignore_index).cuda()
    loss, lse = OPS.parametric_ce(*q.args(), q.ignore_index)
    ref_loss, ref_lse = reference.parametric_ce(*q.args(), q.ignore_index)
    assert loss.dtype == lse.dtype == p.acc and loss.is_cuda
    o = Oracle(p)
    assert_within(loss.cpu(), ref_loss.cpu(), tolerance(o.mag_loss, p.dtype), f"loss {p}")
    assert_within(lse.cpu(), ref_lse.cpu(), tolerance(o.mag_lse, p.dtype), f"lse {p}")
    assert_all_zero(loss[ignored], "loss of ignored rows")

    def check_tables(got, ref, mags, table_grads, what):
        for name, g, r, mag in zip(("weight", "scale", "shift"), got, ref, mags):
            assert g.dtype == p.acc and tuple(g.shape) == (p.G, p.K), f"{what} grad_{name}"
            if table_grads:
                assert_within(g.cpu(), r.cpu(), tolerance(mag, p.dtype), f"{what} grad_{name} {p}")
            else:
                assert_all_zero(g, f"{what} grad_{name} with table_grads=False")

    upstream = cotangents(p)[0]
    o = Oracle(p, upstream)
    for table_grads in (True, False):
        got = OPS.parametric_ce_backward(on_gpu(upstream), *q.args(), lse, q.ignore_index, table_grads)
        ref = reference.parametric_ce_backward(on_gpu(upstream), *q.args(), ref_lse, q.ignore_index,
                                               table_grads)
        assert got[0].dtype == p.dtype and tuple(got[0].shape) == (p.N, p.K)
        assert_within(got[0].cpu(), ref[0].cpu(), tolerance(o.mag_dz, p.dtype, p.dtype, ref[0].cpu()),
                      f"backward grad_logits {p}")
        assert_all_zero(got[0][ignored], "backward grad_logits of ignored rows")
        check_tables(got[1:], ref[1:], (o.mag_dW, o.mag_dS, o.mag_dL), table_grads, "backward")

    for present in PRESENT:
        cot = cotangents(p, present)
        what = f"double backward [{present_id(present)}]"
        for table_grads in (True, False) if present == (True,) * 4 else (True,):
            got = OPS.parametric_ce_double_backward(on_gpu(cot[0]), *q.args(), lse, *on_gpu(cot[1:]),
                                                    q.ignore_index, table_grads)
            assert got[0].dtype == p.acc and got[1].dtype == p.dtype
            if not any(present):
                for t in got:
                    assert_all_zero(t, f"{what} without cotangents")
                continue
            ref = reference.parametric_ce_double_backward(on_gpu(cot[0]), *q.args(), ref_lse,
                                                          *on_gpu(cot[1:]), q.ignore_index, table_grads)
            o = Oracle(p, *cot)
            assert_within(got[0].cpu(), ref[0].cpu(), tolerance(o.mag_dd_gamma, p.dtype),
                          f"{what} grad_grad_loss {p}")
            assert_within(got[1].cpu(), ref[1].cpu(),
                          tolerance(o.mag_dd_z, p.dtype, p.dtype, ref[1].cpu()), f"{what} grad_logits {p}")
            assert_all_zero(got[0][ignored], f"{what} grad_grad_loss of ignored rows")
            assert_all_zero(got[1][ignored], f"{what} grad_logits of ignored rows")
            check_tables(got[2:], ref[2:], (o.mag_dd_W, o.mag_dd_S, o.mag_dd_L), table_grads, what)


def test_cuda_kernels_are_built():
    assert autobalance_ext.has_cuda_kernels(), "rebuild with FORCE_CUDA=1"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("classes,kind", [(k, "normal") for k in CLASSES]
                         + [(k, "extreme") for k in (10, 1000, 8142)])
def test_matches_reference(classes, kind, dtype):
    """K from 1 to 32000 (every kernel shape: lanes per row, column tiles,
    fused and two-pass double backward), G in 1..4, ignored rows, and logits
    of +-1e4 with `extreme`."""
    seed = classes * 31 + FLOAT_DTYPES.index(dtype) * 7 + (kind == "extreme")
    groups = 1 + seed % 4
    ignore_index = 0 if seed % 3 == 0 and classes > 1 else -100  # a class, or not
    p = make_problem(seed, rows_for(classes), classes, groups, dtype, ignore_frac=0.15, kind=kind,
                     use_group=groups > 1 or seed % 2 == 0, ignore_index=ignore_index)
    check_all_ops(p)


@pytest.mark.parametrize("layout", ["transposed", "strided", "rows"])
def test_non_contiguous_inputs(layout):
    p = make_problem(3, 300, 1000, 3, torch.bfloat16, layout=layout, table_layout="transposed")
    assert not p.logits.is_contiguous()
    check_all_ops(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [1024, 4096])
def test_misaligned_rows_give_the_aligned_results(classes, dtype):
    """Rows that do not start on 16 bytes take the scalar path (row starts
    decide it, not K alone); the values must not change."""
    p = on_gpu(make_problem(5, 64, classes, 2, dtype))
    upstream, uz, uw, us, ul = on_gpu(cotangents(make_problem(5, 64, classes, 2, dtype)))

    def shifted(t):  # the same values at a storage offset of one element
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out

    def run(p, uz, us, ul):
        loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
        first = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True)
        second = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, True)
        return (loss, lse, *first, *second)

    odd = dataclasses.replace(p, logits=shifted(p.logits), scale=shifted(p.scale), shift=shifted(p.shift))
    for a, b in zip(run(p, uz, us, ul), run(odd, shifted(uz), shifted(us), shifted(ul))):
        # Only summation orders differ, but a 2-byte output may round the other way.
        tol = 1e-5 if a.dtype == acc_dtype(dtype) else 2 * torch.finfo(a.dtype).eps
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_empty_batch(dtype):
    for classes in (5, 8142):
        p = on_gpu(make_problem(0, 0, classes, 2, dtype))
        upstream, uz, uw, us, ul = on_gpu(cotangents(make_problem(0, 0, classes, 2, dtype)))
        loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
        assert loss.shape == lse.shape == (0,)
        dz, *tables = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True)
        assert dz.shape == (0, classes)
        for t in tables:
            assert t.shape == (2, classes)
            assert_all_zero(t, "table gradient of an empty batch")
        out = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, True)
        assert out[0].shape == (0,) and out[1].shape == (0, classes)
        for t in out[2:]:
            assert_all_zero(t, "double-backward table gradient of an empty batch")


def test_all_rows_ignored():
    p = on_gpu(make_problem(4, 200, 50, 2, torch.float32, ignore_frac=1.0))
    upstream, uz, uw, us, ul = on_gpu(cotangents(make_problem(4, 200, 50, 2, torch.float32)))
    loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    outs = (loss, lse, *OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True),
            *OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, True))
    for t in outs:
        assert_all_zero(t, "outputs with every row ignored")


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_non_finite_logits_poison_only_their_row(dtype, poison):
    p = on_gpu(make_problem(9, 12, 40, 1, dtype, ignore_frac=0.0, use_group=False))
    bad = poisoned_logits(p, 4, poison)
    upstream = on_gpu(cotangents(make_problem(9, 12, 40, 1, dtype))[0])
    check_poison_stays_in_its_row(p, bad, upstream, 4, poison)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_extreme_logits_stay_finite_and_exact(dtype):
    check_extreme_logits(dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [10, 1000, 8142])
def test_deterministic(classes, dtype):
    """Two runs are bit-identical, table gradients included."""
    p = on_gpu(make_problem(1, 4096 if classes < 8142 else 512, classes, 3, dtype))
    upstream, uz, uw, us, ul = on_gpu(cotangents(make_problem(1, 4096 if classes < 8142 else 512, classes, 3, dtype)))

    def run():
        loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
        first = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True)
        mixed = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, None, None, None, p.ignore_index, True)
        full = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, True)
        return (loss, lse, *first, *mixed, *full)

    for i, (a, b) in enumerate(zip(run(), run())):
        assert torch.equal(a, b), f"output {i} differs between two runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [10, 1000, 8142])
def test_a_missing_table_cotangent_is_zero(classes, dtype):
    """As on the CPU, in the fused and the two-pass kernels."""
    p = on_gpu(make_problem(6, 64, classes, 2, dtype))
    check_missing_table_cotangent_is_zero(p, *on_gpu(cotangents(make_problem(6, 64, classes, 2, dtype))), (True,))


@pytest.mark.parametrize("classes", [10, 1000, 2000])
def test_opcheck(classes):
    p = on_gpu(make_problem(2, 8, classes, 2, torch.float32, use_group=True))
    upstream, uz, uw, us, ul = on_gpu(cotangents(make_problem(2, 8, classes, 2, torch.float32, use_group=True)))
    z, W, S, L = (t.detach().clone().requires_grad_(True) for t in (p.logits, *p.tables()))
    torch.library.opcheck(OPS.parametric_ce.default, (z, p.target, p.group, W, S, L, p.ignore_index))
    _, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    g = upstream.clone().requires_grad_(True)
    torch.library.opcheck(OPS.parametric_ce_backward.default,
                          (g, z, p.target, p.group, W, S, L, lse, p.ignore_index, True))
    # No input requires grad here: third derivatives are not implemented.
    torch.library.opcheck(OPS.parametric_ce_double_backward.default,
                          (upstream, *p.args(), lse, uz, None, us, ul, p.ignore_index, True))


def test_module_autograd_matches_reference_backend():
    """Loss, gradient and the mixed second derivative through ParametricCE."""
    torch.manual_seed(0)
    logits = torch.randn(64, 100, device="cuda", requires_grad=True)
    target = torch.randint(0, 100, (64,), device="cuda")
    results = []
    for backend in ("fused", "reference"):
        module = autobalance.ParametricCE(100, backend=backend).cuda()
        loss = module(logits, target)
        (g_logits,) = torch.autograd.grad(loss, logits, create_graph=True)
        second = torch.autograd.grad((g_logits * logits.detach()).sum(), [logits, *module.parameters()])
        results.append((loss, g_logits, *second))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 10).cuda()
    criterion = autobalance.ParametricCE(10).cuda()
    x = torch.randn(32, 16, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")

    def step(x, y):
        return criterion(model(x), y)

    params = [*model.parameters(), *criterion.parameters()]
    eager = step(x, y)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(step, fullgraph=True)(x, y)
    compiled_grads = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_cuda_mixup_raises_value_error():
    p = on_gpu(make_problem(0, 8, 10, 1, torch.float32))
    args = [*p.args(), p.ignore_index]
    for i in (0, 1, 3, 4, 5):  # logits, target, weight, scale, shift on the CPU
        bad = list(args)
        bad[i] = bad[i].cpu()
        with pytest.raises(ValueError, match="same device"):
            OPS.parametric_ce(*bad)
    upstream, uz = on_gpu(cotangents(make_problem(0, 8, 10, 1, torch.float32))[:2])
    _, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    for bad_gamma, bad_lse in ((upstream.cpu(), lse), (upstream, lse.cpu())):
        with pytest.raises(ValueError, match="same device"):
            OPS.parametric_ce_backward(bad_gamma, *p.args(), bad_lse, p.ignore_index, True)
    with pytest.raises(ValueError, match="same device"):
        OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz.cpu(), None, None, None, p.ignore_index, True)


# ------------------------------------------------- target distributions

# (target kind, label_smoothing): docs/math.md section 8.
TARGETS = [("probs", 0.0), ("probs", 0.2), ("indices", 0.1)]


def with_target(p, kind, salt=5):
    """``p`` with a probability target of its logits' dtype (random rows that sum
    to 1) for kind "probs"; ``p`` itself for "indices"."""
    if kind == "indices":
        return p
    P = torch.rand(p.N, p.K, generator=p.generator(salt), dtype=torch.float64)
    return dataclasses.replace(p, target=(P / P.sum(1, keepdim=True)).to(p.dtype))


def assert_matches_cpu(got, want, what):
    """CUDA outputs against the CPU kernels' on the same inputs: only summation
    orders, fma and the exponential differ (2-byte outputs may round the other way)."""
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.is_cuda and g.dtype == w.dtype and g.shape == w.shape, f"{what}: output {i}"
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(w.dtype, 2 * torch.finfo(w.dtype).eps)
        w = w.double()
        atol = tol * max(1.0, w.abs().max().item() if w.numel() else 0.0)
        torch.testing.assert_close(g.cpu().double(), w, rtol=tol, atol=atol, msg=lambda m: f"{what}: output {i}: {m}")


def check_target_distribution(p, smoothing):
    """The three ops on the GPU against the CPU kernels (tests/test_ops.py holds
    those to the math) with a probability target or label smoothing: every
    output, both table_grads, every cotangent combination. Both backwards read
    the CPU's lse."""
    q = on_gpu(p)
    cpu = OPS.parametric_ce(*p.args(), p.ignore_index, smoothing)
    gpu = OPS.parametric_ce(*q.args(), q.ignore_index, smoothing)
    assert_matches_cpu(gpu, cpu, f"forward {p}")
    if not p.target.is_floating_point():
        assert_all_zero(gpu[0][q.target == q.ignore_index], "loss of ignored rows")
    lse = cpu[1]
    upstream = cotangents(p)[0]
    for table_grads in (True, False):
        want = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, table_grads, smoothing)
        got = OPS.parametric_ce_backward(on_gpu(upstream), *q.args(), on_gpu(lse), q.ignore_index, table_grads,
                                         smoothing)
        assert_matches_cpu(got, want, f"backward (table_grads={table_grads}) {p}")
    for present in PRESENT:
        cot = cotangents(p, present)
        want = OPS.parametric_ce_double_backward(cot[0], *p.args(), lse, *cot[1:], p.ignore_index, True, smoothing)
        got = OPS.parametric_ce_double_backward(on_gpu(cot[0]), *q.args(), on_gpu(lse), *on_gpu(cot[1:]),
                                                q.ignore_index, True, smoothing)
        assert_matches_cpu(got, want, f"double backward [{present_id(present)}] {p}")


@pytest.mark.parametrize("kind,smoothing", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [5, 100, 600, 1500])
def test_target_distributions_match_cpu(classes, dtype, kind, smoothing):
    """K = 5 and 100 (lanes per row, the tile holds the row), 600 (past the
    backward's one tile: its row pass of Σ; for float64 past the fused double
    backward too) and 1500 (past kFusedMaxK: the double backward's row pass),
    G = 3 with groups, ignored rows with class indices."""
    seed = classes + 11 * [torch.float32, torch.float64, torch.bfloat16].index(dtype)
    p = make_problem(seed, min(rows_for(classes), 400), classes, 3, dtype, ignore_frac=0.15)
    check_target_distribution(with_target(p, kind), smoothing)


@pytest.mark.parametrize("kind,smoothing", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [10, 1000, 8142])
def test_target_distributions_deterministic(classes, dtype, kind, smoothing):
    """Two runs are bit-identical, table gradients included."""
    rows = 4096 if classes < 8142 else 512
    base = make_problem(1, rows, classes, 3, dtype)
    p = on_gpu(with_target(base, kind))
    upstream, uz, uw, us, ul = on_gpu(cotangents(base))

    def run():
        loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index, smoothing)
        first = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True, smoothing)
        full = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, True,
                                                 smoothing)
        return (loss, lse, *first, *full)

    for i, (a, b) in enumerate(zip(run(), run())):
        assert torch.equal(a, b), f"output {i} differs between two runs"


def test_probability_target_checks_only_the_group():
    """A probability target is never read as indices; its groups are checked
    as with class indices."""
    p = on_gpu(with_target(make_problem(0, 4000, 10, 2, torch.float32, ignore_frac=0.0), "probs"))
    upstream = on_gpu(cotangents(make_problem(0, 4000, 10, 2, torch.float32))[0])
    loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    group = p.group.clone()
    group[2500] = 2
    with pytest.raises(IndexError, match=r"`group\[2500\]` = 2 is out of range.*\[0, 2\)"):
        OPS.parametric_ce(p.logits, p.target, group, *p.tables(), p.ignore_index)
    with pytest.raises(IndexError, match=r"`group\[2500\]` = 2 is out of range"):
        OPS.parametric_ce_backward(upstream, p.logits, p.target, group, *p.tables(), lse, p.ignore_index, True)
    no_group = on_gpu(with_target(make_problem(0, 4000, 10, 1, torch.float32, use_group=False), "probs"))
    out = OPS.parametric_ce(*no_group.args(), no_group.ignore_index)
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in (loss, lse, *out))


@pytest.mark.parametrize("op", ["forward", "backward", "double_backward"])
def test_out_of_range_index_raises_index_error(op):
    """Every op checks the indices before its launch and raises the CPU
    kernels' IndexError (naming the lowest bad row); ignored rows may hold any
    value, and the CUDA context stays usable afterwards."""
    p = on_gpu(make_problem(0, 4000, 10, 2, torch.float32, ignore_frac=0.1, ignore_index=-1))
    upstream, uz = on_gpu(cotangents(make_problem(0, 4000, 10, 2, torch.float32))[:2])
    _, lse = OPS.parametric_ce(*p.args(), p.ignore_index)

    def call(target, group):
        args = (p.logits, target, group, *p.tables())
        if op == "forward":
            return OPS.parametric_ce(*args, p.ignore_index)
        if op == "backward":
            return OPS.parametric_ce_backward(upstream, *args, lse, p.ignore_index, True)
        return OPS.parametric_ce_double_backward(upstream, *args, lse, uz, None, None, None, p.ignore_index, True)

    for row, bad in ((3777, 10), (1234, -5)):
        target = p.target.clone()
        target[row] = bad
        target[row + 100] = bad  # a later bad row: the lowest one is named
        with pytest.raises(IndexError, match=rf"`target\[{row}\]` = {bad} is out of range.*\[0, 10\)"):
            call(target, p.group)
    group = p.group.clone()
    group[2500] = 2
    with pytest.raises(IndexError, match=r"`group\[2500\]` = 2 is out of range.*\[0, 2\)"):
        call(p.target, group)
    group[2500] = 0
    target = p.target.clone()
    target[2500] = p.ignore_index
    group[2500] = 7  # the group of an ignored row is never read
    out = call(target, group)
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in out)
