"""The fused CPU ops against the plain-PyTorch reference and docs/math.md
sections 1, 3, 4: values, first and second derivatives, autograd wiring,
opcheck, torch.compile, determinism and edge cases."""
import itertools
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import autobalance
from conftest import (FLOAT_DTYPES, OPS, POISONS, Oracle, acc_dtype, assert_all_zero, assert_within,
                      check_extreme_logits, check_missing_table_cotangent_is_zero, check_poison_stays_in_its_row,
                      cotangents, examples, make_problem, poisoned_logits, problems, reference, tolerance)

from conftest import pce  # noqa: E402


def _from_residual(upstream, *args):
    """The in-place residual backward on a copy of the residual, as
    (grad_logits, grad_weight, grad_scale, grad_shift)."""
    *rest, residual, ignore_index, table_grads = args
    dz = residual.clone()
    return (dz, *OPS._parametric_ce_backward_from_residual_(upstream, *rest, dz, ignore_index, table_grads))


def _forward(p, impl):
    return impl.parametric_ce(*p.args(), p.ignore_index)


def _ignored(p):
    return p.target == p.ignore_index


# ------------------------------------------------------------ forward

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@settings(max_examples=examples(15))
@given(data=st.data())
def test_forward_matches_reference(dtype, data):
    p = data.draw(problems(dtypes=(dtype,)), label="problem")
    loss, lse = _forward(p, OPS)
    ref_loss, ref_lse = _forward(p, reference)
    for t in (loss, lse):
        assert t.dtype == p.acc and tuple(t.shape) == (p.N,)
    o = Oracle(p)
    assert_within(loss, ref_loss, tolerance(o.mag_loss, p.dtype), f"loss {p}")
    assert_within(lse, ref_lse, tolerance(o.mag_lse, p.dtype), f"lse {p}")
    assert_all_zero(loss[_ignored(p)], "loss of ignored rows")
    assert_all_zero(lse[_ignored(p)], "lse of ignored rows")


@settings(max_examples=examples(25))
@given(problems(dtypes=(torch.float64,), max_n=64), st.booleans())
def test_fused_and_reference_follow_math_md(p, all_cotangents):
    """Both implementations against sections 1, 3 and 4 written out in float64."""
    cot = cotangents(p, (True,) * 4 if all_cotangents else (True, False, True, False))
    o = Oracle(p, *cot)
    for impl in (OPS, reference):
        loss, lse = _forward(p, impl)
        assert_within(loss, o.loss, tolerance(o.mag_loss, p.dtype), f"{impl} loss")
        assert_within(lse, o.lse, tolerance(o.mag_lse, p.dtype), f"{impl} lse")
        first = impl.parametric_ce_backward(cot[0], *p.args(), lse, p.ignore_index, True)
        for name, got, exp, mag in zip(("dz", "dW", "dS", "dL"), first, (o.dz, o.dW, o.dS, o.dL),
                                       (o.mag_dz, o.mag_dW, o.mag_dS, o.mag_dL)):
            assert_within(got, exp, tolerance(mag, p.dtype), f"{impl} backward {name} {p}")
        second = impl.parametric_ce_double_backward(cot[0], *p.args(), lse, *cot[1:], p.ignore_index, True)
        for name, got, exp, mag in zip(
                ("dgamma", "dz", "dW", "dS", "dL"), second, (o.dd_gamma, o.dd_z, o.dd_W, o.dd_S, o.dd_L),
                (o.mag_dd_gamma, o.mag_dd_z, o.mag_dd_W, o.mag_dd_S, o.mag_dd_L)):
            assert_within(got, exp, tolerance(mag, p.dtype), f"{impl} double backward {name} {p}")


# ------------------------------------------------------------ backward

def _check_table_outputs(got, ref, mags, p, table_grads, what):
    for name, g, r, mag in zip(("weight", "scale", "shift"), got, ref, mags):
        assert g.dtype == p.acc and tuple(g.shape) == (p.G, p.K), f"{what} grad_{name}: {g.dtype} {g.shape}"
        if table_grads:
            assert_within(g, r, tolerance(mag, p.dtype), f"{what} grad_{name} {p}")
        else:
            assert_all_zero(g, f"{what} grad_{name} with table_grads=False")
            assert_all_zero(r, f"reference {what} grad_{name} with table_grads=False")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@settings(max_examples=examples(15))
@given(data=st.data(), table_grads=st.booleans(), gamma_kind=st.sampled_from(["random", "expanded", "strided"]))
def test_backward_matches_reference(dtype, data, table_grads, gamma_kind):
    p = data.draw(problems(dtypes=(dtype,)), label="problem")
    upstream = cotangents(p)[0]
    if gamma_kind == "expanded":  # what a 'mean'/'sum' reduction sends back: stride 0
        upstream = torch.tensor(0.37, dtype=p.acc).expand(p.N)
    elif gamma_kind == "strided":
        upstream = torch.stack([upstream, torch.zeros_like(upstream)], 1).reshape(-1)[::2]
    _, lse = _forward(p, OPS)
    _, ref_lse = _forward(p, reference)
    got = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, table_grads)
    ref = reference.parametric_ce_backward(upstream, *p.args(), ref_lse, p.ignore_index, table_grads)
    o = Oracle(p, upstream)
    dz = got[0]
    assert dz.dtype == p.dtype and tuple(dz.shape) == (p.N, p.K)
    assert_within(dz, ref[0], tolerance(o.mag_dz, p.dtype, p.dtype, ref[0]), f"grad_logits {p}")
    assert_all_zero(dz[_ignored(p)], "grad_logits of ignored rows")
    _check_table_outputs(got[1:], ref[1:], (o.mag_dW, o.mag_dS, o.mag_dL), p, table_grads, "backward")
    if p.dtype in (torch.float32, torch.float64):  # the residual path (a backward not differentiated again)
        loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
        r_loss, r_lse, residual = OPS._parametric_ce_with_residual(*p.args(), p.ignore_index)
        assert torch.equal(r_loss, loss) and torch.equal(r_lse, lse), "the residual forward changed loss or lse"
        assert_all_zero(residual[_ignored(p)], "residual of ignored rows")
        got = _from_residual(upstream, *p.args(), lse, residual, p.ignore_index, table_grads)
        assert_within(got[0], ref[0], tolerance(o.mag_dz, p.dtype, p.dtype, ref[0]), f"residual grad_logits {p}")
        assert_all_zero(got[0][_ignored(p)], "residual grad_logits of ignored rows")
        _check_table_outputs(got[1:], ref[1:], (o.mag_dW, o.mag_dS, o.mag_dL), p, table_grads, "residual backward")


# ----------------------------------------------------- double backward

PRESENT = list(itertools.product([False, True], repeat=4))


