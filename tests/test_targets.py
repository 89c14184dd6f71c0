"""Target distributions at op level (docs/math.md section 8, /work/tools/spec15.md):
class-index targets with label smoothing and probability targets [N, K]
(normalised or not), through the four public ops, against the plain-PyTorch
reference, against an independent few-line definition (so the reference is
checked too), against F.cross_entropy with identity tables; gradcheck,
opcheck, determinism and bad arguments."""
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (OPS, Problem, acc_dtype, assert_all_zero, assert_within, cotangents, examples, make_problem,
                      random_problem, reference, tolerance)

FORMS = ("index", "prob", "unnormalised")
PRESENT = list(itertools.product([False, True], repeat=4))


# ------------------------------------------------------------ problems

def with_target(p: Problem, form: str, eps: float, rnd: random.Random) -> Problem:
    """``p`` with its target in ``form``: "index" keeps the class indices (and their
    ignored rows), "prob" a probability target (rows on the simplex, some one-hot,
    some with zeros), "unnormalised" any values (negative ones, rows not summing to 1)."""
    p.desc = dict(p.desc, form=form, eps=eps)
    p.eps = eps
    if form == "index":
        return p
    gen = p.generator(17)
    N, K = p.N, p.K
    if form == "prob":
        P = torch.softmax(torch.randn(N, K, generator=gen, dtype=torch.float64) * rnd.choice([0.5, 3.0]), 1)
        if N:
            P[0] = 0.0
            P[0, rnd.randrange(K)] = 1.0  # a one-hot row
        if N > 1 and K > 1:
            P[1, : K // 2] = 0.0           # exact zeros, then renormalised
            P[1] = P[1] / P[1].sum()
    else:
        P = torch.randn(N, K, generator=gen, dtype=torch.float64) * 1.5 + rnd.choice([0.0, 0.5])
    p.target = P.to(p.dtype)
    return p


def target_problems(forms=FORMS, eps_choices=(0.0, 0.1, 0.37, 1.0), **kwargs):
    """Hypothesis strategy of (problem, form, ε): random_problem's shapes, tables,
    groups, ignored rows, layouts and odd logits, with the target in one of ``forms``."""
    def build(seed):
        rnd = random.Random(seed)
        p = random_problem(rnd, **kwargs)
        form = rnd.choice(forms)
        eps = rnd.choice(eps_choices + ("random",))
        eps = rnd.random() if eps == "random" else eps
        return with_target(p, form, eps, rnd)
    return st.integers(0, 2**32 - 1).map(build)


SMALL = dict(max_n=90, big_k=False, layouts=("contiguous", "transposed"))


def _probs(p):
    return p.target.is_floating_point()


def _ignored(p):
    if _probs(p):
        return torch.zeros(p.N, dtype=torch.bool)
    return p.target == p.ignore_index


# ---------------------------------------------- the definition, independently

def definition_q(target, K, ignore_index, eps, dtype=torch.float64):
    """The target distribution q [N, K] of docs/math.md section 8 (zero rows for ignored targets)."""
    if target.is_floating_point():
        return (1 - eps) * target.to(dtype) + eps / K
    valid = target != ignore_index
    onehot = F.one_hot(target.clamp(0, K - 1) * valid, K).to(dtype)
    return ((1 - eps) * onehot + eps / K) * valid[:, None].to(dtype)


def definition_loss(z, q, group, W, S, L):
    """Per-row loss sum_k q_k W[g,k] (-log_softmax(a))_k and logsumexp(a), a = S[g] z + L[g]."""
    g = torch.zeros(z.shape[0], dtype=torch.long) if group is None else group
    a = S[g] * z + L[g]
    return -(q * W[g] * torch.log_softmax(a, 1)).sum(1), torch.logsumexp(a, 1)


class Definition:
    """Forward, backward and double backward of ``definition_loss`` by autograd in
    float64 on the problem's exact values, and per-element error magnitudes (as
    conftest.Oracle does for the one-hot case, with q in place of the one-hot)."""

    def __init__(self, p, upstream=None, uz=None, uw=None, us=None, ul=None):
        d = torch.float64
        N, K, G = p.N, p.K, p.G
        self.q = q = definition_q(p.target, K, p.ignore_index, p.eps)
        ignored = _ignored(p)
        z, W, S, L = (t.detach().to(d).requires_grad_() for t in (p.logits, *p.tables()))
        loss, lse = definition_loss(z, q, p.group, W, S, L)
        self.loss = loss.detach()
        self.lse = torch.where(ignored, 0.0, lse.detach())
        g = torch.zeros(N, dtype=torch.long) if p.group is None else p.group
        g = torch.where(ignored, 0, g)
        zd, Sg, Lg, Wg = z.detach(), S.detach()[g], L.detach()[g], W.detach()[g]
        P = torch.softmax(Sg * zd + Lg, 1)
        tiny = torch.finfo(p.acc).tiny / torch.finfo(p.acc).eps
        A = (1.0 + (Sg * zd).abs().amax(1) + Lg.abs().amax(1) + math.log(K)) if N else torch.zeros(0, dtype=d)
        # |q|'s terms, not |q|: (1 - ε) P_k + ε / K cancels for negative P_k, its rounding does not
        qa = definition_q(p.target.abs() if _probs(p) else p.target, K, p.ignore_index, p.eps)
        qW = qa * Wg
        sig = qW.sum(1)
        self.mag_loss = sig * A
        self.mag_lse = torch.where(ignored, 0.0, A)
        if upstream is None:
            return

        def table_sum(rows):
            return torch.zeros(G, K, dtype=d).index_add_(0, g, rows * (~ignored)[:, None].to(d))

        om = upstream.to(d)
        first = torch.autograd.grad(loss, (z, W, S, L), om, create_graph=True)
        self.first = [t.detach() for t in first]
        Pm = (P + tiny) * A[:, None]
        mag_r = om.abs()[:, None] * (sig[:, None] * Pm + qW)
        self.mag_first = [Sg * mag_r, table_sum(om.abs()[:, None] * qa * A[:, None]),
                          table_sum(mag_r * zd.abs()), table_sum(mag_r)]
        us_ = [uz, uw, us, ul]
        if not any(u is not None for u in us_):
            return
        om_leaf = om.detach().requires_grad_()
        first = torch.autograd.grad(definition_loss(z, q, p.group, W, S, L)[0], (z, W, S, L), om_leaf,
                                    create_graph=True)
        Q = sum((u.to(d) * f).sum() for u, f in zip(us_, first) if u is not None)
        self.second = [t.detach() for t in torch.autograd.grad(Q, (om_leaf, z, W, S, L), allow_unused=True,
                                                               materialize_grads=True)]
        zeros = torch.zeros(G, K, dtype=d)
        Uz = torch.zeros(N, K, dtype=d) if uz is None else uz.to(d)
        UW, US, UL = (zeros if u is None else u.to(d) for u in (uw, us, ul))
        vmag = (Sg * Uz).abs() + UL[g].abs() + (US[g] * zd).abs()
        V = vmag.amax(1) if N else torch.zeros(0, dtype=d)
        qUW = qa * UW[g].abs()
        mag_t = om.abs()[:, None] * (sig[:, None] * Pm * (vmag + V[:, None]) + qUW.sum(1)[:, None] * Pm + qUW)
        self.mag_second = [
            (qW * (2 * V * A)[:, None] + qUW * A[:, None]).sum(1),
            Sg * mag_t + US[g].abs() * mag_r,
            table_sum(om.abs()[:, None] * qa * (2 * V * A)[:, None]),
            table_sum(zd.abs() * mag_t + Uz.abs() * mag_r),
            table_sum(mag_t)]


# ------------------------------------------------------------ forward

def _forward(impl, p):
    return impl.parametric_ce(*p.args(), p.ignore_index, p.eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=examples(12))
@given(p=target_problems(dtypes=(torch.float64,), **SMALL))
def test_forward_matches_reference_and_definition(dtype, p):
    p = _cast(p, dtype)
    loss, lse = _forward(OPS, p)
    ref_loss, ref_lse = _forward(reference, p)
    for t in (loss, lse, ref_loss, ref_lse):
        assert t.dtype == p.acc and tuple(t.shape) == (p.N,)
    d = Definition(p)
    assert_within(loss, ref_loss, tolerance(d.mag_loss, p.dtype), f"loss {p}")
    assert_within(lse, ref_lse, tolerance(d.mag_lse, p.dtype), f"lse {p}")
    assert_within(ref_loss, d.loss, tolerance(d.mag_loss, p.dtype), f"reference loss vs definition {p}")
    assert_within(loss, d.loss, tolerance(d.mag_loss, p.dtype), f"fused loss vs definition {p}")
    assert_within(lse, d.lse, tolerance(d.mag_lse, p.dtype), f"lse vs definition {p}")
    assert_all_zero(loss[_ignored(p)], "loss of ignored rows")
    assert_all_zero(lse[_ignored(p)], "lse of ignored rows")


def _cast(p, dtype):
    acc = acc_dtype(dtype)
    target = p.target.to(dtype) if _probs(p) else p.target
    q = Problem(p.logits.to(dtype), target, p.group, *(t.to(acc) for t in p.tables()), p.ignore_index, p.seed,
                dict(p.desc))
    q.eps = p.eps
    return q


# ------------------------------------------------------------ backward

def _backward(impl, p, upstream, table_grads, lse=None):
    if lse is None:
        lse = _forward(impl, p)[1]
    return impl.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, table_grads, p.eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=examples(12))
