"""Shared hypothesis profiles, random-problem strategies and a float64 oracle of
docs/math.md sections 1, 3 and 4 (with per-element error magnitudes) for the tests.

Profiles: ``ci`` (default, sized so the whole suite runs in a few minutes on
two cores) and ``thorough`` (ten times the examples); pick one with
``HYPOTHESIS_PROFILE=thorough``. Tests size themselves with ``examples(n)``.
"""
import math
import os
import random
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import autobalance  # noqa: F401  (loads the ops)
from autobalance import reference

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", deadline=None, max_examples=20, suppress_health_check=_SLOW,
                          print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=200, suppress_health_check=_SLOW,
                          print_blob=True)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
_FACTOR = {"ci": 1, "thorough": 10}.get(PROFILE, 1)


def examples(n: int) -> int:
    """``n`` hypothesis examples under the ci profile, more under thorough."""
    return n * _FACTOR


OPS = torch.ops.autobalance
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------- problems

@dataclass
class Problem:
    logits: torch.Tensor          # [N, K] in `dtype`, maybe non-contiguous
    target: torch.Tensor          # [N] int64
    group: Optional[torch.Tensor]  # [N] int64 or None (then G == 1)
    weight: torch.Tensor          # [G, K] accumulation dtype
    scale: torch.Tensor
    shift: torch.Tensor
    ignore_index: int
    seed: int = 0
    desc: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.logits.dtype

    @property
    def acc(self):
        return acc_dtype(self.logits.dtype)

    @property
    def N(self):
        return self.logits.shape[0]

    @property
    def K(self):
        return self.logits.shape[1]

    @property
    def G(self):
        return self.weight.shape[0]

    def tables(self):
        return self.weight, self.scale, self.shift

    def args(self):
        """The first arguments of every op: (logits, target, group, W, S, L)."""
        return (self.logits, self.target, self.group, self.weight, self.scale, self.shift)

    def generator(self, salt=1):
        return torch.Generator().manual_seed(self.seed * 7919 + salt)

    def __repr__(self):
        return (f"Problem(N={self.N}, K={self.K}, G={self.G}, dtype={self.dtype}, group="
                f"{'yes' if self.group is not None else 'None'}, ignore_index={self.ignore_index}, "
                f"ignored={int((self.target == self.ignore_index).sum())}, seed={self.seed}, {self.desc})")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` ([R, C]) in a (possibly) non-contiguous layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":          # column-major storage
        return t.t().contiguous().t()
    if layout == "strided":             # every other column of a wider tensor
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    if layout == "rows":                # every other row of a taller tensor
        tall = torch.zeros(2 * t.shape[0], t.shape[1], dtype=t.dtype)
        tall[::2] = t
        return tall[::2]
    raise AssertionError(layout)


def make_logits(gen, N, K, kind, dtype, layout="contiguous"):
    if kind == "normal":
        z = torch.randn(N, K, generator=gen, dtype=torch.float64) * 3
    elif kind == "wide":
        z = torch.randn(N, K, generator=gen, dtype=torch.float64) * 30
    elif kind == "tied":    # few distinct values: ties everywhere, constant rows
        z = torch.randint(-2, 3, (N, K), generator=gen).double()
        if N:
            z[0] = 1.5
    elif kind == "extreme":  # +-1e4 mixed with ordinary values
        z = torch.randn(N, K, generator=gen, dtype=torch.float64)
        mask = torch.rand(N, K, generator=gen) < 0.3
        sign = torch.where(torch.rand(N, K, generator=gen) < 0.5, -1.0, 1.0).double()
        z = torch.where(mask, 1e4 * sign, z)
        if N:
            z[0] = 1e4      # a whole row at +1e4: all classes tied
        if N > 1:
            z[1] = -1e4
    else:
        raise AssertionError(kind)
    return _layout(z.to(dtype), layout)


def make_problem(seed, N, K, G, dtype, *, use_group=None, ignore_index=-100, ignore_frac=0.2,
                 kind="normal", layout="contiguous", table_layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    acc = acc_dtype(dtype)
    use_group = G > 1 if use_group is None else (use_group or G > 1)
    logits = make_logits(gen, N, K, kind, dtype, layout)
    target = torch.randint(0, K, (N,), generator=gen)
    ignored = torch.rand(N, generator=gen) < ignore_frac
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    group = torch.randint(0, G, (N,), generator=gen) if use_group else None
    weight = 0.1 + 2.9 * torch.rand(G, K, generator=gen, dtype=torch.float64)
    scale = 0.05 + 1.95 * torch.rand(G, K, generator=gen, dtype=torch.float64)
    shift = torch.randn(G, K, generator=gen, dtype=torch.float64)
    weight, scale, shift = (_layout(t.to(acc), table_layout) for t in (weight, scale, shift))
    desc = dict(kind=kind, layout=layout, table_layout=table_layout)
    return Problem(logits, target, group, weight, scale, shift, ignore_index, seed, desc)


def random_problem(rnd: random.Random, dtypes=FLOAT_DTYPES, max_n=300, big_k=True,
                   kinds=("normal", "wide", "tied", "extreme"),
                   layouts=("contiguous", "transposed", "strided", "rows"), min_n=0) -> Problem:
    """A random problem: K = 1 (10%), 2..16 (30%), 17..300 (50%), 1000..1200 (10%,
    then N <= 40); N = min_n (5%), <= 8 (25%), else up to max_n; G in 1..4 with a
    group tensor (also sometimes for G = 1); ignore_index -100, -1 or a class;
    random tables, ignored rows, odd logits and layouts."""
    dtype = rnd.choice(dtypes)
    u = rnd.random()
    if u < 0.1:
        K = 1
    elif u < 0.4:
        K = rnd.randint(2, 16)
    elif u < 0.9 or not big_k:
        K = rnd.randint(17, 300)
    else:
        K = rnd.randint(1000, 1200)
    top = max(min_n, min(max_n, 40) if K >= 1000 else max_n)
    u = rnd.random()
    N = min_n if u < 0.05 else rnd.randint(min_n, max(min_n, min(top, 8))) if u < 0.3 else rnd.randint(min_n, top)
    G = rnd.randint(1, 4)
    use_group = G > 1 or rnd.random() < 0.5
    ignore_index = rnd.choice([-100, -1, rnd.randrange(K)])
    return make_problem(
        rnd.randrange(2**31), N, K, G, dtype, use_group=use_group, ignore_index=ignore_index,
        ignore_frac=rnd.choice([0.0, 0.0, 0.2, 0.2, 0.5, 1.0]), kind=rnd.choice(kinds), layout=rnd.choice(layouts),
        table_layout=rnd.choice(["contiguous", "contiguous", "transposed"]))


def problems(**kwargs):
    """Hypothesis strategy of ``random_problem``s. The problem's shape is drawn from one
    seed (a controlled mix of sizes rather than hypothesis' bias towards the smallest);
    a failing example is reported with its seed and shapes."""
    return st.integers(0, 2**32 - 1).map(lambda seed: random_problem(random.Random(seed), **kwargs))


POISONS = ["nan", "inf_at_target", "all_neg_inf"]


def poisoned_logits(p: Problem, row: int, poison: str) -> torch.Tensor:
    """``p.logits`` with one row made non-finite: a NaN, +inf at the target, or all -inf."""
    bad = p.logits.clone()
    if poison == "nan":
        bad[row, 7] = float("nan")
    elif poison == "inf_at_target":
        bad[row, p.target[row]] = float("inf")
    else:
        assert poison == "all_neg_inf", poison
        bad[row] = float("-inf")
    return bad


def check_poison_stays_in_its_row(p: Problem, bad: torch.Tensor, upstream: torch.Tensor, row: int, poison: str):
    """The forward and backward of ``p`` with logits ``bad`` (``row`` poisoned) against
    the clean ones: the row's loss is NaN and its logit gradient not finite (all NaN
    for a NaN), every other row bit-identical. Returns (clean loss, poisoned lse,
    the other rows' mask)."""
    clean_loss, clean_lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    loss, lse = OPS.parametric_ce(bad, *p.args()[1:], p.ignore_index)
    others = torch.arange(p.N, device=bad.device) != row
    assert torch.isnan(loss[row])
    assert torch.equal(loss[others], clean_loss[others]) and torch.equal(lse[others], clean_lse[others])
    for table_grads in (False, True):
        clean_dz = OPS.parametric_ce_backward(upstream, *p.args(), clean_lse, p.ignore_index, table_grads)[0]
        dz = OPS.parametric_ce_backward(upstream, bad, *p.args()[1:], lse, p.ignore_index, table_grads)[0]
        assert torch.equal(dz[others], clean_dz[others])
        assert not torch.isfinite(dz[row]).all()
        if poison == "nan":
            assert torch.isnan(dz[row]).all(), f"grad_logits of the NaN row: {dz[row]}"
    return clean_loss, lse, others


def check_extreme_logits(dtype, device="cpu"):
    """Logits of +-1e4 (far past exp's range) give the loss, lse and logit gradient
    of the exact softmax, and finite first and second derivatives. Returns the
    problem and its backward, for further checks."""
    acc = acc_dtype(dtype)
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4], [1e4, 1e4, 1e4], [-1e4, 1e4, 1e4]]).to(dtype)
    z, y = z.to(device), torch.tensor([0, 2, 1, 0], device=device)
    W = torch.tensor([[1.0, 2.0, 0.5]], dtype=acc, device=device)
    S, L = torch.ones(1, 3, dtype=acc, device=device), torch.zeros(1, 3, dtype=acc, device=device)
    loss, lse = OPS.parametric_ce(z, y, None, W, S, L, -100)
    m = float(z[0, 0])  # 1e4 as stored in `dtype` (bfloat16 rounds it)
    ln2, ln3 = torch.log(torch.tensor(2.0, dtype=torch.float64)), torch.log(torch.tensor(3.0, dtype=torch.float64))
    expected_loss = torch.stack([torch.tensor(0.0, dtype=torch.float64), 0.5 * ln3, 2.0 * ln3, 2 * m + ln2])
    expected_lse = torch.stack([torch.tensor(m, dtype=torch.float64), -m + ln3, m + ln3, m + ln2])
    eps = torch.finfo(acc).eps
    torch.testing.assert_close(loss.double().cpu(), expected_loss, rtol=0, atol=2e4 * eps * 8)
    torch.testing.assert_close(lse.double().cpu(), expected_lse, rtol=0, atol=2e4 * eps * 8)
    upstream = torch.ones(4, dtype=acc, device=device)
    grads = OPS.parametric_ce_backward(upstream, z, y, None, W, S, L, lse, -100, True)
    u = [torch.ones_like(z)] + [torch.ones_like(W)] * 3
    grads2 = OPS.parametric_ce_double_backward(upstream, z, y, None, W, S, L, lse, *u, -100, True)
    for t in (*grads, *grads2):
        assert torch.isfinite(t).all()
    p_expected = torch.tensor([[1, 0, 0], [1 / 3] * 3, [1 / 3] * 3, [0, 0.5, 0.5]], dtype=torch.float64)
    onehot = F.one_hot(y.cpu(), 3).double()
    expected_dz = W[0, y].double().cpu()[:, None] * (p_expected - onehot)
    torch.testing.assert_close(grads[0].double().cpu(), expected_dz, rtol=0,
                               atol=4 * 1e4 * eps + 2 * torch.finfo(dtype).eps)
    return (upstream, z, y, W, S, L, lse), grads


def check_missing_table_cotangent_is_zero(p: Problem, upstream, uz, uw, us, ul, table_grads=(True, False)):
    """u_scale without u_shift, or the other way round, gives exactly what a zero
    table gives at finite logits: the convention the CPU and CUDA kernels share."""
    _, lse = OPS.parametric_ce(*p.args(), p.ignore_index)
    for given_us, given_ul in ((us, None), (None, ul)):
        zero_filled = [torch.zeros_like(uw) if u is None else u for u in (given_us, given_ul)]
        for with_tables in table_grads:
            got = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, given_us, given_ul,
                                                    p.ignore_index, with_tables)
            want = OPS.parametric_ce_double_backward(upstream, *p.args(), lse, uz, uw, *zero_filled,
                                                     p.ignore_index, with_tables)
            for a, b in zip(got, want):
                assert torch.equal(a, b)


def cotangents(p: Problem, present=(True, True, True, True), salt=3, layout="contiguous"):
    """Random (upstream, Uz, UW, US, UL) for ``p``; absent ones are None."""
    gen = p.generator(salt)
    gamma = torch.randn(p.N, generator=gen, dtype=torch.float64).to(p.acc)
    uz = _layout(torch.randn(p.N, p.K, generator=gen, dtype=torch.float64).to(p.dtype), layout)
    tabs = [torch.randn(p.G, p.K, generator=gen, dtype=torch.float64).to(p.acc) for _ in range(3)]
    us = [uz] + tabs
    return (gamma, *[u if keep else None for u, keep in zip(us, present)])


# ------------------------------------------------------- float64 oracle

class Oracle:
    """docs/math.md sections 1, 3, 4 evaluated in float64 on the (exact) problem
    values, with per-element magnitudes ``mag_*`` such that a correct
    implementation accumulating with unit round-off ``eps`` is within a
    small multiple of ``eps * mag`` of the exact value."""

    def __init__(self, p: Problem, gamma=None, uz=None, uw=None, us=None, ul=None):
        d = torch.float64
        self.p = p
        N, K, G = p.N, p.K, p.G
        z = p.logits.to(d)
        W, S, L = (t.to(d) for t in p.tables())
        valid = p.target != p.ignore_index
        y = torch.where(valid, p.target, 0)
        g = torch.zeros_like(y) if p.group is None else torch.where(valid, p.group, 0)
        vm = valid.to(d)
        Sg, Lg = S[g], L[g]
        a = Sg * z + Lg
        lse = torch.logsumexp(a, 1)
        P = torch.exp(a - lse[:, None])
        onehot = torch.zeros(N, K, dtype=d)
        onehot[torch.arange(N), y] = 1.0
        Wy = W[g, y]
        ay = a[torch.arange(N), y]
        ce = lse - ay
        tiny = torch.finfo(p.acc).tiny / torch.finfo(p.acc).eps
        A = 1.0 + (Sg * z).abs().amax(1) + Lg.abs().amax(1) + math.log(K) if N else torch.zeros(0, dtype=d)
        self.valid, self.y, self.g, self.z = valid, y, g, z
        self.loss = vm * Wy * ce
        self.lse = vm * lse
        self.mag_loss = vm * Wy * A
        self.mag_lse = vm * A
        self.P, self.A = P, A

        def table_sum(rows_mag):  # [N, K] -> [G, K], summed over each group's rows
            out = torch.zeros(G, K, dtype=d)
            return out.index_add_(0, g, rows_mag * vm[:, None])

        Pm = (P + tiny) * A[:, None]
        if gamma is not None:
            gam = gamma.to(d)
            c = gam * Wy
            r = c[:, None] * (P - onehot)
            mag_r = (gam.abs() * Wy)[:, None] * (Pm + onehot)
            self.r, self.mag_r = r, mag_r
            self.dz = vm[:, None] * Sg * r
            self.mag_dz = vm[:, None] * Sg * mag_r
            self.dL = table_sum(r)
            self.mag_dL = table_sum(mag_r)
            self.dS = table_sum(r * z)
            self.mag_dS = table_sum(mag_r * z.abs())
            self.dW = table_sum(onehot * (gam * ce)[:, None])
            self.mag_dW = table_sum(onehot * (gam.abs() * A)[:, None])
            if any(u is not None for u in (uz, uw, us, ul)):
                self._double(gam, c, r, mag_r, Sg, z, onehot, Wy, ce, A, Pm, P, vm, table_sum,
                             uz, uw, us, ul)

    def _double(self, gam, c, r, mag_r, Sg, z, onehot, Wy, ce, A, Pm, P, vm, table_sum, uz, uw, us, ul):
        d = torch.float64
        N, K, G = self.p.N, self.p.K, self.p.G
        g = self.g
        zeros_t = torch.zeros(G, K, dtype=d)
        Uz = torch.zeros(N, K, dtype=d) if uz is None else uz.to(d)
        UW, US, UL = (zeros_t if u is None else u.to(d) for u in (uw, us, ul))
        USg, ULg = US[g], UL[g]
        v = Sg * Uz + ULg + USg * z
        vmag = (Sg * Uz).abs() + ULg.abs() + (USg * z).abs()
        V = vmag.amax(1) if N else torch.zeros(0, dtype=d)
        vbar = (P * v).sum(1)
        vy = v[torch.arange(N), self.y]
        UWy = UW[g, self.y]
        cu = gam * UWy
        t = c[:, None] * P * (v - vbar[:, None]) + cu[:, None] * (P - onehot)
        mag_t = (gam.abs() * Wy)[:, None] * Pm * (vmag + V[:, None]) + (gam.abs() * UWy.abs())[:, None] * (Pm + onehot)
        self.dd_gamma = vm * (Wy * (vbar - vy) + UWy * ce)
        self.mag_dd_gamma = vm * (Wy * V * A + UWy.abs() * A)
        self.dd_z = vm[:, None] * (Sg * t + USg * r)
        self.mag_dd_z = vm[:, None] * (Sg * mag_t + USg.abs() * mag_r)
        self.dd_S = table_sum(z * t + Uz * r)
        self.mag_dd_S = table_sum(z.abs() * mag_t + Uz.abs() * mag_r)
        self.dd_L = table_sum(t)
        self.mag_dd_L = table_sum(mag_t)
        self.dd_W = table_sum(onehot * (gam * (vbar - vy))[:, None])
        self.mag_dd_W = table_sum(onehot * (gam.abs() * V * A)[:, None])


# ------------------------------------------------------------ comparing

# Multiple of eps * magnitude allowed between two implementations that
# accumulate in the same dtype (fast vectorised exp, fma, summation order).
ACC_FACTOR = 64.0


def tolerance(mag, dtype, out_dtype=None, expected=None, factor=ACC_FACTOR):
    """Elementwise tolerance: accumulation error ``factor * eps(acc) * mag``, plus
    the final rounding when the output has a low-precision dtype."""
    eps = torch.finfo(acc_dtype(dtype)).eps
    tol = factor * eps * mag
    if out_dtype in LOW_PRECISION:
        fi = torch.finfo(out_dtype)
        tol = tol + 2 * fi.eps * expected.detach().double().abs() + fi.smallest_normal * fi.eps
    return tol


def assert_within(actual, expected, tol, what=""):
    """|actual - expected| <= tol elementwise, compared in float64 (NaN fails)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(e)
    err = (a - e).abs()
    bad = ~(err <= tol)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        ratio = (err / tol.clamp_min(1e-300))
        ratio = ratio[~torch.isnan(ratio)].max().item() if (~torch.isnan(ratio)).any() else float("nan")
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} elements out of tolerance; first at {idx}: "
            f"got {a[idx].item()!r}, expected {e[idx].item()!r}, tol {tol[idx].item():.3g}; "
            f"worst err/tol = {ratio:.3g}")


def assert_all_zero(t, what=""):
    assert bool((t == 0).all()), f"{what}: expected exact zeros, max abs {t.abs().max().item()}"


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


__all__ = ["OPS", "FLOAT_DTYPES", "LOW_PRECISION", "Problem", "Oracle", "acc_dtype", "assert_all_zero",
           "assert_within", "cotangents", "examples", "make_logits", "make_problem", "problems", "random_problem",
           "reference", "tolerance"]


def pce(logits, target, weight=None, scale=None, shift=None, group=None, **kwargs):
    """``autobalance.parametric_cross_entropy`` with the tables W, S, L and the
    group positional, as the op-level tests write it (the public signature is
    ``F.cross_entropy``'s, with ``scale``, ``shift`` and ``group`` as keywords)."""
    return autobalance.parametric_cross_entropy(logits, target, weight, scale=scale, shift=shift, group=group,
                                                **kwargs)