@pytest.mark.parametrize("present", PRESENT, ids=lambda m: "".join("zWSL"[i] if x else "-" for i, x in enumerate(m)))
@settings(max_examples=examples(6))
@given(p=problems(max_n=120), table_grads=st.booleans(), uz_layout=st.sampled_from(["contiguous", "transposed"]))
def test_double_backward_matches_reference(present, p, table_grads, uz_layout):
    upstream, uz, uw, us, ul = cotangents(p, present, layout=uz_layout)
    _, lse = _forward(p, OPS)
    _, ref_lse = _forward(p, reference)
    got = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, table_grads)
    ref = reference.parametric_ce_double_backward(upstream, *p.args(), ref_lse, uz, uw, us, ul,
                                                  p.ignore_index, table_grads)
    assert len(got) == 5
    dgamma, dz = got[0], got[1]
    assert dgamma.dtype == p.acc and tuple(dgamma.shape) == (p.N,)
    assert dz.dtype == p.dtype and tuple(dz.shape) == (p.N, p.K)
    if not any(present):
        for t in got + ref:
            assert_all_zero(t, "double backward without cotangents")
        return
    o = Oracle(p, upstream, uz, uw, us, ul)
    assert_within(dgamma, ref[0], tolerance(o.mag_dd_gamma, p.dtype), f"grad_grad_loss {p}")
    assert_within(dz, ref[1], tolerance(o.mag_dd_z, p.dtype, p.dtype, ref[1]), f"grad_logits {p}")
    ignored = _ignored(p)
    assert_all_zero(dz[ignored], "grad_logits of ignored rows")
    assert_all_zero(dgamma[ignored], "grad_grad_loss of ignored rows")
    _check_table_outputs(got[2:], ref[2:], (o.mag_dd_W, o.mag_dd_S, o.mag_dd_L), p, table_grads,
                         "double backward")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_a_missing_table_cotangent_is_zero(dtype):
    p = make_problem(6, 40, 13, 2, dtype)
    check_missing_table_cotangent_is_zero(p, *cotangents(p))


def test_a_missing_scale_cotangent_keeps_a_masked_class_finite():
    """A -inf logit (a masked class) with u_shift given and u_scale missing: the
    missing table's term US z is left out, not 0 * -inf, so the row's
    grad_grad_loss, grad_logits and weight and shift gradients stay finite and
    match the reference. (The scale gradient has z t = -inf * 0 there, NaN in
    the reference too.)"""
    p = make_problem(7, 12, 6, 2, torch.float64)
    p.logits[3, (int(p.target[3]) + 1) % 6] = -math.inf
    upstream, uz, uw, _, ul = cotangents(p)
    _, lse = _forward(p, OPS)
    for u_logits in (uz, None):
        got = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, u_logits, uw, None, ul,
                                                p.ignore_index, True)
        want = reference.parametric_ce_double_backward(upstream, *p.args(), lse, u_logits, uw, None, ul,
                                                       p.ignore_index, True)
        for i in (0, 1, 2, 4):  # grad_grad_loss, grad_logits, grad_weight, grad_shift
            assert torch.isfinite(got[i]).all(), f"output {i}: {got[i]}"
            torch.testing.assert_close(got[i], want[i], rtol=1e-10, atol=1e-12)


# -------------------------------------------- end-to-end autograd

def _leaves(p, needs):
    z = p.logits.detach().clone().requires_grad_(needs[0])
    tabs = [t.detach().clone().requires_grad_(n) for t, n in zip(p.tables(), needs[1:])]
    return [z] + tabs


def _assert_close_to_reference(got, ref, p, what, floor=0.0):
    """Fused vs reference through autograd: relative tolerance 1e-11 (float64) or
    2e-5, and an absolute one scaled by 1 + max(|ref|, floor)."""
    assert got.dtype == ref.dtype, what
    rel = 1e-11 if p.dtype == torch.float64 else 2e-5
    ref = ref.detach().double()
    scale = 1.0 + max(ref.abs().max().item() if ref.numel() else 0.0, floor)
    torch.testing.assert_close(got.detach().double(), ref, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


def _e2e(p, backend, reduction, needs, w_out, v):
    leaves = _leaves(p, needs)
    z, W, S, L = leaves
    loss = pce(z, p.target, W, S, L, p.group, reduction=reduction, ignore_index=p.ignore_index, backend=backend)
    out = (loss * w_out).sum() if reduction == "none" else loss
    wrt = [x for x in leaves if x.requires_grad]
    first = torch.autograd.grad(out, wrt, create_graph=True)
    gz = first[0]
    hv = (gz.double() * v).sum()  # <v, dloss/dz>
    second = torch.autograd.grad(hv, wrt, allow_unused=True)
    second = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, second)]
    return loss, first, second


@settings(max_examples=examples(30))
@given(problems(dtypes=(torch.float64, torch.float32), max_n=80, big_k=False, kinds=("normal", "tied"), min_n=1),
       st.sampled_from(["none", "sum", "mean"]),
       st.sampled_from([(True, True, True, True), (True, False, False, False), (True, False, True, True),
                        (True, True, False, False), (True, False, False, True)]))
def test_autograd_first_and_second_derivatives_match_reference(p, reduction, needs):
    """Gradients, Hessian-vector products in logit space and the mixed derivative
    d/d(tables) <v, dloss/dz> through parametric_cross_entropy, fused vs reference."""
    if reduction == "mean":
        assume(bool((~_ignored(p)).any()))
    gen = p.generator(11)
    w_out = torch.randn(p.N, generator=gen, dtype=torch.float64).to(p.acc)
    v = torch.randn(p.N, p.K, generator=gen, dtype=torch.float64)
    got = _e2e(p, "fused", reduction, needs, w_out, v)
    ref = _e2e(p, "reference", reduction, needs, w_out, v)
    names = [n for n, need in zip(("logits", "weight", "scale", "shift"), needs) if need]

    # The size of the terms a second derivative adds up, |w W S (S v)| per row: its
    # float32 rounding is relative to them, not to the (possibly much smaller) result.
    w = w_out.abs().max().item() if reduction == "none" else 1.0
    terms = 2 * w * p.weight.abs().max().item() * p.scale.abs().max().item() ** 2 * v.abs().max().item()

    _assert_close_to_reference(got[0], ref[0], p, "loss")
    for name, a, b in zip(names, got[1], ref[1]):
        _assert_close_to_reference(a, b, p, f"d loss / d {name}")
    for name, a, b in zip(names, got[2], ref[2]):
        _assert_close_to_reference(a, b, p, f"d<v, dloss/dz> / d {name}", floor=terms)