@given(p=target_problems(dtypes=(torch.float64,), **SMALL), table_grads=st.booleans())
def test_backward_matches_reference_and_definition(dtype, p, table_grads):
    p = _cast(p, dtype)
    upstream = cotangents(p)[0]
    got = _backward(OPS, p, upstream, table_grads)
    ref = _backward(reference, p, upstream, table_grads)
    d = Definition(p, upstream)
    assert got[0].dtype == p.dtype and tuple(got[0].shape) == (p.N, p.K)
    for i, name in enumerate(("grad_logits", "grad_weight", "grad_scale", "grad_shift")):
        out_dtype = p.dtype if i == 0 else p.acc
        assert got[i].dtype == out_dtype and ref[i].dtype == out_dtype, f"{name}: {got[i].dtype}, {ref[i].dtype}"
        if i > 0 and not table_grads:
            assert_all_zero(got[i], f"{name} with table_grads=False")
            assert_all_zero(ref[i], f"reference {name} with table_grads=False")
            continue
        tol = tolerance(d.mag_first[i], p.dtype, out_dtype, d.first[i])
        assert_within(got[i], ref[i], tol, f"backward {name} {p}")
        assert_within(ref[i], d.first[i], tol, f"reference backward {name} vs definition {p}")
    assert_all_zero(got[0][_ignored(p)], "grad_logits of ignored rows")


