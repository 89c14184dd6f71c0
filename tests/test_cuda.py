"""The CUDA kernels against the plain-PyTorch reference (MATH.md sections 1,
3, 4), run in float64 as the oracle. Skipped without a CUDA device."""
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import autobalance
import autobalance_ext
from autobalance import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ops = torch.ops.autobalance
IGNORE = -100
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CLASSES = [1, 10, 100, 1000, 8142, 32000]
COTANGENTS = list(itertools.product([False, True], repeat=4))  # (Uz, UW, US, UL) present?

# Tolerance relative to the largest expected magnitude, by output dtype.
# float32 outputs from 2-byte logits are exact inputs accumulated in float32.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def acc_of(dtype):
    return autobalance_ext.accumulate_dtype(dtype)


def rows_for(classes):
    """Enough rows for several row chunks, few enough for the reference."""
    return max(3, min(3000, 1_000_000 // classes))


def make_case(rows, classes, groups, dtype, seed, *, extreme=False):
    """Random inputs on the GPU; ~15% ignored rows. With `extreme`, every
    fifth row has logits of about ±1e4, and S is a power of two and L = 0 so
    that a = S z + L stays exact in float32 (at 1e4 a float32 is only good to
    ~1e-3, which p = exp(a - lse) and grad_scale = Σ z (...) would inherit in
    any implementation)."""
    gen = torch.Generator().manual_seed(seed)
    acc = acc_of(dtype)
    logits = torch.randn(rows, classes, generator=gen, dtype=torch.float64) * 3
    if extreme:
        logits[::5] *= 1e3
    target = torch.randint(0, classes, (rows,), generator=gen)
    target[torch.rand(rows, generator=gen) < 0.15] = IGNORE
    group = torch.randint(0, groups, (rows,), generator=gen) if groups > 1 or seed % 2 else None

    def table(low, width):
        return torch.rand(groups, classes, generator=gen, dtype=torch.float64) * width + low

    def normal(scale=1.0):
        return torch.randn(groups, classes, generator=gen, dtype=torch.float64) * scale

    if extreme:
        scale = 2.0 ** torch.randint(-1, 2, (groups, classes), generator=gen).double()
        shift = torch.zeros(groups, classes, dtype=torch.float64)
    else:
        scale, shift = table(0.5, 1.0), normal()
    case = dict(
        logits=logits.to(dtype), target=target, group=group,
        weight=table(0.5, 1.5).to(acc), scale=scale.to(acc), shift=shift.to(acc),
        grad_loss=torch.randn(rows, generator=gen, dtype=torch.float64).to(acc),
        u_logits=torch.randn(rows, classes, generator=gen, dtype=torch.float64).to(dtype),
        u_weight=normal().to(acc),
        # With ~1e4 logits a unit u_scale would push grad_logits past float16.
        u_scale=normal(1e-4 if extreme else 1.0).to(acc),
        u_shift=normal().to(acc),
    )
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def as64(case):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in case.items()}


def assert_close(actual, expected, dtype, what, tol=None, atol=0.0):
    """Within tol * max(|expected|, 1) (the values here are O(1) or larger),
    plus `atol`."""
    tol = TOL[dtype] if tol is None else tol
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, what
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale + atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def lse_rounding_bound(c, lse, present):
    """How far grad_scale of the double backward may move because lse is
    stored in float32 (to first order): an error d in lse moves p_k by p_k d
    and v̄ by v̄ d, so t_k by p_k d (|c| (|v_k - v̄| + |v̄|) + |cu|), and
    grad_scale sums z_k t_k."""
    r = as64(c)
    valid = r["target"] != IGNORE
    g = r["group"] if r["group"] is not None else torch.zeros_like(r["target"])
    y = torch.where(valid, r["target"], 0)
    _, exact_lse = reference.parametric_ce(r["logits"], r["target"], r["group"], r["weight"],
                                           r["scale"], r["shift"], IGNORE)
    p = torch.exp(r["scale"][g] * r["logits"] + r["shift"][g] - exact_lse[:, None])
    v = torch.zeros_like(p)
    if present[0]:
        v += r["scale"][g] * r["u_logits"]
    if present[3]:
        v += r["u_shift"][g]
    if present[2]:
        v += r["u_scale"][g] * r["logits"]
    vbar = (p * v).sum(1, keepdim=True)
    c_ = (r["grad_loss"] * r["weight"][g, y]).abs()[:, None]
    cu = (r["grad_loss"] * r["u_weight"][g, y]).abs()[:, None] if present[1] else 0.0
    moved = (r["logits"].abs() * p * (c_ * ((v - vbar).abs() + vbar.abs()) + cu)).sum(1)
    per_row = (lse.double() - exact_lse).abs() * moved
    return 4 * float(torch.where(valid, per_row, 0).sum())


def fused_forward(c):
    return ops.parametric_ce(c["logits"], c["target"], c["group"], c["weight"], c["scale"],
                             c["shift"], IGNORE)


def backward_args(c, lse):
    return (c["grad_loss"], c["logits"], c["target"], c["group"], c["weight"], c["scale"],
            c["shift"], lse)


def cotangents(c, present):
    return [c[name] if on else None
            for name, on in zip(("u_logits", "u_weight", "u_scale", "u_shift"), present)]


def check_all_ops(c, dtype, tol_floor=0.0, lse_rounding=False):
    """Every output of the three ops, every cotangent combination, against
    the reference in float64. With `lse_rounding`, grad_scale of the double
    backward may also differ by lse_rounding_bound."""
    acc = acc_of(dtype)
    tol_out = max(TOL[dtype], tol_floor)
    tol_acc = max(TOL[acc], tol_floor)

    def check_tables(out, ref, what, scale_atol=0.0):
        for name, a, b in zip(("grad_weight", "grad_scale", "grad_shift"), out, ref):
            assert a.dtype == acc
            assert_close(a, b, acc, f"{what} {name}", tol_acc,
                         scale_atol if name == "grad_scale" else 0.0)

    r = as64(c)
    loss, lse = fused_forward(c)
    ref_loss, ref_lse = reference.parametric_ce(r["logits"], r["target"], r["group"], r["weight"],
                                                r["scale"], r["shift"], IGNORE)
    assert loss.dtype == lse.dtype == acc
    assert_close(loss, ref_loss, acc, "loss", tol_acc)
    assert_close(lse, ref_lse, acc, "lse", tol_acc)

    for table_grads in (True, False):
        out = ops.parametric_ce_backward(*backward_args(c, lse), IGNORE, table_grads)
        ref = reference.parametric_ce_backward(*backward_args(r, ref_lse), IGNORE, table_grads)
        assert out[0].dtype == dtype
        assert_close(out[0], ref[0], dtype, "backward grad_logits", tol_out)
        check_tables(out[1:], ref[1:], f"backward (table_grads={table_grads})")

    for present in COTANGENTS:
        out = ops.parametric_ce_double_backward(*backward_args(c, lse), *cotangents(c, present),
                                                IGNORE, True)
        ref = reference.parametric_ce_double_backward(*backward_args(r, ref_lse),
                                                      *cotangents(r, present), IGNORE, True)
        what = f"double backward, (Uz, UW, US, UL) = {present}:"
        assert out[0].dtype == acc and out[1].dtype == dtype
        assert_close(out[0], ref[0], acc, f"{what} grad_grad_loss", tol_acc)
        assert_close(out[1], ref[1], dtype, f"{what} grad_logits", tol_out)
        bound = lse_rounding_bound(c, lse, present) if lse_rounding and acc != torch.float64 else 0.0
        check_tables(out[2:], ref[2:], what, bound)
    out = ops.parametric_ce_double_backward(*backward_args(c, lse), *cotangents(c, (True,) * 4),
                                            IGNORE, False)
    assert all(bool((t == 0).all()) for t in out[2:]), "table_grads=False must give zeros"


def test_cuda_kernels_are_built():
    assert autobalance_ext.has_cuda_kernels(), "rebuild with FORCE_CUDA=1"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", CLASSES)
def test_matches_reference(classes, dtype):
    seed = classes * 7 + DTYPES.index(dtype)
    groups = 1 + seed % 4
    check_all_ops(make_case(rows_for(classes), classes, groups, dtype, seed), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [10, 1000, 8142])
def test_extreme_logits(classes, dtype):
    # lse is a float32 output: at ~1e4 it is good to ~5e-4, and so is
    # p = exp(a - lse) where two logits of a row are close; grad_scale sums
    # z * (...), multiplying that by ~1e4.
    c = make_case(rows_for(classes) // 4 + 3, classes, 2, dtype, 11 + classes, extreme=True)
    check_all_ops(c, dtype, tol_floor=0.0 if dtype == torch.float64 else 1e-2, lse_rounding=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_and_strided_inputs(dtype):
    """Rows that do not start on 16 bytes take the scalar path; non-contiguous
    inputs are made contiguous; both give the aligned results."""
    rows, classes = 40, 1024
    c = make_case(rows, classes, 3, dtype, 5)
    loss, lse = fused_forward(c)
    ref_b = ops.parametric_ce_backward(*backward_args(c, lse), IGNORE, True)
    ref_dd = ops.parametric_ce_double_backward(*backward_args(c, lse), *cotangents(c, (True,) * 4),
                                               IGNORE, True)

    def shifted(t):  # same values, storage offset of one element
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out

    def strided(t):  # same values, column-major
        return t.t().contiguous().t()

    for move in (shifted, strided):
        m = dict(c, logits=move(c["logits"]), u_logits=move(c["u_logits"]), scale=move(c["scale"]),
                 shift=move(c["shift"]), u_scale=move(c["u_scale"]), u_shift=move(c["u_shift"]))
        loss2, lse2 = fused_forward(m)
        assert_close(loss2, loss, acc_of(dtype), f"{move.__name__} loss")
        out = ops.parametric_ce_backward(*backward_args(m, lse), IGNORE, True)
        for a, b in zip(out, ref_b):
            assert_close(a, b, a.dtype, f"{move.__name__} backward")
        out = ops.parametric_ce_double_backward(*backward_args(m, lse), *cotangents(m, (True,) * 4),
                                                IGNORE, True)
        for a, b in zip(out, ref_dd):
            assert_close(a, b, a.dtype, f"{move.__name__} double backward")


def test_ignore_index_inside_class_range_and_all_ignored():
    c = make_case(300, 50, 2, torch.float32, 3)
    c["target"][c["target"] == IGNORE] = 8
    c["target"][::3] = 7
    r = as64(c)
    loss, lse = ops.parametric_ce(c["logits"], c["target"], c["group"], c["weight"], c["scale"],
                                  c["shift"], 7)
    ref_loss, _ = reference.parametric_ce(r["logits"], r["target"], r["group"], r["weight"],
                                          r["scale"], r["shift"], 7)
    assert_close(loss, ref_loss, torch.float32, "loss with ignore_index = 7")
    assert bool((loss[::3] == 0).all() and (lse[::3] == 0).all())
    c["target"][:] = IGNORE
    loss, lse = fused_forward(c)
    out = ops.parametric_ce_backward(*backward_args(c, lse), IGNORE, True)
    dd = ops.parametric_ce_double_backward(*backward_args(c, lse), *cotangents(c, (True,) * 4),
                                           IGNORE, True)
    for t in (loss, lse, *out, *dd):
        assert bool((t == 0).all())


@pytest.mark.parametrize("classes", [10, 8142])
def test_no_rows(classes):
    c = make_case(0, classes, 2, torch.float32, 0)
    loss, lse = fused_forward(c)
    assert loss.shape == lse.shape == (0,)
    out = ops.parametric_ce_backward(*backward_args(c, lse), IGNORE, True)
    assert out[0].shape == (0, classes) and all(bool((t == 0).all()) for t in out[1:])
    dd = ops.parametric_ce_double_backward(*backward_args(c, lse), *cotangents(c, (True,) * 4),
                                           IGNORE, True)
    assert dd[0].shape == (0,) and dd[1].shape == (0, classes)
    assert all(bool((t == 0).all()) for t in dd[2:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("classes", [10, 1000, 8142])
def test_deterministic(classes, dtype):
    """Two runs are bit-identical, table gradients included."""
    c = make_case(4096 if classes < 8142 else 512, classes, 3, dtype, 1)

    def run():
        loss, lse = fused_forward(c)
        b = ops.parametric_ce_backward(*backward_args(c, lse), IGNORE, True)
        d = ops.parametric_ce_double_backward(*backward_args(c, lse), c["u_logits"], None, None,
                                              None, IGNORE, True)
        return (loss, lse, *b, *d)

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between runs"


def _opcheck_case(classes):
    c = make_case(8, classes, 2, torch.float32, 2)
    loss, lse = fused_forward(c)
    return c, lse


@pytest.mark.parametrize("classes", [10, 1000, 2000])
def test_opcheck(classes):
    c, lse = _opcheck_case(classes)
    grad = {k: c[k].clone().requires_grad_(True) for k in ("logits", "weight", "scale", "shift")}
    torch.library.opcheck(ops.parametric_ce.default,
                          (grad["logits"], c["target"], c["group"], grad["weight"], grad["scale"],
                           grad["shift"], IGNORE))
    gl = c["grad_loss"].clone().requires_grad_(True)
    torch.library.opcheck(ops.parametric_ce_backward.default,
                          (gl, grad["logits"], c["target"], c["group"], grad["weight"], grad["scale"],
                           grad["shift"], lse, IGNORE, True))
    # No grad-requiring inputs: a third derivative is not implemented.
    torch.library.opcheck(ops.parametric_ce_double_backward.default,
                          (*backward_args(c, lse), *cotangents(c, (True, False, True, True)),
                           IGNORE, True))


def test_autograd_through_the_module_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(64, 100, device="cuda", requires_grad=True)
    target = torch.randint(0, 100, (64,), device="cuda")
    fused = autobalance.ParametricCE(100).cuda()
    ref = autobalance.ParametricCE(100, backend="reference").cuda()
    results = []
    for module in (fused, ref):
        loss = module(logits, target)
        (g_logits,) = torch.autograd.grad(loss, logits, create_graph=True)
        hvp = torch.autograd.grad((g_logits * logits.detach()).sum(),
                                  [logits, *module.parameters()])
        results.append((loss, g_logits, *hvp))
    for a, b in zip(*results):
        assert_close(a, b, torch.float32, "module autograd")


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
    assert_close(compiled, eager, torch.float32, "compiled loss")
    for a, b in zip(compiled_grads, eager_grads):
        assert_close(a, b, torch.float32, "compiled grads")


def test_cpu_cuda_mixup_raises_value_error():
    c = make_case(8, 10, 1, torch.float32, 0)
    args = [c["logits"], c["target"], c["group"], c["weight"], c["scale"], c["shift"], IGNORE]
    for i in (1, 3, 4, 5):  # target, weight, scale, shift on the CPU
        bad = list(args)
        bad[i] = bad[i].cpu()
        with pytest.raises(ValueError, match="same device"):
            ops.parametric_ce(*bad)
    bad = list(args)
    bad[0] = bad[0].cpu()  # logits on the CPU, the tables on the GPU
    with pytest.raises(ValueError, match="same device"):
        ops.parametric_ce(*bad)
    loss, lse = fused_forward(c)
    with pytest.raises(ValueError, match="same device"):
        ops.parametric_ce_backward(c["grad_loss"], c["logits"], c["target"], None, c["weight"],
                                   c["scale"], c["shift"], lse.cpu(), IGNORE, True)
    with pytest.raises(ValueError, match="same device"):
        ops.parametric_ce_double_backward(*backward_args(c, lse), c["u_logits"].cpu(), None, None,
                                          None, IGNORE, True)


def test_out_of_range_target_is_a_device_side_assert():
    # A device-side assert poisons the CUDA context, so it runs in a child.
    code = textwrap.dedent("""
        import torch, autobalance_ext
        z = torch.randn(4, 10, device="cuda")
        t = torch.tensor([0, 1, 10, 2], device="cuda")
        w = torch.ones(1, 10, device="cuda")
        torch.ops.autobalance.parametric_ce(z, t, None, w, w, w * 0, -100)
        torch.cuda.synchronize()
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "device-side assert" in proc.stderr or "Assertion" in proc.stderr, proc.stderr[-2000:]