@settings(max_examples=examples(30))
@given(problems(dtypes=(torch.float64, torch.float32), max_n=80, big_k=False, kinds=("normal", "tied"), min_n=1),
       st.sampled_from(["none", "sum", "mean"]),
       st.sampled_from([(True, True, True, True), (True, False, False, False), (False, True, True, True),
                        (True, False, True, False)]),
       st.sampled_from([1.0, 0.37]))
def test_plain_backward_matches_reference(p, reduction, needs, upstream):
    """A backward that is not differentiated again (the CPU kernels' kept
    residual or forward-made gradients), with the usual upstream gradient 1 and
    another, fused vs reference."""
    if reduction == "mean":
        assume(bool((~_ignored(p)).any()))

    def grads(backend):
        leaves = _leaves(p, needs)
        z, W, S, L = leaves
        loss = pce(z, p.target, W, S, L, p.group, reduction=reduction, ignore_index=p.ignore_index,
                   backend=backend)
        (upstream * (loss.sum() if reduction == "none" else loss)).backward()
        return [x.grad for x in leaves if x.requires_grad]

    for got, ref in zip(grads("fused"), grads("reference")):
        _assert_close_to_reference(got, ref, p, f"plain backward {reduction}")


def test_table_gradients_without_logit_gradients():
    """Only the tables require grad (a hyper-step on fixed features)."""
    p = make_problem(15, 40, 9, 3, torch.float32, ignore_frac=0.2)
    results = []
    for backend in ("fused", "reference"):
        W, S, L = [t.detach().clone().requires_grad_() for t in p.tables()]
        loss = pce(p.logits, p.target, W, S, L, p.group, ignore_index=p.ignore_index, backend=backend)
        results.append(torch.autograd.grad(loss, (W, S, L)))
    for a, b in zip(*results):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _small_f64(seed=0, N=7, K=5, G=3, use_group=True):
    p = make_problem(seed, N, K, G, torch.float64, use_group=use_group, ignore_frac=0.0, kind="normal")
    p.target[1] = p.ignore_index  # at least one ignored row
    return p


@pytest.mark.parametrize("use_group,G", [(True, 3), (False, 1)])
def test_gradcheck_and_gradgradcheck_of_the_op(use_group, G):
    p = _small_f64(N=7, K=5, G=G, use_group=use_group)
    inputs = [x.detach().clone().requires_grad_() for x in (p.logits, *p.tables())]

    def loss(z, W, S, L):
        return OPS.parametric_ce(z, p.target, p.group, W, S, L, p.ignore_index)[0]

    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradgradcheck_through_the_functional(reduction):
    p = _small_f64(seed=3, N=6, K=4, G=2)
    z = p.logits.detach().t().contiguous().t().requires_grad_()  # column-major leaf
    tabs = [x.detach().clone().requires_grad_() for x in p.tables()]

    def f(z, W, S, L):
        return pce(z, p.target, W, S, L, p.group, reduction=reduction, ignore_index=p.ignore_index)

    assert torch.autograd.gradcheck(f, [z] + tabs)
    assert torch.autograd.gradgradcheck(f, [z] + tabs)


def test_gradcheck_of_the_backward_op():
    """Each output of the backward against finite differences: exercises the
    double backward with each single cotangent (lse recomputed, as in autograd)."""
    p = _small_f64(seed=5, N=6, K=4, G=2)

    def backward(upstream, z, W, S, L):
        lse = OPS.parametric_ce(z, p.target, p.group, W, S, L, p.ignore_index)[1]
        return OPS.parametric_ce_backward(upstream, z, p.target, p.group, W, S, L, lse, p.ignore_index, True)

    upstream = torch.randn(p.N, dtype=torch.float64, generator=p.generator())
    inputs = [x.detach().clone().requires_grad_() for x in (upstream, p.logits, *p.tables())]
    assert torch.autograd.gradcheck(backward, inputs)


def test_third_derivative_raises_clear_error():
    p = _small_f64(seed=2)
    z, W, S, L = [x.detach().clone().requires_grad_() for x in (p.logits, *p.tables())]
    loss = pce(z, p.target, W, S, L, p.group, reduction="sum", ignore_index=p.ignore_index)
    gz, = torch.autograd.grad(loss, z, create_graph=True)
    v = torch.randn_like(gz)
    hz, hS = torch.autograd.grad((gz * v).sum(), (z, S), create_graph=True)
    assert hz.requires_grad and hS.requires_grad
    with pytest.raises(NotImplementedError, match="third derivatives"):
        torch.autograd.grad(hz.sum(), z)
    with pytest.raises(NotImplementedError, match="third derivatives"):
        torch.autograd.grad(hS.sum(), S)


# ------------------------------------------------------------ opcheck

def _opcheck_samples():
    samples = []
    for seed, (N, K, G, dtype, use_group, layout) in enumerate([
            (6, 5, 1, torch.float32, False, "contiguous"),
            (9, 4, 3, torch.float64, True, "contiguous"),
            (0, 3, 2, torch.float32, True, "contiguous"),
            (0, 3, 1, torch.float64, False, "contiguous"),
            (5, 7, 2, torch.bfloat16, True, "contiguous"),
            (5, 7, 1, torch.float16, True, "transposed"),
            (8, 1, 2, torch.float32, True, "contiguous")]):
        p = make_problem(seed, N, K, G, dtype, use_group=use_group, ignore_frac=0.3, layout=layout)
        samples.append(pytest.param(p, id=f"N{N}-K{K}-G{G}-{str(dtype)[6:]}-{'group' if use_group else 'nogroup'}-{layout}"))
    return samples


def _means(p):
    """The `mean` flags to opcheck: not a mean of no rows (NaN, which opcheck's
    comparisons do not accept)."""
    return (False, True) if (p.target != p.ignore_index).any() else (False,)


def _opcheck_public_ops(p, requires_grad=True):
    def leaf(t):
        return t.detach().clone().requires_grad_(requires_grad)

    z, W, S, L = [leaf(x) for x in (p.logits, *p.tables())]
    args = (z, p.target, p.group, W, S, L)
    torch.library.opcheck(OPS.parametric_ce, (*args, p.ignore_index))
    for mean in _means(p):
        torch.library.opcheck(OPS.parametric_ce_reduced, (*args, p.ignore_index, mean))
    _, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    upstream = leaf(cotangents(p)[0])
    for table_grads in (True, False):
        torch.library.opcheck(OPS.parametric_ce_backward, (upstream, *args, lse, p.ignore_index, table_grads))
    plain = (cotangents(p)[0], *p.args(), lse)
    for present in [(True,) * 4, (True, False, False, False), (False, True, True, False), (False,) * 4]:
        cot = cotangents(p, present)[1:]
        # no requires_grad here: a third derivative is deliberately unsupported
        torch.library.opcheck(OPS.parametric_ce_double_backward, (*plain, *cot, p.ignore_index, True))