# ----------------------------------------------------- double backward

@pytest.mark.parametrize("present", PRESENT, ids=lambda m: "".join("zWSL"[i] if x else "-" for i, x in enumerate(m)))
@settings(max_examples=examples(3))
@given(p=target_problems(dtypes=(torch.float64, torch.float32), max_n=60, big_k=False,
                         layouts=("contiguous", "transposed")), table_grads=st.booleans())
def test_double_backward_matches_reference_and_definition(present, p, table_grads):
    upstream, uz, uw, us, ul = cotangents(p, present)
    _, lse = _forward(OPS, p)
    got = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index,
                                            table_grads, p.eps)
    ref = reference.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index,
                                                  table_grads, p.eps)
    assert len(got) == 5
    assert got[0].dtype == p.acc and tuple(got[0].shape) == (p.N,)
    assert got[1].dtype == p.dtype and tuple(got[1].shape) == (p.N, p.K)
    if not any(present):
        for t in got + ref:
            assert_all_zero(t, "double backward without cotangents")
        return
    d = Definition(p, upstream, uz, uw, us, ul)
    names = ("grad_grad_loss", "grad_logits", "grad_weight", "grad_scale", "grad_shift")
    for i, name in enumerate(names):
        if i > 1 and not table_grads:
            assert_all_zero(got[i], f"{name} with table_grads=False")
            assert_all_zero(ref[i], f"reference {name} with table_grads=False")
            continue
        out_dtype = p.dtype if i == 1 else p.acc
        tol = tolerance(d.mag_second[i], p.dtype, out_dtype, d.second[i])
        assert_within(got[i], ref[i], tol, f"double backward {name} {p}")
        assert_within(ref[i], d.second[i], tol, f"reference double backward {name} vs definition {p}")
    assert_all_zero(got[0][_ignored(p)], "grad_grad_loss of ignored rows")
    assert_all_zero(got[1][_ignored(p)], "grad_logits of ignored rows")