@pytest.mark.parametrize("p", _opcheck_samples())
def test_opcheck(p):
    _opcheck_public_ops(p)
    if p.dtype in (torch.float32, torch.float64):
        torch.library.opcheck(OPS._parametric_ce_with_residual, (*p.args(), p.ignore_index))
        _, lse, residual = OPS._parametric_ce_with_residual(*p.args(), p.ignore_index)
        for table_grads in (True, False):
            torch.library.opcheck(OPS._parametric_ce_backward_from_residual_,
                                  (cotangents(p)[0], *p.args(), lse, residual, p.ignore_index, table_grads))
            for mean in _means(p):
                torch.library.opcheck(OPS._parametric_ce_reduced_with_gradient,
                                      (*p.args(), p.ignore_index, mean, table_grads))


def _ops_run_by(fn):
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.function_events if e.name.startswith("autobalance::")}


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_backward_uses_what_the_forward_kept_unless_differentiated_again(dtype, reduction):
    """CPU float32/float64: per-row losses keep the residual for the backward; a
    sum or mean computes its gradients in the forward and its backward runs no
    kernel. create_graph=True recomputes through the differentiable ops."""
    p = make_problem(21, 30, 12, 2, dtype, ignore_frac=0.2)
    z = p.logits.detach().clone().requires_grad_()
    S = p.scale.detach().clone().requires_grad_()

    def loss():
        out = pce(z, p.target, p.weight, S, p.shift, p.group, ignore_index=p.ignore_index, reduction=reduction)
        return out.sum() if reduction == "none" else out

    def twice():
        dz, = torch.autograd.grad(loss(), z, create_graph=True)
        torch.autograd.grad((dz * dz).sum(), S)

    fast = dtype != torch.bfloat16  # float32/float64 on the CPU
    kept = {"none": "autobalance::_parametric_ce_with_residual",
            "mean": "autobalance::_parametric_ce_reduced_with_gradient"}[reduction]
    ran = _ops_run_by(lambda: loss().backward())
    assert (kept in ran) == fast, ran
    assert ("autobalance::_parametric_ce_backward_from_residual_" in ran) == (fast and reduction == "none"), ran
    assert ("autobalance::parametric_ce_backward" in ran) != fast, ran
    ran = _ops_run_by(twice)
    assert {"autobalance::parametric_ce_backward", "autobalance::parametric_ce_double_backward"} <= ran, ran
    assert "autobalance::_parametric_ce_backward_from_residual_" not in ran, ran
    big = make_problem(22, 1100, 1000, 1, dtype, ignore_frac=0.0)  # over 2^20 logits
    zb = big.logits.detach().clone().requires_grad_()
    ran = _ops_run_by(lambda: pce(zb, big.target, big.weight, big.scale, big.shift, reduction=reduction).sum()
                      .backward())
    if reduction == "none":  # reading a residual back would cost more than recomputing
        assert "autobalance::parametric_ce_backward" in ran and kept not in ran
    else:  # the whole gradient is made in the forward at any size
        assert (kept in ran) == fast, ran
    with torch.no_grad():  # nothing needs a gradient: nothing is kept
        assert kept not in _ops_run_by(loss)


@pytest.mark.parametrize("upstream", [1.0, 0.5])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backward_with_retain_graph(dtype, reduction, upstream):
    """The CPU backward writes its results over what the forward kept (the
    residual, or the gradients of a sum or mean), which must survive a backward
    with retain_graph=True for the next one."""
    p = make_problem(23, 40, 17, 2, dtype, ignore_frac=0.2)
    leaves = [t.detach().clone().requires_grad_() for t in (p.logits, p.weight, p.scale, p.shift)]

    def loss():
        z, W, S, L = leaves
        out = pce(z, p.target, W, S, L, p.group, ignore_index=p.ignore_index, reduction=reduction)
        return upstream * (out.sum() if reduction == "none" else out)

    expected = torch.autograd.grad(loss(), leaves)
    kept = loss()
    first = torch.autograd.grad(kept, leaves, retain_graph=True)
    second = torch.autograd.grad(kept, leaves)
    for name, e, a, b in zip("zWSL", expected, first, second):
        assert torch.equal(a, e) and torch.equal(b, e), f"grad of {name} changed across retained backwards"


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_backward_of_a_sum_or_mean_hands_over_what_the_forward_made(reduction):
    """With an incoming gradient of 1 the backward runs no op at all: the leaves'
    gradients are the forward's buffers (no copy by AccumulateGrad, which copies
    a gradient still referenced elsewhere), and a create_graph backward on a
    retained graph still recomputes the right derivatives."""
    p = make_problem(25, 33, 14, 2, torch.float32, ignore_frac=0.2)
    leaves = [t.detach().clone().requires_grad_() for t in (p.logits, p.weight, p.scale, p.shift)]
    out = pce(leaves[0], p.target, *leaves[1:], p.group, ignore_index=p.ignore_index, reduction=reduction)
    with torch.autograd.profiler.profile() as prof:
        out.backward()
    ran = {e.name for e in prof.function_events if e.name.startswith("aten::")}
    # the engine's seed gradient (ones_like) and AccumulateGrad's detach only
    assert ran <= {"aten::ones_like", "aten::empty_like", "aten::empty_strided", "aten::fill_",
                   "aten::detach"}, ran
    expected = torch.autograd.grad(pce(*[t.detach().requires_grad_() for t in leaves[:1]], p.target,
                                       *leaves[1:], p.group, ignore_index=p.ignore_index,
                                       reduction=reduction), leaves[1:])
    for leaf, e in zip(leaves[1:], expected):
        assert torch.equal(leaf.grad, e)
    out = pce(leaves[0], p.target, *leaves[1:], p.group, ignore_index=p.ignore_index, reduction=reduction)
    first = torch.autograd.grad(out, leaves, retain_graph=True)
    again = torch.autograd.grad(out, leaves, create_graph=True)
    for a, b in zip(first, again):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert again[0].requires_grad


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_exponentials_far_below_the_row_max(reduction):
    """The CPU kernels' float32 exponential underflows cleanly: logits 0 to 200
    below their row's max (across ln(FLT_MIN) = -87.3, where exp leaves the normal
    range) and -inf give the float64 loss and gradients to float32 accuracy, never
    NaN, and a -inf logit gets exactly zero gradient."""
    gaps = torch.tensor([0.0, -1.0, -20.0, -86.8, -87.0, -87.2, -87.4, -88.0, -95.0, -103.0,
                         -104.0, -110.0, -200.0, float("-inf")])
    rows = torch.stack([gaps.roll(j) for j in range(len(gaps))]) + torch.linspace(-3, 3, len(gaps))[:, None]
    target = rows.argmax(1)
    K = len(gaps)
    tables = [torch.full((1, K), 1.0), torch.full((1, K), 1.0), torch.zeros(1, K)]
    results = {}
    for dtype in (torch.float32, torch.float64):
        z = rows.to(dtype).detach().clone().requires_grad_()
        loss = pce(z, target, *[t.to(acc_dtype(dtype)) for t in tables],
                                                    reduction=reduction)
        (loss.sum() if reduction == "none" else loss).backward()
        results[dtype] = (loss.detach(), z.grad)
    for got, want in zip(results[torch.float32], results[torch.float64]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert torch.equal(results[torch.float32][1][rows == float("-inf")], torch.zeros(len(gaps)))


def test_residual_backward_into_a_strided_residual():
    p = make_problem(24, 9, 6, 1, torch.float64, ignore_frac=0.2)
    upstream = cotangents(p)[0]
    _, lse, residual = OPS._parametric_ce_with_residual(*p.args(), p.ignore_index)
    expected = _from_residual(upstream, *p.args(), lse, residual, p.ignore_index, True)
    strided = residual.t().contiguous().t()
    tables = OPS._parametric_ce_backward_from_residual_(upstream, *p.args(), lse, strided, p.ignore_index, True)
    assert not strided.is_contiguous()
    for e, a in zip(expected, (strided, *tables)):
        assert torch.equal(e, a)


def test_opcheck_transposed_tables():
    """Tables are documented as [G, K] tensors of any layout; the fake kernels must
    report the strides the CPU kernels produce (else torch.compile asserts)."""
    p = make_problem(4, 6, 5, 2, torch.float32, ignore_frac=0.3, table_layout="transposed")
    assert not p.weight.is_contiguous()
    _opcheck_public_ops(p)


# ------------------------------------------------------ torch.compile

class _Model(torch.nn.Module):
    def __init__(self, counts, **loss_kwargs):
        super().__init__()
        self.linear = torch.nn.Linear(8, counts.shape[-1])
        self.loss = autobalance.ParametricCE.from_counts(counts, "group_la", **loss_kwargs)

    def forward(self, x, y, g):
        return self.loss(self.linear(x), y, g)


def _grads_after_backward(model, run, *inputs):
    model.zero_grad()
    loss = run(*inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss_kwargs", [{}, dict(group_params=False, clusters=2, learn=("weight", "scale", "shift"))],
                         ids=["per-group", "shared-clustered"])
def test_torch_compile_fullgraph_matches_eager(loss_kwargs):
    torch.manual_seed(0)
    counts = torch.tensor([[50, 20, 10, 5, 3, 1], [5, 5, 9, 9, 3, 3]])
    model = _Model(counts, **loss_kwargs)
    with torch.no_grad():  # move off the initial point so every gradient is generic
        for param in model.loss.parameters():
            param.normal_(0, 0.3)
    x, y, g = torch.randn(32, 8), torch.randint(0, 6, (32,)), torch.randint(0, 2, (32,))
    y[3] = -100
    eager_loss, eager_grads = _grads_after_backward(model, model, x, y, g)
    compiled = torch.compile(model, fullgraph=True)
    comp_loss, comp_grads = _grads_after_backward(model, compiled, x, y, g)
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert set(comp_grads) == set(eager_grads) and len(eager_grads) == 2 + len(list(model.loss.parameters()))
    for name in eager_grads:
        assert eager_grads[name].abs().sum() > 0, name
        torch.testing.assert_close(comp_grads[name], eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_torch_compile_with_transposed_table():
    K, G, N = 6, 2, 16
    gen = torch.Generator().manual_seed(0)
    weight_kg = torch.nn.Parameter(torch.rand(K, G, generator=gen) + 0.5)
    scale, shift = torch.rand(G, K, generator=gen) + 0.5, torch.randn(G, K, generator=gen)
    z = torch.randn(N, K, generator=gen, requires_grad=True)
    y, g = torch.randint(0, K, (N,), generator=gen), torch.randint(0, G, (N,), generator=gen)

    def f(z, weight_kg):
        return pce(z, y, weight_kg.t(), scale, shift, g, reduction="sum")

    expected = torch.autograd.grad(f(z, weight_kg), (z, weight_kg))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(z, weight_kg), (z, weight_kg))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


# -------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_across_runs_and_thread_counts(dtype, restore_threads):
    p = make_problem(7, 3000, 37, 3, dtype, ignore_frac=0.1)
    upstream, uz, uw, us, ul = cotangents(p)

    def run():
        loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
        first = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True)
        second = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, True)
        if dtype not in (torch.float32, torch.float64):
            return (loss, lse, *first, *second)
        _, _, residual = OPS._parametric_ce_with_residual(*p.args(), p.ignore_index)
        from_residual = _from_residual(upstream, *p.args(), lse, residual,
                                                                  p.ignore_index, True)
        with_gradient = [t for mean in (False, True)
                         for t in OPS._parametric_ce_reduced_with_gradient(*p.args(), p.ignore_index, mean, True)]
        return (loss, lse, *first, *second, residual, *from_residual, *with_gradient)

    torch.set_num_threads(2)
    a, b = run(), run()
    torch.set_num_threads(1)
    c = run()
    names = ["loss", "lse", "dz", "dW", "dS", "dL", "dd_gamma", "dd_z", "dd_W", "dd_S", "dd_L",
             "residual", "r_dz", "r_dW", "r_dS", "r_dL", *[f"{r}_{t}" for r in ("sum", "mean")
                                                     for t in ("loss", "lse", "counts", "dz", "dW", "dS", "dL")]]
    for name, x, y, w in zip(names, a, b, c):
        assert torch.equal(x, y), f"{name} differs between two runs"
        assert torch.equal(x, w), f"{name} differs between 2 threads and 1 thread"
    assert a[3].abs().sum() > 0 and a[9].abs().sum() > 0


def test_cpu_kernels_run_on_every_thread(restore_threads):
    # at::parallel_for compiles to a no-op pragma without -fopenmp: the
    # kernels would run on one thread whatever torch.set_num_threads says.
    if not torch.backends.openmp.is_available():
        pytest.skip("this torch build does not use OpenMP")
    torch.set_num_threads(2)
    assert OPS._parallel_threads(4096, 100) == 2
    assert OPS._parallel_threads(1, 100) == 1  # one row is one chunk
    torch.set_num_threads(1)
    assert OPS._parallel_threads(4096, 100) == 1