# ------------------------------------------------------------ reduced

def _hand_reduction(p, loss, mean, weight=None):
    """sum; mean: / sum_i W[g_i, y_i] over non-ignored rows (class indices), / N (probability target)."""
    weight = p.weight if weight is None else weight
    if not mean:
        return loss.sum()
    if _probs(p):
        return loss.sum() / p.N
    valid = ~_ignored(p)
    g = torch.zeros(p.N, dtype=torch.long) if p.group is None else p.group
    return loss.sum() / weight[g[valid], p.target[valid]].sum()


@settings(max_examples=examples(20))
@given(p=target_problems(dtypes=(torch.float64, torch.float32), kinds=("normal", "wide", "tied"), **SMALL),
       mean=st.booleans())
def test_reduced_op_matches_a_hand_written_reduction(p, mean):
    """(Logits of +-1e4 are left out: their float32 gradients are held to the per-element
    tolerance of test_backward_matches_reference_and_definition, not this test's relative one.)"""
    if mean and (p.N == 0 or bool(_ignored(p).all())):
        mean = False  # a mean of no rows is NaN: tested separately
    got = OPS.parametric_ce_reduced(*p.args(), p.ignore_index, mean, p.eps)
    assert got.dtype == p.acc and got.shape == ()
    loss, _ = _forward(OPS, p)
    torch.testing.assert_close(got, _hand_reduction(p, loss, mean), rtol=1e-12 if p.acc == torch.float64 else 2e-6,
                               atol=0, msg=lambda m: f"{p}: {m}")
    # the same reduction of the reference's losses, and the gradients through autograd
    leaves = [t.detach().clone().requires_grad_() for t in (p.logits, *p.tables())]
    leaves_ref = [t.detach().clone().requires_grad_() for t in (p.logits, *p.tables())]
    target = p.target.detach().clone().requires_grad_() if _probs(p) else p.target
    target_ref = p.target.detach().clone().requires_grad_() if _probs(p) else p.target
    out = OPS.parametric_ce_reduced(leaves[0], target, p.group, *leaves[1:], p.ignore_index, mean, p.eps)
    ref = _hand_reduction(p, reference.parametric_ce(leaves_ref[0], target_ref, p.group, *leaves_ref[1:],
                                                     p.ignore_index, p.eps)[0], mean, leaves_ref[1])
    torch.testing.assert_close(out, ref, rtol=1e-11 if p.acc == torch.float64 else 2e-5, atol=1e-12)
    wrt, wrt_ref = leaves + ([target] if _probs(p) else []), leaves_ref + ([target_ref] if _probs(p) else [])
    got_grads = torch.autograd.grad(out, wrt, allow_unused=True, materialize_grads=True)
    ref_grads = torch.autograd.grad(ref, wrt_ref, allow_unused=True, materialize_grads=True)
    rel = 1e-10 if p.acc == torch.float64 else 2e-4
    for name, a, b in zip(("logits", "weight", "scale", "shift", "target"), got_grads, ref_grads):
        scale = 1.0 + (b.abs().max().item() if b.numel() else 0.0)
        torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale, msg=lambda m: f"d/d{name} {p}: {m}")