def test_table_gradients_through_autograd_are_deterministic():
    p = make_problem(8, 3000, 21, 2, torch.float32, ignore_frac=0.1)
    results = []
    for _ in range(2):
        z, W, S, L = [x.detach().clone().requires_grad_() for x in (p.logits, *p.tables())]
        loss = pce(z, p.target, W, S, L, p.group, ignore_index=p.ignore_index)
        gz, gS = torch.autograd.grad(loss, (z, S), create_graph=True)
        hz, hW, hS, hL = torch.autograd.grad((gz * gz.detach()).sum(), (z, W, S, L))
        results.append((gz, gS, hz, hW, hS, hL))
    for x, y in zip(*results):
        assert torch.equal(x, y)


def _reduced_loss_and_derivatives(p, reduction, create_graph):
    """The fused reduced loss, its gradients w.r.t. logits and the three tables
    and, with create_graph, the gradients of a random combination of those
    (double backward; W's goes through the mean's denominator)."""
    z, W, S, L = [t.detach().clone().requires_grad_() for t in (p.logits, *p.tables())]
    loss = pce(z, p.target, W, S, L, p.group, reduction=reduction, ignore_index=p.ignore_index)
    grads = torch.autograd.grad(loss, (z, W, S, L), create_graph=create_graph)
    out = [loss, *grads]
    if create_graph:
        _, uz, uw, us, _ = cotangents(p)
        q = (grads[0] * uz).sum() + (grads[1] * uw).sum() + (grads[2] * us).sum()
        out += torch.autograd.grad(q, (z, W, S, L))
    return [t.detach() for t in out]


@pytest.mark.parametrize("rows, classes", [(100_000, 37), (1_000_000, 16)], ids=["1e5", "1e6"])
def test_reductions_bit_identical_for_any_thread_count_at_large_n(rows, classes, restore_threads):
    """Above 32768 rows ATen splits a plain sum across threads; the fused
    sum/mean (and, with create_graph, the broadcast of the mean's upstream
    gradient, whose backward is a sum over the rows) use fixed blocks instead.
    (1e6 rows take ~5 s on two cores.)"""
    cases = [(torch.float32, "mean", False), (torch.bfloat16, "mean", True)]
    if rows < 1_000_000:
        cases += [(torch.float32, "sum", True), (torch.float64, "mean", True), (torch.float16, "mean", False)]
    for dtype, reduction, create_graph in cases:
        p = make_problem(1, rows, classes, 3, dtype, ignore_frac=0.1)
        results = {}
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results[threads] = _reduced_loss_and_derivatives(p, reduction, create_graph)
        names = ["loss", "dz", "dW", "dS", "dL", "hz", "hW", "hS", "hL"]
        for threads in (2, 4):
            for name, a, b in zip(names, results[1], results[threads]):
                assert torch.equal(a, b), f"{dtype} {reduction} create_graph={create_graph}: {name} differs " \
                                          f"between 1 and {threads} threads"
        assert all(torch.isfinite(t).all() and t.abs().sum() > 0 for t in results[1])


def test_table_gradient_scratch_is_bounded():
    """The per-block partial tables take at most 32 MiB (64 blocks while they
    fit), whatever G K, and depend on the shape and dtype only."""
    mib = 2**20
    for rows, groups, classes, float64 in ((1024, 64, 8192, False), (1 << 20, 64, 8192, True),
                                           (4096, 1, 100, False), (100, 300, 1000, False)):
        scratch = OPS._table_grad_scratch(rows, groups, classes, float64)
        one_block = 3 * groups * classes * (8 if float64 else 4)
        assert scratch % one_block == 0 and scratch >= one_block
        assert scratch <= max(32 * mib, one_block), (rows, groups, classes, scratch / mib)
    assert OPS._table_grad_scratch(4096, 1, 100, False) == 64 * 3 * 100 * 4  # small tables: 64 blocks
    assert OPS._table_grad_scratch(1024, 64, 8192, False) == 5 * 3 * 64 * 8192 * 4
    assert OPS._table_grad_scratch(8, 64, 8192, False) == 3 * 64 * 8192 * 4  # < 16 rows: one block