def test_mean_of_a_probability_target_divides_by_n_whatever_the_weights():
    p = _small(form="prob", eps=0.2, N=9, K=5, G=2)
    loss, _ = _forward(OPS, p)
    for W in (p.weight, 3.0 * p.weight):
        args = (p.logits, p.target, p.group, W, p.scale, p.shift)
        mean = OPS.parametric_ce_reduced(*args, p.ignore_index, True, p.eps)
        total = OPS.parametric_ce_reduced(*args, p.ignore_index, False, p.eps)
        torch.testing.assert_close(mean, total / 9, rtol=1e-14, atol=0)
    empty = _small(form="prob", eps=0.2, N=0, K=5, G=2)
    assert torch.isnan(OPS.parametric_ce_reduced(*empty.args(), empty.ignore_index, True, 0.2))
    assert OPS.parametric_ce_reduced(*empty.args(), empty.ignore_index, False, 0.2).item() == 0.0


def test_a_probability_target_ignores_ignore_index():
    p = _small(form="prob", eps=0.0, N=8, K=4, G=2)
    p.target[2] = 0.0  # a row that is all zeros, and rows whose values equal ignore_index
    p.target[3] = 1.0
    base = _forward(OPS, p)
    for ignore_index in (0, 1, -100):
        for impl in (OPS, reference):
            loss, lse = impl.parametric_ce(*p.args(), ignore_index, 0.0)
            torch.testing.assert_close(loss, base[0], rtol=1e-13, atol=0)
            assert bool((lse != 0).all())
    assert_all_zero(base[0][2], "the loss of an all-zero probability row")


# ---------------------------------------------------- F.cross_entropy

def _identity(K, dtype, w=None):
    acc = acc_dtype(dtype)
    W = torch.ones(1, K, dtype=acc) if w is None else w[None].to(acc)
    return W, torch.ones(1, K, dtype=acc), torch.zeros(1, K, dtype=acc)


def _ce_case(seed, N=30, K=6, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, K, generator=gen, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, K, (N,), generator=gen)
    y[::4] = -100
    w = 0.1 + 2.9 * torch.rand(K, generator=gen, dtype=torch.float64)
    P = torch.softmax(torch.randn(N, K, generator=gen, dtype=torch.float64), 1).to(dtype)
    U = (torch.randn(N, K, generator=gen, dtype=torch.float64) + 0.3).to(dtype)
    return z, y, w, P, U


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("form", ["index", "prob", "unnormalised"])
def test_identity_tables_reproduce_cross_entropy(form, weighted, eps, dtype):
    z0, y, w0, P, U = _ce_case(1, dtype=dtype)
    K = z0.shape[1]
    target = {"index": y, "prob": P, "unnormalised": U}[form]
    weight = w0.to(dtype) if weighted else None
    W, S, L = _identity(K, dtype, w0.to(dtype) if weighted else None)
    rtol, atol = (1e-12, 1e-13) if dtype == torch.float64 else (2e-6, 2e-6)
    probs = form != "index"
    for reduction in ("none", "sum", "mean"):
        z_ce = z0.clone().requires_grad_()
        t_ce = target.clone().requires_grad_() if probs else target
        expected = F.cross_entropy(z_ce, t_ce, weight=weight, reduction=reduction, label_smoothing=eps)
        z = z0.clone().requires_grad_()
        t = target.clone().requires_grad_() if probs else target
        if reduction == "none":
            got = OPS.parametric_ce(z, t, None, W, S, L, -100, eps)[0]
        else:
            got = OPS.parametric_ce_reduced(z, t, None, W, S, L, -100, reduction == "mean", eps)
        assert got.dtype == acc_dtype(dtype)
        torch.testing.assert_close(got, expected.detach().to(got.dtype), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{reduction}: {m}")
        cot = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(2))
        wrt_ce, wrt = ([z_ce, t_ce], [z, t]) if probs else ([z_ce], [z])
        for name, a, b in zip(("logits", "target"), torch.autograd.grad(got, wrt, cot),
                              torch.autograd.grad(expected, wrt_ce, cot.to(expected.dtype))):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{reduction} d/d{name}: {m}")


# ------------------------------------------------- gradcheck, gradgradcheck

def _small(form, eps, N=7, K=5, G=3, seed=0, dtype=torch.float64):
    rnd = random.Random(seed)
    p = make_problem(seed, N, K, G, dtype, use_group=True, ignore_frac=0.0)
    if N > 1:
        p.target[1] = p.ignore_index
    return with_target(p, form, eps, rnd)