def test_table_gradient_peak_memory_is_bounded():
    """Peak resident memory of a 1024 x 8192 problem with 64 groups, measured
    in a fresh process: the loss, its gradients and the table gradients need
    the logits' 32 MiB twice (logits and their gradient) plus at most 32 MiB of
    partial tables; with 64 partial tables it rose by 424 MB."""
    code = textwrap.dedent("""
        import resource, torch, autobalance
        torch.set_num_threads(2)
        N, K, G = 1024, 8192, 64
        z = torch.randn(N, K, requires_grad=True)
        y, g = torch.randint(0, K, (N,)), torch.randint(0, G, (N,))
        W, S, L = [torch.rand(G, K).add_(0.5).requires_grad_() for _ in range(3)]
        pce = autobalance.parametric_cross_entropy
        pce(z[:8], y[:8], W, scale=S, shift=L, group=g[:8]).backward()  # warm up
        z.grad = W.grad = S.grad = L.grad = None
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        pce(z, y, W, scale=S, shift=L, group=g).backward()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rise_mib = float(proc.stdout.split()[-1])
    assert rise_mib < 32 * 2 + 32 + 32, f"peak RSS rose by {rise_mib:.0f} MiB"


# -------------------------------------------------------- edge cases

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_ignored_mean_agrees_across_backends(dtype):
    """A mean over no rows is 0/0 = NaN, as in F.cross_entropy, whose logit
    gradient is then 0: ignored rows contribute nothing, even with the mean's
    infinite 1/D. So both backends give dz = dS = dL = 0 and dW = NaN (through
    the denominator), and the same again one derivative up: the derivatives of
    each first derivative w.r.t. z, S, L (Hessian-vector product, mixed
    derivatives) are 0, w.r.t. W NaN (docs/math.md section 1)."""
    p = make_problem(2, 6, 5, 2, dtype, ignore_frac=1.0)
    assert bool((p.target == p.ignore_index).all())
    results = {}
    for backend in ("fused", "reference"):
        z, W, S, L = [t.detach().clone().requires_grad_() for t in (p.logits, *p.tables())]
        loss = pce(z, p.target, W, S, L, p.group, ignore_index=p.ignore_index, backend=backend)
        first = torch.autograd.grad(loss, (z, W, S, L), create_graph=True)
        second = []
        for i, grad in enumerate(first):  # the derivatives of <U, grad> for each first derivative
            u = torch.randn(grad.shape, generator=p.generator(i), dtype=torch.float64).to(grad.dtype)
            second += torch.autograd.grad((grad * u).sum(), (z, W, S, L), retain_graph=True, allow_unused=True,
                                          materialize_grads=True)
        results[backend] = [loss, *first, *second]
        assert torch.isnan(loss)
        dz, dW, dS, dL = first
        assert_all_zero(dz, f"{backend} dz")
        assert_all_zero(dS, f"{backend} dS")
        assert_all_zero(dL, f"{backend} dL")
        assert torch.isnan(dW).all()
        for i, name in enumerate(("dz", "dW", "dS", "dL")):
            hz, hW, hS, hL = second[4 * i:4 * i + 4]
            for wrt, t in (("z", hz), ("S", hS), ("L", hL)):
                assert_all_zero(t, f"{backend}: d<U, {name}>/d{wrt}")
            assert torch.isnan(hW).all(), f"{backend}: d<U, {name}>/dW"
    for i, (a, b) in enumerate(zip(results["fused"], results["reference"])):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"output {i}")
    logits = p.logits.float().requires_grad_()
    ce = F.cross_entropy(logits, p.target, ignore_index=p.ignore_index)
    assert torch.isnan(ce)
    assert_all_zero(torch.autograd.grad(ce, logits)[0], "F.cross_entropy's logit gradient")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_batch(dtype):
    p = make_problem(0, 0, 5, 2, dtype)
    loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    assert loss.shape == (0,) and lse.shape == (0,) and loss.dtype == p.acc
    upstream, uz, uw, us, ul = cotangents(p)
    dz, dW, dS, dL = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True)
    assert dz.shape == (0, 5) and dz.dtype == dtype
    for t in (dW, dS, dL):
        assert t.shape == (2, 5)
        assert_all_zero(t, "table gradient of an empty batch")
    out = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, True)
    assert out[0].shape == (0,) and out[1].shape == (0, 5)
    for t in out[2:]:
        assert_all_zero(t, "double-backward table gradient of an empty batch")
    for backend in ("fused", "reference"):
        args = (*p.args()[:2], *p.tables(), p.group)
        assert pce(*args, reduction="none", backend=backend).shape == (0,)
        assert pce(*args, reduction="sum", backend=backend).item() == 0.0
        # the weighted mean over no rows is 0/0, as in F.cross_entropy
        assert torch.isnan(pce(*args, reduction="mean", backend=backend))
    assert torch.isnan(F.cross_entropy(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_single_class(dtype):
    p = make_problem(1, 50, 1, 2, dtype, ignore_frac=0.2)
    loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    assert_all_zero(loss, "K = 1 loss")  # lse == a_y exactly
    valid = ~_ignored(p)
    sz, l0 = p.scale[p.group, 0] * p.logits[:, 0].to(p.acc), p.shift[p.group, 0]
    err = (lse - (sz + l0)).abs()[valid]  # lse is a_y itself, up to the rounding of S z + L
    assert (err <= 2 * torch.finfo(p.acc).eps * (sz.abs() + l0.abs())[valid]).all()
    upstream, uz, uw, us, ul = cotangents(p)
    got = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True)
    ref = reference.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True)
    for a_, b_ in zip(got, ref):
        torch.testing.assert_close(a_, b_, rtol=0, atol=1e-5)
        assert a_.abs().max() <= 1e-5  # every first derivative vanishes for K = 1 (they are O(1) otherwise)
    got = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, True)
    ref = reference.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index, True)
    for a_, b_ in zip(got, ref):
        torch.testing.assert_close(a_, b_, rtol=1e-5, atol=1e-5)


def _cross_entropy_case(seed=0, N=40, K=7, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, K, generator=gen, dtype=torch.float64) * 2
    y = torch.randint(0, K, (N,), generator=gen)
    y[::5] = ignore_index
    w = 0.1 + 2.9 * torch.rand(K, generator=gen, dtype=torch.float64)
    return z, y, w


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_identity_tables_reproduce_cross_entropy(reduction, ignore_index, backend):
    z0, y, w0 = _cross_entropy_case(ignore_index=ignore_index)
    K = z0.shape[1]
    # PyTorch's weighted cross-entropy; nll_loss is not differentiable in `weight`,
    # so its weight gradient comes from the same expression written with log_softmax.
    z_ref = z0.clone().requires_grad_()
    expected = F.cross_entropy(z_ref, y, weight=w0, ignore_index=ignore_index, reduction=reduction)
    w_ref = w0.clone().requires_grad_()
    valid = y != ignore_index
    yv = y.masked_fill(~valid, 0)
    sw = torch.where(valid, w_ref[yv], 0)
    per_row = -sw * torch.log_softmax(z0, 1).gather(1, yv[:, None]).squeeze(1)
    manual = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / sw.sum()}[reduction]
    torch.testing.assert_close(manual, expected.detach(), rtol=1e-13, atol=1e-14)

    z = z0.clone().requires_grad_()
    W = w0[None].clone().requires_grad_()
    loss = pce(z, y, W, torch.ones(1, K, dtype=torch.float64), torch.zeros(1, K, dtype=torch.float64),
               reduction=reduction, ignore_index=ignore_index, backend=backend)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-13)
    cot = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gz, gW = torch.autograd.grad(loss, (z, W), cot)
    ez, = torch.autograd.grad(expected, z_ref, cot)
    ew, = torch.autograd.grad(manual, w_ref, cot)
    torch.testing.assert_close(gz, ez, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gW[0], ew, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_non_finite_logits_poison_only_their_row(dtype, poison):
    p = make_problem(9, 12, 40, 1, dtype, ignore_frac=0.0, use_group=False)
    bad = poisoned_logits(p, 4, poison)
    upstream = cotangents(p)[0]
    clean_loss, lse, others = check_poison_stays_in_its_row(p, bad, upstream, 4, poison)
    if poison == "nan":
        # documented: "NaN ... logits give a NaN loss (and gradients) on their own rows only"
        ref_dz = reference.parametric_ce_backward(upstream, bad, *p.args()[1:], lse, p.ignore_index, False)[0]
        assert torch.isnan(ref_dz[4]).all()
    if dtype in (torch.float32, torch.float64):  # the residual path: the same rows poisoned
        _, _, clean_r = OPS._parametric_ce_with_residual(*p.args(), p.ignore_index)
        r_loss, _, residual = OPS._parametric_ce_with_residual(bad, *p.args()[1:], p.ignore_index)
        assert torch.equal(r_loss[others], clean_loss[others]) and torch.equal(residual[others], clean_r[others])
        assert torch.isnan(residual[4]).all(), f"residual of the poisoned row: {residual[4]}"
        dz = _from_residual(upstream, bad, *p.args()[1:], lse, residual, p.ignore_index,
                                                       True)[0]
        assert torch.isnan(dz[4]).all() and torch.isfinite(dz[others]).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_extreme_logits_stay_finite_and_exact(dtype):
    (upstream, z, y, W, S, L, lse), grads = check_extreme_logits(dtype)
    eps = torch.finfo(acc_dtype(dtype)).eps
    ref = reference.parametric_ce_backward(upstream, z, y, None, W, S, L, lse, -100, True)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e4 * 8 * eps + 2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("layout", ["transposed", "strided", "rows"])
def test_non_contiguous_logits_give_identical_results(layout):
    base = make_problem(12, 33, 19, 2, torch.float32, ignore_frac=0.2)
    odd = make_problem(12, 33, 19, 2, torch.float32, ignore_frac=0.2, layout=layout)
    assert not odd.logits.is_contiguous() and torch.equal(odd.logits, base.logits)
    a = OPS.parametric_ce(*base.args(), base.ignore_index)
    b = OPS.parametric_ce(*odd.args(), odd.ignore_index)
    upstream, uz, uw, us, ul = cotangents(base)
    a += OPS.parametric_ce_backward(upstream, *base.args(), a[1], base.ignore_index, True)
    b += OPS.parametric_ce_backward(upstream, *odd.args(), b[1], odd.ignore_index, True)
    a += OPS.parametric_ce_double_backward(upstream, *base.args(), a[1], uz, uw, us, ul, base.ignore_index, True)
    uz_t = uz.t().contiguous().t()
    b += OPS.parametric_ce_double_backward(upstream, *odd.args(), b[1], uz_t, uw, us, ul, odd.ignore_index, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_ignore_index_equal_to_a_class_ignores_those_rows():
    p = make_problem(13, 30, 6, 1, torch.float64, ignore_index=2, ignore_frac=0.0)
    assert (p.target == 2).any() and (p.target != 2).any()
    loss, _ = OPS.parametric_ce(*p.args(), 2)
    assert_all_zero(loss[p.target == 2], "rows labelled ignore_index")
    full, _ = OPS.parametric_ce(*p.args(), -100)
    assert torch.equal(loss[p.target != 2], full[p.target != 2])
    assert (full[p.target == 2] > 0).all()
    mean = pce(p.logits, p.target, *p.tables(), ignore_index=2)
    keep = p.target != 2
    torch.testing.assert_close(mean, full[keep].sum() / p.weight[0, p.target[keep]].sum(), rtol=1e-12, atol=0)


def test_backward_is_linear_in_grad_loss():
    """upstream enters every first derivative linearly (docs/math.md section 3)."""
    p = make_problem(14, 25, 9, 2, torch.float64, ignore_frac=0.2)
    _, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    g1 = cotangents(p, salt=1)[0]
    g2 = cotangents(p, salt=2)[0]
    a = OPS.parametric_ce_backward(g1, *p.args(), lse, p.ignore_index, True)
    b = OPS.parametric_ce_backward(g2, *p.args(), lse, p.ignore_index, True)
    c = OPS.parametric_ce_backward(2 * g1 - g2, *p.args(), lse, p.ignore_index, True)
    for x, y, w in zip(a, b, c):
        torch.testing.assert_close(w, 2 * x - y, rtol=1e-12, atol=1e-12)


def test_residual_ops_refuse_bad_arguments():
    p = make_problem(3, 6, 5, 1, torch.float32, ignore_frac=0.0)
    _, lse, residual = OPS._parametric_ce_with_residual(*p.args(), p.ignore_index)
    upstream = cotangents(p)[0]
    with pytest.raises(ValueError, match="`residual` must have the shape and dtype of logits"):
        _from_residual(upstream, *p.args(), lse, residual[:, :4], p.ignore_index, True)
    with pytest.raises(ValueError, match="`residual` must have the shape and dtype of logits"):
        _from_residual(upstream, *p.args(), lse, residual.double(), p.ignore_index, True)
    half = make_problem(3, 6, 5, 1, torch.bfloat16, ignore_frac=0.0)
    with pytest.raises(TypeError, match="float32 or float64 `logits`, got torch.bfloat16"):
        OPS._parametric_ce_with_residual(*half.args(), half.ignore_index)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 129])
def test_every_row_tail_against_reference(K, dtype):
    """Row lengths around the vector widths (8 or 16 float32 lanes, 4 or 8
    float64 lanes): full chunks, a last chunk that overlaps the one before, and
    rows shorter than one vector."""
    p = make_problem(K, 37, K, 2, dtype, ignore_frac=0.1)
    upstream = cotangents(p)[0]
    loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    ref_loss, ref_lse = reference.parametric_ce(*p.args(), p.ignore_index)
    o = Oracle(p, upstream)
    assert_within(loss, ref_loss, tolerance(o.mag_loss, p.dtype), f"loss K={K}")
    ref = reference.parametric_ce_backward(upstream, *p.args(), ref_lse, p.ignore_index, True)
    outs = [OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True)]
    if dtype in (torch.float32, torch.float64):
        _, _, residual = OPS._parametric_ce_with_residual(*p.args(), p.ignore_index)
        outs.append(_from_residual(upstream, *p.args(), lse, residual, p.ignore_index,
                                                              True))
    for got in outs:
        assert_within(got[0], ref[0], tolerance(o.mag_dz, p.dtype, p.dtype, ref[0]), f"grad_logits K={K}")
        _check_table_outputs(got[1:], ref[1:], (o.mag_dW, o.mag_dS, o.mag_dL), p, True, f"K={K}")
    if dtype in (torch.float32, torch.float64):  # the reduced forward that makes its gradients
        _check_reduced_with_gradient(p)


def _check_reduced_with_gradient(p):
    """_parametric_ce_reduced_with_gradient against the reference's autograd."""
    valid = p.target != p.ignore_index
    cells = (p.target if p.group is None else p.group * p.K + p.target)[valid]
    counts = torch.bincount(cells, minlength=p.G * p.K).to(p.acc)
    for mean, table_grads in itertools.product((False, True), (True, False)):
        leaves = [t.detach().clone().requires_grad_() for t in (p.logits, *p.tables())]
        ref = pce(leaves[0], p.target, *leaves[1:], p.group, ignore_index=p.ignore_index,
                  reduction="mean" if mean else "sum", backend="reference")
        ref_grads = torch.autograd.grad(ref, leaves)
        got = OPS._parametric_ce_reduced_with_gradient(*p.args(), p.ignore_index, mean, table_grads)
        assert torch.equal(got[2], counts), "cell counts"
        what = f"reduced_with_gradient mean={mean} table_grads={table_grads} {p}"
        loss, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
        assert torch.equal(got[0], loss) and torch.equal(got[1], lse), "loss and lse"
        for name, g, r in zip(("dz", "dW", "dS", "dL"), got[3:], ref_grads):
            if name in ("dW", "dS", "dL") and not table_grads:
                assert_all_zero(g, f"{what}: {name}")
                continue
            _assert_close_to_reference(g, r, p, f"{what}: {name}")