@pytest.mark.parametrize("form,eps", [("index", 0.3), ("index", 1.0), ("prob", 0.0), ("prob", 0.4),
                                      ("unnormalised", 0.2)])
def test_gradcheck_and_gradgradcheck_of_the_ops(form, eps):
    p = _small(form, eps)
    inputs = [x.detach().clone().requires_grad_() for x in (p.logits, *p.tables())]

    def loss(z, W, S, L):
        return OPS.parametric_ce(z, p.target, p.group, W, S, L, p.ignore_index, eps)[0]

    def reduced(z, W, S, L):
        return OPS.parametric_ce_reduced(z, p.target, p.group, W, S, L, p.ignore_index, True, eps)

    for f in (loss, reduced):
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)

    def backward(upstream, z, W, S, L):
        lse = OPS.parametric_ce(z, p.target, p.group, W, S, L, p.ignore_index, eps)[1]
        return OPS.parametric_ce_backward(upstream, z, p.target, p.group, W, S, L, lse, p.ignore_index, True, eps)

    upstream = torch.randn(p.N, dtype=torch.float64, generator=p.generator())
    assert torch.autograd.gradcheck(backward, [upstream.requires_grad_()] + inputs)


@pytest.mark.parametrize("form,eps", [("prob", 0.0), ("prob", 0.3), ("unnormalised", 1.0)])
def test_gradcheck_with_respect_to_a_probability_target(form, eps):
    """The target's own gradient (ATen ops in csrc/autograd.cpp), per row and reduced,
    and its first derivatives differentiated w.r.t. everything but the target."""
    p = _small(form, eps, N=6, K=4, G=2, seed=4)
    inputs = [x.detach().clone().requires_grad_() for x in (p.logits, p.target, *p.tables())]

    def loss(z, P, W, S, L):
        return OPS.parametric_ce(z, P, p.group, W, S, L, p.ignore_index, eps)[0]

    def reduced(z, P, W, S, L):
        return OPS.parametric_ce_reduced(z, P, p.group, W, S, L, p.ignore_index, True, eps)

    for f in (loss, reduced):
        assert torch.autograd.gradcheck(f, inputs)
    # the target's gradient differentiated again w.r.t. logits and tables (ATen ops)
    P = p.target.detach().clone().requires_grad_()

    def target_grad(z, W, S, L):
        return torch.autograd.grad(loss(z, P, W, S, L).sum(), P, create_graph=True)[0]

    assert torch.autograd.gradcheck(target_grad, [inputs[0]] + inputs[2:])


def test_second_derivative_with_respect_to_a_probability_target_raises():
    p = _small("prob", 0.2, N=6, K=4, G=2)
    z, P, W = (x.detach().clone().requires_grad_() for x in (p.logits, p.target, p.weight))
    loss = OPS.parametric_ce(z, P, p.group, W, p.scale, p.shift, p.ignore_index, 0.2)[0].sum()
    gz, = torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives with respect to a probability target are "
                                                  "not implemented; detach the target"):
        torch.autograd.grad((gz * gz).sum(), P)
    # the other second derivatives still work, and match the reference's
    loss = OPS.parametric_ce(z, P, p.group, W, p.scale, p.shift, p.ignore_index, 0.2)[0].sum()
    gz, = torch.autograd.grad(loss, z, create_graph=True)
    hz, hW = torch.autograd.grad((gz * gz).sum(), (z, W))
    z2, W2 = (x.detach().clone().requires_grad_() for x in (z, W))
    ref = reference.parametric_ce(z2, p.target, p.group, W2, p.scale, p.shift, p.ignore_index, 0.2)[0].sum()
    rz, = torch.autograd.grad(ref, z2, create_graph=True)
    ez, eW = torch.autograd.grad((rz * rz).sum(), (z2, W2))
    torch.testing.assert_close(hz, ez, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hW, eW, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ opcheck

def _opcheck_samples():
    out = []
    for seed, (N, K, G, dtype, form, eps) in enumerate([
            (6, 5, 1, torch.float32, "prob", 0.0),
            (9, 4, 3, torch.float64, "unnormalised", 0.3),
            (7, 6, 2, torch.float32, "index", 0.2),
            (5, 7, 2, torch.bfloat16, "prob", 0.1),
            (0, 3, 2, torch.float64, "prob", 0.5)]):
        p = make_problem(seed, N, K, G, dtype, use_group=G > 1 or seed % 2 == 0, ignore_frac=0.3)
        p = with_target(p, form, eps, random.Random(seed))
        out.append(pytest.param(p, id=f"N{N}-K{K}-G{G}-{str(dtype)[6:]}-{form}-eps{eps}"))
    return out


@pytest.mark.parametrize("p", _opcheck_samples())
def test_opcheck(p):
    def leaf(t):
        return t.detach().clone().requires_grad_()

    z, W, S, L = [leaf(x) for x in (p.logits, *p.tables())]
    # a probability target that requires grad (its gradient is part of the op's autograd)
    target = leaf(p.target) if _probs(p) else p.target
    args = (z, target, p.group, W, S, L)
    torch.library.opcheck(OPS.parametric_ce, (*args, p.ignore_index, p.eps))
    means = (False, True) if p.N and not bool(_ignored(p).all()) else (False,)
    for mean in means:
        torch.library.opcheck(OPS.parametric_ce_reduced, (*args, p.ignore_index, mean, p.eps))
    _, lse = OPS.parametric_ce(*p.args(), p.ignore_index, p.eps)
    upstream = leaf(cotangents(p)[0])
    args = (z, p.target, p.group, W, S, L)  # no gradient w.r.t. the target two derivatives up
    torch.library.opcheck(OPS.parametric_ce_backward, (upstream, *args, lse, p.ignore_index, p.seed % 2 == 0,
                                                       p.eps))
    plain = (cotangents(p)[0], *p.args(), lse)
    for present in [(True,) * 4, (False, True, False, True)]:
        cot = cotangents(p, present)[1:]
        torch.library.opcheck(OPS.parametric_ce_double_backward, (*plain, *cot, p.ignore_index, True, p.eps))
    if p.dtype in (torch.float32, torch.float64):  # the CPU fast path's reduced op takes every target
        for mean in means:
            torch.library.opcheck(OPS._parametric_ce_reduced_with_gradient,
                                  (*p.args(), p.ignore_index, mean, True, p.eps))


def test_residual_ops_refuse_target_distributions():
    """The fast path's residual ops serve class indices without smoothing only;
    autograd never sends them anything else, and a direct call is an error."""
    p = make_problem(0, 6, 5, 1, torch.float32, use_group=False, ignore_frac=0.0)
    probs = torch.rand(6, 5)
    with pytest.raises(ValueError, match="takes int64 class-index targets, got a probability target"):
        OPS._parametric_ce_with_residual(p.logits, probs, None, *p.tables(), -100)
    loss, lse, residual = OPS._parametric_ce_with_residual(*p.args(), -100)
    with pytest.raises(ValueError, match="takes int64 class-index targets"):
        OPS._parametric_ce_backward_from_residual_(torch.ones(6), p.logits, probs, None, *p.tables(), lse,
                                                   residual, -100, True)


# ------------------------------------------------------------ determinism

@pytest.mark.parametrize("form,eps", [("index", 0.1), ("prob", 0.0), ("unnormalised", 0.3)])
def test_deterministic_across_runs_and_thread_counts(form, eps, restore_threads):
    """3000 x 37 (several row blocks of the CPU kernels' table gradients): every
    output and gradient bit-identical twice, and on 1 or 2 threads."""
    p = with_target(make_problem(31, 3000, 37, 3, torch.float32, ignore_frac=0.1), form, eps, random.Random(1))
    upstream, uz, uw, us, ul = cotangents(p)

    def run():
        loss, lse = _forward(OPS, p)
        first = OPS.parametric_ce_backward(upstream, *p.args(), lse, p.ignore_index, True, p.eps)
        second = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, us, ul, p.ignore_index,
                                                   True, p.eps)
        leaves = [t.detach().clone().requires_grad_() for t in (p.logits, *p.tables())]
        target = p.target.detach().clone().requires_grad_() if _probs(p) else p.target
        mean = OPS.parametric_ce_reduced(leaves[0], target, p.group, *leaves[1:], p.ignore_index, True, p.eps)
        wrt = leaves + ([target] if _probs(p) else [])
        grads = torch.autograd.grad(mean, wrt)
        return [loss, lse, *first, *second, mean, *grads]

    torch.set_num_threads(2)
    a, b = run(), run()
    torch.set_num_threads(1)
    c = run()
    for i, (x, y, w) in enumerate(zip(a, b, c)):
        assert torch.equal(x, y), f"output {i} differs between two runs"
        assert torch.equal(x, w), f"output {i} differs between 2 threads and 1"


# ------------------------------------------------------------ bad input

def _bad_problem():
    return with_target(make_problem(5, 6, 4, 2, torch.float32, ignore_frac=0.0), "prob", 0.0, random.Random(0))


def _all_op_calls(impls=("ops", "reference")):
    """(name, call(logits, target, group, W, S, L, label_smoothing)) for every op and reference function."""
    def calls(impl):
        def forward(z, t, g, W, S, L, eps):
            return impl.parametric_ce(z, t, g, W, S, L, -100, eps)

        def backward(z, t, g, W, S, L, eps):
            acc = acc_dtype(z.dtype)
            return impl.parametric_ce_backward(torch.ones(z.shape[0], dtype=acc), z, t, g, W, S, L,
                                               torch.zeros(z.shape[0], dtype=acc), -100, True, eps)

        def double_backward(z, t, g, W, S, L, eps):
            acc = acc_dtype(z.dtype)
            return impl.parametric_ce_double_backward(torch.ones(z.shape[0], dtype=acc), z, t, g, W, S, L,
                                                      torch.zeros(z.shape[0], dtype=acc), torch.ones_like(z),
                                                      None, None, None, -100, True, eps)
        out = [("parametric_ce", forward), ("parametric_ce_backward", backward),
               ("parametric_ce_double_backward", double_backward)]
        if impl is OPS:
            out.append(("parametric_ce_reduced",
                        lambda z, t, g, W, S, L, eps: OPS.parametric_ce_reduced(z, t, g, W, S, L, -100, True, eps)))
        return out
    result = []
    for name in impls:
        impl = OPS if name == "ops" else reference
        result += [pytest.param(f, id=f"{name}-{op}") for op, f in calls(impl)]
    return result


@pytest.mark.parametrize("call", _all_op_calls())
@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan"), -math.inf])
def test_label_smoothing_out_of_range_is_refused(call, eps):
    p = _bad_problem()
    for target in (p.target, p.target.argmax(1)):
        with pytest.raises(ValueError, match=r"`label_smoothing` must be in \[0, 1\], got"):
            call(p.logits, target, p.group, *p.tables(), eps)


@pytest.mark.parametrize("call", _all_op_calls())
def test_bad_probability_targets_are_refused(call):
    p = _bad_problem()
    N, K = p.N, p.K
    for bad in (p.target[:, :-1], torch.zeros(N, K + 1), p.target[:-1], torch.zeros(N, K, 1), torch.zeros(N),
                torch.zeros(K)):
        with pytest.raises(ValueError, match=r"probability target and must have the shape of logits"):
            call(p.logits, bad, p.group, *p.tables(), 0.1)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match=r"probability `target` must have the dtype of logits"):
            call(p.logits, p.target.to(dtype), p.group, *p.tables(), 0.1)
    for dtype in (torch.int32, torch.uint8):  # neither class indices nor a probability target
        with pytest.raises(TypeError, match=r"`target` must have dtype torch.int64"):
            call(p.logits, p.target.argmax(1).to(dtype), p.group, *p.tables(), 0.1)
    # the range checks: the group of every row of a probability target, the class of a smoothed index target
    bad_group = p.group.clone()
    bad_group[3] = 2
    with pytest.raises(IndexError, match=r"`group\[3\]` = 2 is out of range"):
        call(p.logits, p.target, bad_group, *p.tables(), 0.1)
    bad_target = p.target.argmax(1)
    bad_target[4] = K
    with pytest.raises(IndexError, match=rf"`target\[4\]` = {K} is out of range"):
        call(p.logits, bad_target, p.group, *p.tables(), 0.1)
