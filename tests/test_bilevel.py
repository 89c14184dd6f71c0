"""BilevelOptimizer, its solvers and check_hypergrad (docs/math.md sections 2 and 5)."""
import contextlib
import copy
import io
import itertools
import math
import re
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import MultiStepLR, OneCycleLR, ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from autobalance import ParametricCE
from autobalance.bilevel import (HYPER_EVERY, BilevelOptimizer, ConjugateGradient, FirstOrder, HyperStepResult,
                                 Neumann, SolverState, ridge)
from autobalance.bilevel.layers import HyperStepLayers
from autobalance.objectives import BalancedCE, CrossEntropy, GroupBalancedCE
from autobalance.testing import check_hypergrad

K, D = 4, 5


def logistic_problem(seed=0, groups=1):
    """Features, labels (and groups) for L2-regularised multinomial logistic
    regression, and a ParametricCE away from its initial point."""
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(K, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (80,), generator=g)
    x = centers[y] + torch.randn(80, D, generator=g, dtype=torch.float64)
    grp = torch.randint(0, groups, (80,), generator=g)
    criterion = ParametricCE.from_counts(torch.bincount(y[:50], minlength=K).expand(groups, K) if groups > 1
                                         else torch.bincount(y[:50], minlength=K), "la")
    with torch.no_grad():
        for p in criterion.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    train, val = (x[:50], y[:50]), (x[50:], y[50:])
    if groups > 1:
        train, val = train + (grp[:50],), val + (grp[50:],)
    return criterion, train, val


@pytest.fixture(scope="module")
def checks():
    criterion, train, val = logistic_problem()
    objective = BalancedCE(K)
    run = lambda **kw: check_hypergrad(criterion, objective, train, val, l2=0.05, **kw)  # noqa: E731
    return {"neumann": run(neumann_terms=300),
            "cg": run(solver="cg", cg_iterations=30, cg_tol=1e-12),
            "default": run(finite_differences=True),
            "criterion": criterion, "train": train, "val": val}


# ---- hypergradient accuracy against the exact implicit hypergradient

def test_neumann_with_many_terms_converges_to_exact(checks):
    c = checks["neumann"]
    assert c.cosine >= 0.999 and c.relative_error <= 1e-3, (c.cosine, c.relative_error)


def test_conjugate_gradient_converges_to_exact(checks):
    c = checks["cg"]
    assert c.cosine >= 0.999 and c.relative_error <= 1e-3, (c.cosine, c.relative_error)


def test_minibatch_estimates_approach_the_exact_one_with_more_batches(checks):
    """check_hypergrad's mini-batch draws: one draw of every row is the full-batch
    estimate (up to the summation order); more batches per hyper-step, closer to exact."""
    run = lambda **kw: check_hypergrad(checks["criterion"], BalancedCE(K), checks["train"], checks["val"],  # noqa
                                       l2=0.05, solver="cg", cg_iterations=30, cg_tol=1e-12, **kw)
    every_row = run(batch_size=50, draws=2)
    assert every_row.draws.shape == (2, every_row.exact.numel())
    for draw in every_row.draws:
        torch.testing.assert_close(draw, checks["cg"].estimate, rtol=1e-5, atol=1e-8)
    few, many = (run(batch_size=8, batches=(n, n), draws=12).draw_cosines.mean() for n in (1, 6))
    assert few + 0.05 < many, (few, many)
    for bad, match in (({"batches": (2, 1)}, "need a `batch_size`"), ({"batch_size": 0}, "`batch_size` must be"),
                       ({"batch_size": 4, "batches": (1,)}, "`batches` must be a pair"),
                       ({"batch_size": 4, "draws": 0}, "`draws` must be")):
        with pytest.raises(ValueError, match=match):
            run(**bad)


def test_default_configuration_is_close(checks):
    c = checks["default"]
    assert c.cosine >= 0.95, c.cosine


def test_exact_agrees_with_finite_differences(checks):
    c = checks["default"]
    assert c.fd_cosine >= 0.9999 and c.fd_relative_error <= 1e-4, (c.fd_cosine, c.fd_relative_error)
    # the re-solved validation loss is invariant to a per-row constant shift (docs/math.md section 2)
    shift = c.finite_difference[K:]
    assert abs(float(shift.sum())) <= 1e-6 * float(shift.abs().sum())


def test_fused_and_reference_backends_give_the_same_hypergradient(checks):
    criterion = copy.deepcopy(checks["criterion"])
    criterion.backend = "reference"
    ref = check_hypergrad(criterion, BalancedCE(K), checks["train"], checks["val"], l2=0.05, solver="cg",
                          cg_iterations=30, cg_tol=1e-12)
    fused = checks["cg"]
    torch.testing.assert_close(ref.estimate, fused.estimate, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ref.exact, fused.exact, rtol=1e-9, atol=1e-12)


def test_groups_and_per_group_parameters_converge_to_exact():
    criterion, train, val = logistic_problem(seed=1, groups=2)
    assert criterion.shift_param.shape == (2, K)
    c = check_hypergrad(criterion, GroupBalancedCE(K, 2), train, val, l2=0.05, solver="cg", cg_iterations=60,
                        cg_tol=0.0)
    assert c.cosine >= 0.999 and c.relative_error <= 1e-3, (c.cosine, c.relative_error)


@pytest.mark.parametrize("target", ("label_smoothing", "probabilities"))
def test_hypergradient_with_target_distributions_converges_to_exact(target):
    """The mixed derivative of a smoothed or probability-target training loss
    (docs/math.md section 8) gives the exact implicit hypergradient with CG."""
    criterion, (x, y), val = logistic_problem(seed=2)
    if target == "label_smoothing":
        criterion.label_smoothing = 0.2
    else:  # a mixup-like target: the label mixed with a random other class
        other = torch.randint(0, K, y.shape, generator=torch.Generator().manual_seed(3))
        y = 0.7 * F.one_hot(y, K).double() + 0.3 * F.one_hot(other, K).double()
    c = check_hypergrad(criterion, BalancedCE(K), (x, y), val, l2=0.05, solver="cg", cg_iterations=60, cg_tol=0.0)
    assert c.cosine >= 0.999 and c.relative_error <= 1e-3, (c.cosine, c.relative_error)


def test_first_order_is_neumann_without_terms_and_matches_its_formula():
    criterion, train, val = logistic_problem()
    model = nn.Linear(D, K, bias=False).double()
    criterion = criterion.double()

    def hypergrad(**kw):
        bopt = BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), criterion, CrossEntropy(), **kw)
        return torch.cat([h.reshape(-1) for h in bopt.hypergradient(model, [train], [val])])

    first = hypergrad(solver="first_order", step_size=0.5)
    assert torch.equal(first, hypergrad(solver="neumann", neumann_terms=0, step_size=0.5))
    # -d/dalpha <grad_theta L_T, eta grad_theta L_V>, then the shift gauge
    v = torch.autograd.grad(CrossEntropy()(model(val[0]), val[1]), model.weight)[0]
    g = torch.autograd.grad(criterion(model(train[0]), train[1]), model.weight, create_graph=True)[0]
    scale, shift = torch.autograd.grad(g, [criterion.scale_param, criterion.shift_param], -0.5 * v)
    expected = torch.cat([scale.reshape(-1), (shift - shift.mean(1, keepdim=True)).reshape(-1)])
    torch.testing.assert_close(first, expected, rtol=1e-12, atol=1e-14)


# ---- weight decay: the ridge of the inner problem

def test_adamw_decoupled_decay_is_the_ridge_of_its_fixed_point():
    """docs/math.md section 5, "Weight decay": AdamW stops where grad L_T = -c * theta with
    c = weight_decay * (sqrt(v_hat) + eps); the hypergradient is that of min L_T + c/2 |theta|^2
    with c held at the optimizer's state, checked by finite differences of the re-solved problem."""
    criterion, (x, y), val = logistic_problem()
    criterion, objective, lam = criterion.double(), BalancedCE(K), 0.5
    torch.manual_seed(0)
    model = nn.Linear(D, K, bias=False).double()
    adamw = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=lam)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):  # mini-batch steps: the second moments hold the gradients' noise
        rows = torch.randperm(50, generator=g)[:10]
        adamw.zero_grad()
        criterion(model(x[rows]), y[rows]).backward()
        adamw.step()
    state = adamw.state[model.weight]
    c = lam * ((state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))).sqrt() + 1e-8)

    def solve():  # Newton's method on L_T + c/2 |theta|^2
        def loss(w):
            return criterion(x @ w.view(K, D).T, y) + 0.5 * (c.reshape(-1) * w * w).sum()
        w = model.weight.detach().reshape(-1).clone()  # warm start: the last solution
        for _ in range(30):
            step = torch.linalg.solve(torch.autograd.functional.hessian(loss, w),
                                      torch.autograd.functional.jacobian(loss, w))
            w = w - step
            if float(step.norm()) < 1e-12:
                return w.view(K, D)
        raise AssertionError("Newton's method did not converge")

    with torch.no_grad():
        model.weight.copy_(solve())
    fd = []
    for q in criterion.parameters():
        for j in range(q.numel()):
            values = []
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    q.view(-1)[j] += sign * 1e-5
                values.append(float(objective(val[0] @ solve().T, val[1])))
                with torch.no_grad():
                    q.view(-1)[j] -= sign * 1e-5
            fd.append((values[0] - values[1]) / 2e-5)
    fd = torch.tensor(fd, dtype=torch.float64)

    def estimate(optimizer=adamw, **kw):
        bopt = BilevelOptimizer(optimizer, criterion, objective, solver="cg", cg_iterations=200, cg_tol=1e-14, **kw)
        return torch.cat([t.reshape(-1) for t in bopt.hypergradient(model, [(x, y)], [val])])

    assert float((estimate() - fd).norm() / fd.norm()) < 1e-5
    adam = torch.optim.Adam(model.parameters(), weight_decay=lam, decoupled_weight_decay=True)
    adam.load_state_dict(adamw.state_dict())  # AdamW is this optimizer
    assert torch.equal(estimate(adam), estimate())
    # the L2 reading of weight_decay (a ridge of lam) is the hypergradient of another problem
    assert float((estimate(ridge=lam) - fd).norm() / fd.norm()) > 0.1


def test_ridge_argument_and_unmodelled_decoupled_decay():
    model = mlp()
    data, val = batches(1), batches(2)
    sgd = lambda decay: torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=decay)  # noqa: E731
    criterion = ParametricCE(K)
    with torch.no_grad():
        criterion.shift_param.copy_(torch.linspace(-1, 1, K))
    by_decay = BilevelOptimizer(sgd(0.3), criterion, BalancedCE(K), solver="cg").hypergradient(model, data, val)
    by_ridge = BilevelOptimizer(sgd(0.0), criterion, BalancedCE(K), solver="cg", ridge=0.3).hypergradient(
        model, data, val)
    assert all(torch.equal(a, b) for a, b in zip(by_decay, by_ridge))
    for name in ("RAdam", "NAdam"):
        decoupled = getattr(torch.optim, name)(model.parameters(), weight_decay=0.1, decoupled_weight_decay=True)
        with pytest.raises(ValueError, match=rf"wrapped optimizer {name} has decoupled weight decay "
                                             r"\(weight_decay=0.1\).*ridge=coefficient"):
            BilevelOptimizer(decoupled, ParametricCE(K), BalancedCE(K))
        BilevelOptimizer(decoupled, ParametricCE(K), BalancedCE(K), ridge=0.1)  # the user's ridge
    for bad in (-1.0, float("nan"), "l2", True):
        with pytest.raises(ValueError, match=r"`ridge` must be 'auto' or a finite float >= 0, got"):
            BilevelOptimizer(sgd(0.0), ParametricCE(K), BalancedCE(K), ridge=bad)


# ---- the solvers on their own

def spd_system(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T + n * torch.eye(n, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def test_solvers_solve_the_linear_system():
    h, b = spd_system()
    matvec = lambda v: h @ v  # noqa: E731
    exact = torch.linalg.solve(h, b)
    x, state = ConjugateGradient(iterations=20, tol=0.0).solve(matvec, b)
    torch.testing.assert_close(x, exact, rtol=1e-10, atol=1e-12)
    assert state._replace(residual=None) == SolverState(solves=1) and 0 <= state.residual < 1e-10
    x, state = Neumann(terms=400).solve(matvec, b)
    torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-10)
    lam_max = float(torch.linalg.eigvalsh(h)[-1])
    assert lam_max / 2 < state.eigenvalue <= lam_max * (1 + 1e-12) and state.step_size == 1 / state.eigenvalue
    x, state = FirstOrder(step_size=0.5).solve(matvec, b)
    assert torch.equal(x, 0.5 * b) and state.step_size == 0.5 and state.eigenvector is None
    # weight decay: a ridge term on the matvec
    x, _ = ConjugateGradient(iterations=20, tol=0.0).solve(ridge(matvec, torch.full_like(b, 2.0)), b)
    torch.testing.assert_close(x, torch.linalg.solve(h + 2 * torch.eye(len(b), dtype=h.dtype), b))
    assert ridge(matvec, None) is matvec


def test_neumann_state_carries_the_estimate_to_the_next_solves():
    h, b = spd_system()
    products = []
    matvec = lambda v: products.append(v) or h @ v  # noqa: E731
    solver = Neumann(terms=2, power_iterations=4, power_refresh_every=2)
    counts, state = [], None
    for _ in range(4):
        products.clear()
        _, state = solver.solve(matvec, b, state)
        counts.append(len(products))
    # 4 power iterations at first, one warm-started refresh at every 2nd solve, 2 terms each
    assert counts == [6, 2, 3, 2] and state.solves == 4 and state.corrections == 0
    # a stale estimate (eta 50x too large) that is not due for a refresh is corrected within the solve
    stale = state._replace(eigenvalue=state.eigenvalue / 50, solves=5)
    _, fixed = solver.solve(matvec, b, stale)
    assert 1 <= fixed.corrections <= Neumann.MAX_STEP_SIZE_CORRECTIONS
    assert fixed.eigenvalue > 2 * stale.eigenvalue and fixed.step_size == 1 / fixed.eigenvalue


def test_solver_objects_give_the_hypergradients_of_the_solver_names():
    model = mlp(dtype=torch.float64)
    criterion = ParametricCE(K).double()
    x, y = batches(5, 1, dtype=torch.float64)[0]

    def hypergradient(**kw):
        bopt = BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-3), criterion,
                                BalancedCE(K), **kw)
        return torch.cat([h.reshape(-1) for h in bopt.hypergradient(model, [(x, y)], [(x, y)])])

    for named, solver in ((dict(neumann_terms=3, step_size=0.5), Neumann(terms=3, step_size=0.5)),
                          (dict(solver="neumann"), Neumann()),
                          (dict(solver="cg", cg_iterations=4), ConjugateGradient(iterations=4)),
                          (dict(solver="first_order", power_refresh_every=3), FirstOrder(power_refresh_every=3))):
        assert torch.equal(hypergradient(**named), hypergradient(solver=solver)), named


# ---- a small network for the optimizer's behaviour

def mlp(seed=0, batch_norm=False, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16), nn.Tanh()] + ([nn.BatchNorm1d(16)] if batch_norm else []) + [nn.Linear(16, K)]
    return nn.Sequential(*layers).to(dtype)


def batches(seed, n=3, size=24, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g, dtype=dtype), torch.randint(0, K, (size,), generator=g))
            for _ in range(n)]


def make(net, criterion=None, **kw):
    criterion = ParametricCE(K) if criterion is None else criterion
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return BilevelOptimizer(opt, criterion, BalancedCE(K), **kw), criterion


def train(model, bopt, criterion, steps, data, val, hyper_log=None, scheduler=None, start=0):
    for t in range(start, steps):
        x, y = data[t % len(data)]
        loss = criterion(model(x), y)
        bopt.zero_grad()
        loss.backward()
        bopt.step()
        if scheduler is not None:
            scheduler.step()
        if bopt.hyper_step_due:
            result = bopt.hyper_step(model, [data[(t + 1) % len(data)]], [val[t % len(val)]])
            if hyper_log is not None:
                hyper_log.append((bopt.steps, result))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts, self.double_backward_args = {}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        if name == "autobalance.parametric_ce_double_backward":
            self.double_backward_args.append(args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_second_derivatives_go_through_the_fused_double_backward(backend):
    model = mlp()
    bopt, criterion = make(model, ParametricCE(K, backend=backend), neumann_terms=3, power_iterations=2,
                           power_refresh_every=3)
    x, y = batches(0, 1)[0]
    criterion(model(x), y).backward()
    bopt.step()
    # one call per Hessian-vector product and one for the mixed term; the first hyper-step makes 2 power
    # iterations + 3 Neumann terms + the mixed term, later ones 3 + 1, plus one warm-started power step
    # at every 3rd hyper-step (power_refresh_every)
    for expected in (6, 4, 4, 5, 4):
        with CountOps() as ops:
            bopt.hyper_step(model, [(x, y)], [(x, y)])
        calls = ops.counts.get("autobalance.parametric_ce_double_backward", 0)
        assert calls == (expected if backend == "fused" else 0), ops.counts
        if backend == "fused":
            # the mixed term (the last call) is d/dalpha <Uz, dl/dz> with Uz = J_theta p alone
            u_logits, u_weight, u_scale, u_shift = ops.double_backward_args[-1][8:12]
            assert u_logits.shape == (len(y), K) and u_weight is None and u_scale is None and u_shift is None


class NoForwardAD(nn.Module):
    """The identity, through an autograd.Function without a forward-mode derivative (no ``jvp``)."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad

    def forward(self, x):
        return self.Function.apply(x)


def test_hypergradient_is_the_same_through_every_path(monkeypatch):
    """The mixed term through the kept graphs, from a forward-mode J_theta p and the
    loss's second derivative (graphs not kept), through rebuilt graphs (the fallback
    for a model with a layer that lacks forward-mode AD), and with PyTorch's own
    layers: one hypergradient."""
    g = torch.Generator().manual_seed(16)
    data = [(torch.randn(12, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, K, (12,), generator=g))
            for _ in range(3)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(24, K)).double()
    model(data[0][0])  # running statistics away from their initial values

    def hypergradient(net, graph_memory=float("inf")):
        bopt, criterion = make(net, ParametricCE(K).double(), solver="cg", cg_iterations=4, graph_memory=graph_memory)
        with torch.no_grad():
            criterion.shift_param.copy_(0.1 * torch.arange(K, dtype=torch.float64))
        return bopt, bopt.hypergradient(net, data[:2], data[2:])

    _, kept = hypergradient(model)
    bopt, forward = hypergradient(model, graph_memory=0)
    assert bopt._forward_ad
    layers = list(copy.deepcopy(model))
    bopt, fallback = hypergradient(nn.Sequential(layers[0], NoForwardAD(), *layers[1:]), graph_memory=0)
    assert not bopt._forward_ad
    monkeypatch.setattr(HyperStepLayers, "LAYERS", {})
    _, native = hypergradient(model)
    for ours, *others in zip(kept, forward, fallback, native):
        assert ours.abs().max() > 1e-6
        for other in others:
            torch.testing.assert_close(ours, other, rtol=1e-9, atol=1e-12)


def hyper_step_layers_net(x, conv1_w, conv1_b, conv2_w, bn_w, bn_b, mean, var, mode=HyperStepLayers):
    """Convolutions (bias, stride, padding, dilation, groups), eval-mode BatchNorm, ReLU."""
    with mode():
        out = F.relu(F.conv2d(x, conv1_w, conv1_b, stride=(2, 1), padding=1, dilation=(1, 2)))
        out = F.batch_norm(F.conv2d(out, conv2_w, None, padding=(1, 0), groups=2), mean, var, bn_w, bn_b, False,
                           0.1, 1e-5)
        out = F.conv1d(F.relu(out).flatten(2), conv2_w[..., 0], stride=2, groups=2)
        return torch.tanh(out) ** 2


def test_hyper_step_layers_have_pytorchs_values_and_derivatives():
    """The hyper-step's convolutions and eval-mode BatchNorm: PyTorch's values and
    gradients (up to rounding: on the CPU its 2-D convolutions run channels-last), and
    correct second and forward-mode derivatives."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    params = [randn(1, 2, 5, 6), randn(4, 2, 3, 3), randn(4), randn(4, 2, 3, 1), randn(4), randn(4)]
    params = [p.requires_grad_(True) for p in params] + [randn(4), randn(4).exp()]
    n = 5  # the differentiable arguments: x and the weights
    ours, theirs = hyper_step_layers_net(*params), hyper_step_layers_net(*params, mode=contextlib.nullcontext)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    nodes, stack = set(), [ours.grad_fn]
    while stack:
        node = stack.pop()
        nodes.add(type(node).__name__)
        stack += [f for f, _ in node.next_functions if f is not None]
    assert {"_ConvBackward", "_EvalBatchNormBackward"} <= nodes, nodes
    cotangent = randn(*ours.shape)
    for a, b in zip(torch.autograd.grad(ours, params[:n + 1], cotangent),
                    torch.autograd.grad(theirs, params[:n + 1], cotangent)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    fn = lambda *args: hyper_step_layers_net(*args, *params[n + 1:])  # noqa: E731
    assert torch.autograd.gradcheck(fn, params[:n + 1], check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, params[:n + 1])


def test_schedule_warmup_then_every_n_steps_once_per_step():
    model = mlp()
    bopt, criterion = make(model, warmup_steps=3, hyper_every=2)
    log = []
    train(model, bopt, criterion, 9, batches(1), batches(2), log)
    assert [t for t, _ in log] == [3, 5, 7, 9]
    assert all(isinstance(r, HyperStepResult) and r.applied for _, r in log)
    assert bopt.hyper_steps == 4 and not bopt.hyper_step_due  # already taken at step 9


def test_hyper_step_before_any_training_step_raises():
    model = mlp()
    bopt, _ = make(model)
    with pytest.raises(RuntimeError, match="before any training step"):
        bopt.hyper_step(model, batches(0, 1), batches(1, 1))
    assert not bopt.hyper_step_due


def test_freeze_fixes_the_loss():
    model = mlp()
    bopt, criterion = make(model, hyper_every=1)
    train(model, bopt, criterion, 2, batches(1), batches(2))
    bopt.freeze()
    before = [p.clone() for p in criterion.parameters()]
    assert not bopt.hyper_step_due and all(not p.requires_grad for p in criterion.parameters())
    with pytest.raises(RuntimeError, match="after freeze"):
        bopt.hyper_step(model, batches(0, 1), batches(1, 1))
    train(model, bopt, criterion, 3, batches(1), batches(2))
    assert all(torch.equal(a, b) for a, b in zip(before, criterion.parameters()))
    assert bopt.state_dict()["schedule"]["frozen"]


def checkpoint(bopt):
    buffer = io.BytesIO()
    torch.save(bopt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("saved_frozen", [False, True])
def test_loading_restores_the_checkpoints_frozen_state(saved_frozen):
    model = mlp()
    bopt, criterion = make(model, hyper_every=1)
    data, val = batches(1), batches(2)
    train(model, bopt, criterion, 2, data, val)
    if saved_frozen:
        bopt.freeze()
    saved = checkpoint(bopt)
    model2 = mlp()
    other, criterion2 = make(model2, hyper_every=1)
    if not saved_frozen:
        other.freeze()  # frozen here, unfrozen in the checkpoint
    other.load_state_dict(saved)
    assert other.frozen == saved_frozen
    assert all(p.requires_grad != saved_frozen for p in criterion2.parameters())
    train(model2, other, criterion2, 3, data, val, start=2)  # one training step; then the hyper-step if due
    if saved_frozen:
        assert not other.hyper_step_due and other.hyper_steps == 2
        with pytest.raises(RuntimeError, match="after freeze"):
            other.hyper_step(model2, data[:1], val[:1])
    else:
        assert other.hyper_steps == 3 and other.hyper_step(model2, data[:1], val[:1]).applied
        assert criterion2.shift_param.requires_grad


def test_loading_a_checkpoint_of_another_criterion_or_model_raises_and_changes_nothing():
    def build(classes, clusters=None, width=16, **kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, classes))
        criterion = ParametricCE(classes, torch.zeros(classes, dtype=torch.long) if clusters is None else clusters,
                                 **kw)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        bopt = BilevelOptimizer(opt, criterion, BalancedCE(classes), hyper_every=1)
        x, y = torch.randn(8, 6), torch.arange(8) % classes
        batch = (x, y) if criterion.num_groups == 1 else (x, y, torch.arange(8) % criterion.num_groups)
        criterion(model(x), *batch[1:]).backward()
        bopt.step()
        bopt.hyper_step(model, [batch], [(x, y)])
        return bopt

    saved = checkpoint(build(10))  # one cluster: hyperparameters of shape [1, 1], whatever the class count
    cases = [(build(5), r"num_classes: 10 in the state dict, 5 here"),
             (build(10, num_groups=2, group_params=False), r"num_groups: 1 in the state dict, 2 here"),
             (build(10, learn=("scale", "shift", "weight")), r"learn: \('scale', 'shift'\) in the state dict, "
                                                             r"\('weight', 'scale', 'shift'\) here"),
             (build(10, scale_max=3.0), r"scale_max: 2.0 in the state dict, 3.0 here")]
    for bopt, match in cases:
        before = copy.deepcopy(bopt.state_dict())
        with pytest.raises(ValueError, match="the state dict was saved for another criterion .*" + match):
            bopt.load_state_dict(saved)
        after = bopt.state_dict()
        assert after["schedule"] == before["schedule"]
        assert all(torch.equal(before["hyperparameters"][n], t) for n, t in after["hyperparameters"].items())
    # the same hyperparameter shape [1, 2] from another cluster map
    two = lambda first: torch.tensor([0] * first + [1] * (10 - first))  # noqa: E731
    with pytest.raises(ValueError, match=r"clusters: \[0, 0, 0, 1, .*\] in the state dict, \[0, 0, 0, 0, 0, 1"):
        build(10, two(5)).load_state_dict(checkpoint(build(10, two(3))))
    # the same criterion on another network: the wrapped optimizer's momentum does not fit
    with pytest.raises(ValueError, match=r"`optimizer` state 'momentum_buffer' of parameter 0 has shape \[8, 6\], "
                                         r"but that parameter has shape \[16, 6\]"):
        build(10).load_state_dict(checkpoint(build(10, width=8)))
    # a checkpoint without a layout (saved before it was stored) still loads
    legacy = dict(saved)
    del legacy["criterion"]
    build(10).load_state_dict(legacy)


def test_behaves_like_the_wrapped_optimizer():
    model = mlp()
    bopt, criterion = make(model)
    assert bopt.param_groups is bopt.optimizer.param_groups and bopt.state is bopt.optimizer.state
    scheduler = torch.optim.lr_scheduler.StepLR(bopt, step_size=1, gamma=0.5)
    x, y = batches(0, 1)[0]
    criterion(model(x), y).backward()
    assert criterion.scale_param.grad is not None  # the training loss reaches alpha too ...
    bopt.step()
    scheduler.step()
    assert bopt.optimizer.param_groups[0]["lr"] == 0.05 and bopt.steps == 1
    bopt.zero_grad()  # ... and zero_grad clears both
    assert all(p.grad is None for p in list(model.parameters()) + list(criterion.parameters()))
    text = repr(bopt)
    for word in ("BilevelOptimizer", "SGD", "scale_param", "shift_param", "BalancedCE", "Neumann(terms=5",
                 "hyper_every=20", "steps=1", "ridge='auto'"):
        assert word in text


def one_step(model, bopt, criterion, seed=0):
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in batches(seed, 1)[0])
    bopt.zero_grad()
    criterion(model(x), y).backward()
    return bopt.step()


def test_step_hooks_fire_once_per_step():
    model = mlp()
    bopt, criterion = make(model)
    calls = []
    record = lambda kind: lambda opt, args, kwargs: calls.append((kind, opt))  # noqa: E731
    handles = [bopt.register_step_pre_hook(record("pre")), bopt.register_step_post_hook(record("post")),
               register_optimizer_step_pre_hook(record("global pre")),
               register_optimizer_step_post_hook(record("global post"))]
    try:
        for _ in range(2):
            one_step(model, bopt, criterion)
    finally:
        for handle in handles:
            handle.remove()
    # the global hooks also see the wrapped optimizer's own step, inside the wrapper's
    inner = bopt.optimizer
    once = [("global pre", bopt), ("pre", bopt), ("global pre", inner), ("global post", inner), ("post", bopt),
            ("global post", bopt)]
    assert calls == 2 * once and bopt.steps == 2


@pytest.mark.parametrize("schedule", ["MultiStepLR", "OneCycleLR", "ReduceLROnPlateau"])
def test_lr_scheduler_attached_to_the_wrapper_schedules_the_wrapped_optimizer(schedule):
    """The same learning rates (and OneCycleLR's momenta) as the scheduler attached to
    the wrapped optimizer of a run without the wrapper, and no warning."""
    make_scheduler = {"MultiStepLR": lambda opt: MultiStepLR(opt, milestones=[2], gamma=0.1),
                      "OneCycleLR": lambda opt: OneCycleLR(opt, max_lr=1.0, total_steps=4),
                      "ReduceLROnPlateau": lambda opt: ReduceLROnPlateau(opt, factor=0.1, patience=0)}[schedule]

    def groups(wrapped):
        model = mlp()
        bopt, criterion = make(model)
        opt = bopt if wrapped else bopt.optimizer
        scheduler = make_scheduler(opt)
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
            for t in range(3):
                one_step(model, opt, criterion, seed=t)
                scheduler.step(1.0) if schedule == "ReduceLROnPlateau" else scheduler.step()
                out.append({k: v for k, v in bopt.optimizer.param_groups[0].items() if k != "params"})
        return out

    wrapped = groups(wrapped=True)
    assert wrapped == groups(wrapped=False)
    assert len({group["lr"] for group in wrapped}) > 1


def test_state_dict_hooks_run():
    model = mlp()
    bopt, criterion = make(model)
    one_step(model, bopt, criterion)
    calls = []
    bopt.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    bopt.register_state_dict_post_hook(lambda opt, state: {**state, "note": "kept"})
    state = bopt.state_dict()
    assert calls == ["pre"] and state["note"] == "kept"
    fresh, _ = make(mlp(seed=1), ParametricCE(K))
    fresh.register_load_state_dict_pre_hook(lambda opt, state: {**state, "schedule": {**state["schedule"],
                                                                                      "steps": 7}})
    fresh.register_load_state_dict_post_hook(lambda opt: calls.append("loaded"))
    fresh.load_state_dict(state)
    assert calls == ["pre", "loaded"] and fresh.steps == 7 and bopt.steps == 1


def test_default_hyper_every_is_the_package_constant():
    assert make(mlp())[0].hyper_every == HYPER_EVERY == 20


# ---- the model and batch sources bound at construction

def test_bound_model_and_loaders_give_the_hyper_steps_of_explicit_batches():
    data, val = batches(3), batches(4)

    def run(bound):
        model = mlp()
        val_stream = itertools.cycle(val)
        sources = dict(model=model, train_loader=data, val_loader=lambda: next(val_stream),
                       batches_per_hyper_step=(2, 1)) if bound else {}
        bopt, criterion = make(model, hyper_every=2, **sources)
        results = []
        for t in range(8):
            one_step(model, bopt, criterion, seed=t)
            if bopt.hyper_step_due:
                k = len(results)  # a list is iterated again from the start when it runs out
                explicit = () if bound else (model, [data[2 * k % 3], data[(2 * k + 1) % 3]], [val[k % 3]])
                results.append(bopt.hyper_step(*explicit))
        return bopt, results, [p.detach() for p in criterion.parameters()]

    bopt, bound, alpha = run(bound=True)
    _, explicit, expected = run(bound=False)
    assert len(bound) == 4 and bound == explicit and all(r.applied for r in bound)
    assert all(torch.equal(a, b) for a, b in zip(alpha, expected))
    assert "model: Sequential, train_loader: list, val_loader: function, batches_per_hyper_step=(2, 1)" in repr(bopt)


def test_bound_sources_misused_raise_clear_errors():
    model = mlp()
    criterion = ParametricCE(K)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    build = lambda **kw: BilevelOptimizer(opt, criterion, BalancedCE(K), **kw)  # noqa: E731
    with pytest.raises(TypeError, match="`train_loader` must be an iterable of batches .* or a callable"):
        build(train_loader=3)
    with pytest.raises(ValueError, match=r"`batches_per_hyper_step` must be a pair \(n_train, n_val\), got 2"):
        build(batches_per_hyper_step=2)
    with pytest.raises(ValueError, match=r"`batches_per_hyper_step\[1\]` must be an int >= 1, got 0"):
        build(batches_per_hyper_step=(1, 0))
    with pytest.raises(TypeError, match="`model` must be an nn.Module, got str"):
        build(model="net")
    with pytest.raises(ValueError, match="`model` does not hold the weights theta"):
        build(model=mlp(seed=1))
    x, y = batches(0, 1)[0]
    bopt = build(val_loader=iter([(x, y)]))
    one_step(model, bopt, criterion)
    with pytest.raises(TypeError, match="no `model`; pass it to this call or bind it"):
        bopt.hyper_step()
    with pytest.raises(TypeError, match="no `train_batches`; pass them to this call or bind .*train_loader="):
        bopt.hyper_step(model)
    assert bopt.hyper_step(model, [(x, y)]).applied  # the validation batch from the bound iterator
    with pytest.raises(ValueError, match="`val_loader` yields no batches"):  # an iterator does not start again
        bopt.hyper_step(model, [(x, y)])
    bopt = build(model=model, train_loader=[(x,)], val_loader=[(x, y)])
    one_step(model, bopt, criterion)
    with pytest.raises(ValueError, match=r"batch 0 from `train_loader` must be \(inputs, target\)"):
        bopt.hyper_step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_from_bound_loaders_move_to_the_weights_device():
    model = mlp().cuda()
    data = batches(0, 2)  # on the CPU
    bopt, criterion = make(model, ParametricCE(K).cuda(), model=model, train_loader=data, val_loader=data)
    one_step(model, bopt, criterion)
    with pytest.raises(ValueError, match=r"`train_batches\[0\]` inputs is on cpu"):
        bopt.hyper_step(model, data[:1], [tuple(t.cuda() for t in data[0])])
    result = bopt.hyper_step()
    assert result.applied and criterion.shift_param.is_cuda


def run_trajectory(stop_at=None, steps=10):
    """Trains with hyper-steps and an LR schedule attached to the wrapper; with
    ``stop_at``, checkpoints there, rebuilds everything from scratch and resumes."""
    def build(seed):
        model = mlp(seed=seed, batch_norm=True)
        # a power-iteration refresh at every other hyper-step: the checkpoint holds a reused estimate
        bopt, criterion = make(model, ParametricCE(K), warmup_steps=2, hyper_every=2, power_refresh_every=2)
        return model, bopt, criterion, MultiStepLR(bopt, milestones=[3, 7], gamma=0.5)

    model, bopt, criterion, scheduler = build(seed=0)
    data, val = batches(3), batches(4)
    train(model, bopt, criterion, steps if stop_at is None else stop_at, data, val, scheduler=scheduler)
    if stop_at is None:
        return model, bopt, criterion
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "bopt": bopt.state_dict(), "scheduler": scheduler.state_dict()},
               buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model, bopt, criterion, scheduler = build(seed=123)
    model.load_state_dict(saved["model"])
    bopt.load_state_dict(saved["bopt"])
    scheduler.load_state_dict(saved["scheduler"])
    train(model, bopt, criterion, steps, data, val, scheduler=scheduler, start=stop_at)
    return model, bopt, criterion


def state_tensors(model, bopt, criterion):
    out = list(model.state_dict().values()) + [p.detach() for p in criterion.parameters()]
    out += [s["momentum_buffer"] for s in list(bopt.state.values()) + list(bopt.hyper_optimizer.state.values())]
    return out + [bopt.solver_state.eigenvector, torch.tensor(bopt.param_groups[0]["lr"])]


def test_resuming_from_a_checkpoint_gives_the_same_trajectory():
    straight = run_trajectory()
    resumed = run_trajectory(stop_at=5)  # after the hyper-step at 4, before the one at 6
    assert straight[1].hyper_steps == resumed[1].hyper_steps == 5
    assert straight[1].steps == resumed[1].steps == 10 and straight[1].param_groups[0]["lr"] == 0.1 * 0.5 ** 2
    for a, b in zip(state_tensors(*straight), state_tensors(*resumed)):
        assert torch.equal(a, b)
    assert not torch.equal(straight[2].shift_param, torch.zeros_like(straight[2].shift_param))


def test_runs_are_bit_identical():
    a, b = run_trajectory(steps=6), run_trajectory(steps=6)
    for x, y in zip(state_tensors(*a), state_tensors(*b)):
        assert torch.equal(x, y)


def test_hyper_step_uses_eval_mode_and_leaves_batch_norm_untouched():
    model = mlp(batch_norm=True)
    bopt, criterion = make(model, hyper_every=1)
    x, y = batches(5, 1)[0]
    criterion(model(x), y).backward()
    bopt.step()
    model[0].eval()  # a submodule in its own mode keeps it
    buffers = [b.clone() for b in model.buffers()]
    train_mode = bopt.hypergradient(model, [(x, y)], [(x, y)])
    assert model.training and not model[0].training and model[2].training
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    model.eval()
    eval_mode = bopt.hypergradient(model, [(x, y)], [(x, y)])
    assert all(torch.equal(a, b) for a, b in zip(train_mode, eval_mode))


def test_batches_are_averaged_like_one_large_batch():
    model = mlp(dtype=torch.float64)
    criterion = ParametricCE(K).double()
    bopt, _ = make(model, criterion, solver="cg", cg_iterations=5)
    (x1, y1), (x2, y2) = batches(6, 2, dtype=torch.float64)
    (v1, w1), (v2, w2) = batches(7, 2, dtype=torch.float64)
    bopt.objective = CrossEntropy()  # the mean CE of the union is the mean of equal-size batch means
    split = bopt.hypergradient(model, [(x1, y1), (x2, y2)], [(v1, w1), (v2, w2)])
    whole = bopt.hypergradient(model, [(torch.cat([x1, x2]), torch.cat([y1, y2]))],
                               [(torch.cat([v1, v2]), torch.cat([w1, w2]))])
    for a, b in zip(split, whole):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class GaugeBreakingCE(ParametricCE):
    """A loss that is not invariant to a constant shift, so that the raw shift
    hypergradient has a component along the per-row constant."""

    def forward(self, logits, target, group=None):
        return super().forward(logits * (1 + self.shift_param.sum()), target, group)


class ForwardProbe(nn.Module):
    """Records, at every forward, how many earlier forwards' outputs are still alive
    (the loss's autograd node holds its logits, so a live output is a live graph)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.outputs, self.alive = inner, [], []

    def forward(self, x):
        self.alive.append(sum(ref() is not None for ref in self.outputs))
        out = self.inner(x)
        self.outputs.append(weakref.ref(out))
        return out


@pytest.mark.parametrize("keep", ["none", "one", "all"])
def test_graph_memory_keeps_the_graphs_that_fit_and_rebuilds_the_rest(keep):
    """3 training batches, 2 CG products and the mixed term: kept graphs are built once
    and serve the mixed term too; the others are rebuilt for every product, one at a
    time, and their mixed term takes a forward-mode pass; the hypergradient is the same."""
    probe = ForwardProbe(mlp(batch_norm=True))
    train_batches, val_batches = batches(14, 3), batches(15, 2)
    reference = make(probe, solver="cg", cg_iterations=2, graph_memory=float("inf"))[0]
    reference.steps = 1
    everything = reference.hyper_step(probe, train_batches, val_batches)
    assert everything.kept_graphs == 3 and everything.graph_bytes > 0
    budget = {"none": 0, "one": 0.5 * everything.graph_bytes, "all": float("inf")}[keep]
    kept = {"none": 0, "one": 1, "all": 3}[keep]
    probe.alive.clear()
    probe.outputs.clear()
    bopt = make(probe, solver="cg", cg_iterations=2, graph_memory=budget)[0]
    bopt.steps = 1
    grads = bopt.hypergradient(probe, train_batches, val_batches)
    built = 3 + (3 - kept)  # the first product builds all, the second rebuilds those not kept
    assert len(probe.alive) == 2 + built + 3 - kept  # val batches, the products, the mixed term
    assert max(probe.alive[2:2 + built]) <= max(kept, 1) and max(probe.alive[2 + built:], default=0) == 0, probe.alive
    result = bopt.hyper_step(probe, train_batches, val_batches)
    assert (result.kept_graphs, result.graph_bytes) == (kept, everything.graph_bytes)
    for ours, theirs in zip(grads, make(probe, solver="cg", cg_iterations=2, graph_memory=0)[0]
                            .hypergradient(probe, train_batches, val_batches)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_auto_graph_memory_is_half_the_available_memory(monkeypatch):
    from autobalance.bilevel import products
    cpu = torch.device("cpu")
    assert products.graph_budget(123, cpu) == 123
    available = products.available_memory(cpu)
    assert 0 < available < math.inf
    monkeypatch.setattr(products, "available_memory", lambda device: 1000.0)
    assert products.graph_budget("auto", cpu) == 500.0


def test_hyper_passes_record_no_graph_before_theta_and_restore_requires_grad():
    """With theta the last layer, the layers before it run without grad during the
    hyper-step (no graph through them), and every flag is restored, also after an error."""
    model = mlp()
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
    bopt, criterion = make(model, inner_params=model[-1].parameters())
    bopt.steps = 1
    x, y = batches(3, 1)[0]
    result = bopt.hyper_step(model, [(x, y)], [(x, y)])
    assert result.applied and seen and not any(seen)
    assert all(p.requires_grad for p in model.parameters())
    failing = make(model, inner_params=model[-1].parameters())[0]
    failing.objective = lambda logits, target: logits.sum(1)  # not a scalar: raises inside the passes
    failing.steps = 1
    with pytest.raises(ValueError, match="must return a scalar"):
        failing.hyper_step(model, [(x, y)], [(x, y)])
    assert all(p.requires_grad for p in model.parameters())


def test_graph_memory_is_checked():
    for bad in (-1, "all", True, float("nan"), None):
        with pytest.raises(ValueError, match="`graph_memory` must be 'auto' or a number of bytes >= 0"):
            make(mlp(), graph_memory=bad)


@pytest.mark.parametrize("loss", [ParametricCE, GaugeBreakingCE])
def test_shift_hypergradient_has_zero_mean_in_every_row(loss):
    model = mlp()
    criterion = loss(K, num_groups=2)
    bopt, _ = make(model, criterion)
    x, y = batches(8, 1)[0]
    group = torch.arange(len(y)) % 2
    scale, shift = bopt.hypergradient(model, [(x, y, group)], [(x, y, group)])
    assert shift.shape == (2, K) and shift.abs().max() > 1e-4
    torch.testing.assert_close(shift.mean(1), torch.zeros(2), atol=1e-6 * float(shift.abs().max()), rtol=0)


def test_clipping_bounds_the_applied_hypergradient():
    model = mlp()
    criterion = ParametricCE(K)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hyper_opt = torch.optim.SGD(criterion.parameters(), lr=1.0)
    bopt = BilevelOptimizer(opt, criterion, BalancedCE(K), hyper_optimizer=hyper_opt, max_hypergrad_norm=1e-3)
    x, y = batches(9, 1)[0]
    criterion(model(x), y).backward()
    bopt.step()
    result = bopt.hyper_step(model, [(x, y)], [(x, y)])
    moved = torch.cat([p.detach().reshape(-1) for p in criterion.parameters()]).norm()
    assert result.hypergrad_norm > 1e-3
    assert abs(float(moved) - 1e-3) < 1e-6


def test_non_finite_hypergradient_skips_the_step_and_is_counted():
    model = mlp()
    bopt, criterion = make(model, hyper_every=1)
    data, val = batches(10), batches(11)
    train(model, bopt, criterion, 2, data, val)
    before = copy.deepcopy(bopt.state_dict())
    x, y = val[0]
    bad = x.clone()
    bad[0, 0] = float("nan")
    result = bopt.hyper_step(model, data[:1], [(bad, y)])
    assert not result.applied and bopt.skipped_hyper_steps == 1 and bopt.hyper_steps == 2
    after = bopt.state_dict()
    for name, p in before["hyperparameters"].items():
        assert torch.equal(p, after["hyperparameters"][name])
    assert torch.equal(before["solver"]["eigenvector"], after["solver"]["eigenvector"])
    for a, b in zip(before["hyper_optimizer"]["state"].values(), after["hyper_optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    x, y = data[0]
    result = bopt.hyper_step(model, [(x * float("inf"), y)], val[:1])  # a non-finite training loss
    assert not result.applied and bopt.skipped_hyper_steps == 2
    assert torch.equal(before["hyperparameters"]["shift_param"], criterion.shift_param)
    # a later finite hyper-step works again
    assert bopt.hyper_step(model, data[:1], val[:1]).applied


def ignored(batch):
    x, y = batch
    return x, torch.full_like(y, -100)


def with_nan(batch):
    x, y = batch
    x = x.clone()
    x[0, 0] = float("nan")
    return x, y


# each hole of the skip guard: (the batches of the bad hyper-step, the reason it must give)
HOLES = {"nan validation batch": (lambda data, val: (data[:1], [with_nan(val[0])]),
                                  "the validation loss is not finite"),
         "ignored training batch": (lambda data, val: ([ignored(data[0])], val[:1]), "the training loss is not finite"),
         "ignored validation batch": (lambda data, val: (data[:1], [ignored(val[0])]),
                                      "the validation loss is not finite"),
         "ignored training batch, sum": (lambda data, val: ([ignored(data[0])], val[:1]),
                                         r"the hypergradient \(the mixed term\) is zero"),
         "ignored validation batch, sum": (lambda data, val: (data[:1], [ignored(val[0])]),
                                           "the validation gradient is zero")}


@pytest.mark.parametrize("solver", ["cg", "neumann"])
@pytest.mark.parametrize("hole", list(HOLES))
def test_degenerate_hyper_steps_are_skipped_without_moving_alpha(solver, hole):
    model = mlp()
    reduction = "sum" if hole.endswith("sum") else "mean"
    criterion = ParametricCE(K, reduction=reduction)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    # an objective that ignores labels (like the criterion), so a validation batch can be all ignored
    bopt = BilevelOptimizer(opt, criterion, nn.CrossEntropyLoss(reduction=reduction), solver=solver, hyper_every=1)
    data, val = batches(10), batches(11)
    train(model, bopt, criterion, 2, data, val)  # two applied steps: the hyper-optimizer has momentum
    assert bopt.hyper_steps == 2 and bopt.skipped_hyper_steps == 0
    calls = []
    bopt.hyper_optimizer.register_step_pre_hook(lambda *_: calls.append(1))
    before = copy.deepcopy(bopt.state_dict())
    make_batches, reason = HOLES[hole]
    result = bopt.hyper_step(model, *make_batches(data, val))
    assert not result.applied and re.match(reason, result.skip_reason)
    assert bopt.skipped_hyper_steps == 1 and bopt.hyper_steps == 2 and not calls
    after = bopt.state_dict()
    for name, p in before["hyperparameters"].items():
        assert torch.equal(p, after["hyperparameters"][name]) and torch.equal(p, getattr(criterion, name))
    for a, b in zip(before["hyper_optimizer"]["state"].values(), after["hyper_optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert before["solver"]["solves"] == after["solver"]["solves"]
    result = bopt.hyper_step(model, data[:1], val[:1])  # a sound hyper-step is applied again
    assert result.applied and result.skip_reason is None and calls == [1]


def test_conjugate_gradient_reports_its_residual_and_non_finite_curvature():
    H, b = spd_system()
    x, state = ConjugateGradient(iterations=50, tol=1e-10).solve(lambda v: H @ v, b)
    assert state.residual <= 1e-10 and float((b - H @ x).norm() / b.norm()) < 1e-9
    x, state = ConjugateGradient(iterations=2, tol=0.0).solve(lambda v: H @ v, b)
    assert state.residual > 1e-3 and math.isclose(state.residual, float((b - H @ x).norm() / b.norm()), rel_tol=1e-6)
    x, state = ConjugateGradient().solve(lambda v: H @ v * float("nan"), b)
    assert math.isnan(state.residual) and not x.any()  # it stopped at once: zeros, flagged
    _, state = Neumann(terms=3).solve(lambda v: H @ v, b)
    assert state.residual is None


def test_stale_eigenvalue_estimate_is_corrected_not_amplified():
    model = mlp(dtype=torch.float64)
    criterion = ParametricCE(K).double()
    bopt, _ = make(model, criterion, hyper_every=1, power_refresh_every=1000)
    data, val = batches(10, dtype=torch.float64), batches(11, dtype=torch.float64)
    train(model, bopt, criterion, 3, data, val)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    good = flat(bopt.hypergradient(model, data[:1], val[:1]))
    lam = bopt.solver_state.eigenvalue
    # the same series with a stale estimate (eta 50x too large) and no check grows like 49^J
    stale = BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4), criterion,
                             BalancedCE(K), step_size=50.0 / lam)
    assert flat(stale.hypergradient(model, data[:1], val[:1])).norm() > 1e3 * good.norm()
    bopt.solver_state = bopt.solver_state._replace(eigenvalue=lam / 50)
    fixed = flat(bopt.hypergradient(model, data[:1], val[:1]))
    # hypergradient() changes nothing
    assert bopt.step_size_corrections == 0 and bopt.solver_state.eigenvalue == lam / 50
    # a valid (if different) step size: the truncated series differs a little from the fresh one
    assert 0.2 < float(fixed.norm() / good.norm()) < 10.0
    assert F.cosine_similarity(fixed, good, dim=0) > 0.8
    result = bopt.hyper_step(model, data[:1], val[:1])
    assert result.applied and 1 <= bopt.step_size_corrections <= Neumann.MAX_STEP_SIZE_CORRECTIONS
    assert 2 * lam / 50 < bopt.solver_state.eigenvalue <= 1.0001 * lam
    assert bopt.state_dict()["schedule"]["step_size_corrections"] == bopt.step_size_corrections


def test_last_layer_as_theta():
    model = mlp()
    criterion = ParametricCE(K)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bopt = BilevelOptimizer(opt, criterion, BalancedCE(K), inner_params=model[2].parameters(), solver="cg",
                            cg_iterations=200, cg_tol=1e-10)
    assert sum(p.numel() for p in bopt._theta) == 16 * K + K
    x, y = batches(12, 1)[0]
    hypergrad = bopt.hypergradient(model, [(x, y)], [(x, y)])
    assert all(torch.isfinite(h).all() for h in hypergrad)


# ---- bad input

def test_bad_arguments_raise_clear_errors():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = ParametricCE(K)
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer"):
        BilevelOptimizer(model, criterion, BalancedCE(K))
    with pytest.raises(ValueError, match="no learnable parameters"):
        BilevelOptimizer(opt, ParametricCE(K, learn=()), BalancedCE(K))
    with pytest.raises(ValueError, match="`objective` must not depend on the loss hyperparameters"):
        BilevelOptimizer(opt, criterion, criterion)
    with pytest.raises(ValueError, match="must not hold the criterion's hyperparameters"):
        BilevelOptimizer(torch.optim.SGD(list(model.parameters()) + list(criterion.parameters()), lr=0.1),
                         criterion, BalancedCE(K))
    with pytest.raises(ValueError, match=r"`inner_params\[0\]`"):
        BilevelOptimizer(opt, criterion, BalancedCE(K), inner_params=[nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="`solver` must be one of"):
        BilevelOptimizer(opt, criterion, BalancedCE(K), solver="newton")
    with pytest.raises(ValueError, match="`step_size` must be 'auto' or a positive finite float, got -1.0"):
        BilevelOptimizer(opt, criterion, BalancedCE(K), step_size=-1.0)
    with pytest.raises(ValueError, match="`neumann_terms` must be an int >= 0, got -1"):
        BilevelOptimizer(opt, criterion, BalancedCE(K), neumann_terms=-1)
    with pytest.raises(ValueError, match="`terms` must be an int >= 0, got -1"):
        Neumann(terms=-1)
    with pytest.raises(ValueError, match="`cg_tol` must be a finite float >= 0, got -1"):
        BilevelOptimizer(opt, criterion, BalancedCE(K), solver="cg", cg_tol=-1)
    with pytest.raises(ValueError, match=r"`neumann_terms` is an option of the solver names; with a solver object "
                                         r"\(Neumann\(terms=5, "):
        BilevelOptimizer(opt, criterion, BalancedCE(K), solver=Neumann(), neumann_terms=3)
    with pytest.raises(ValueError, match="`power_refresh_every` must be an int >= 1, got 0"):
        BilevelOptimizer(opt, criterion, BalancedCE(K), power_refresh_every=0)
    with pytest.raises(ValueError, match="`hyper_every` must be an int >= 1, got 0"):
        BilevelOptimizer(opt, criterion, BalancedCE(K), hyper_every=0)
    with pytest.raises(ValueError, match="`hyper_optimizer` must hold exactly"):
        BilevelOptimizer(opt, criterion, BalancedCE(K), hyper_optimizer=torch.optim.SGD(model.parameters(), lr=1))
    with pytest.raises(ValueError, match="'scale_param' is on meta but the network weights are on cpu"):
        BilevelOptimizer(opt, ParametricCE(K).to("meta"), BalancedCE(K))


def test_bad_hyper_step_input_raises_clear_errors():
    model = mlp()
    criterion = ParametricCE(K)
    bopt, criterion = make(model, criterion)
    x, y = batches(13, 1)[0]
    criterion(model(x), y).backward()
    bopt.step()
    with pytest.raises(TypeError, match="`train_batches` must be a list"):
        bopt.hyper_step(model, x, [(x, y)])
    with pytest.raises(ValueError, match="`val_batches` is empty"):
        bopt.hyper_step(model, [(x, y)], [])
    with pytest.raises(ValueError, match=r"`train_batches\[0\]` must be \(inputs, target\)"):
        bopt.hyper_step(model, [(x,)], [(x, y)])
    with pytest.raises(ValueError, match=r"`val_batches\[0\]` target is on meta"):
        bopt.hyper_step(model, [(x, y)], [(x, y.to("meta"))])
    with pytest.raises(ValueError, match="does not depend on theta"):
        bopt.hyper_step(mlp(seed=1), [(x, y)], [(x, y)])
    bopt.objective = lambda logits, target: criterion(logits, target)
    with pytest.raises(ValueError, match="`objective` depends on the loss hyperparameters"):
        bopt.hyper_step(model, [(x, y)], [(x, y)])
    bopt.objective = BalancedCE(K)
    criterion.reduction = "none"
    with pytest.raises(ValueError, match="`criterion` must return a scalar loss"):
        bopt.hyper_step(model, [(x, y)], [(x, y)])
    criterion.reduction = "mean"
    assert bopt.hyper_step(model, [(x, y)], [(x, y)]).applied


@pytest.mark.parametrize("learn,groups", [(("scale", "shift"), 1), ((), 1), (("scale", "shift"), 2)],
                         ids=("with_loss", "augmentation_alone", "per_group"))
def test_hypergradient_of_a_spherical_augmentation_converges_to_exact(learn, groups):
    """PDA (issue 16): the per-class (and per-group) radii of a SphericalAugment are
    hyperparameters (with the loss's or alone); with the augmentation's one draw
    fixed, CG's hypergradient equals the exact implicit one and the finite
    differences of the re-solved problem."""
    from autobalance.augment import SphericalAugment
    criterion, train, val = logistic_problem(seed=4, groups=groups)
    if not learn:
        criterion = ParametricCE(K, learn=())
    radius = torch.linspace(0.2, 1.0, K * groups).view(groups, K)
    augment = SphericalAugment(K, num_groups=groups, radius=radius)
    objective = BalancedCE(K) if groups == 1 else GroupBalancedCE(K, groups)
    c = check_hypergrad(criterion, objective, train, val, l2=0.05, solver="cg", cg_iterations=80, cg_tol=0.0,
                        augment=augment, finite_differences=True)
    assert c.cosine >= 0.999 and c.relative_error <= 1e-3, (c.cosine, c.relative_error)
    assert c.fd_cosine >= 0.999, c.fd_cosine
    radii = c.exact[-K * groups:].view(groups, K)
    assert bool((radii.abs().amax(1) > 0).all())  # every group's radii move the validation loss


class _FlatImages(nn.Module):
    """An image policy on flat features: ``[N, h * w]`` rows as ``[N, 1, h, w]`` images."""

    def __init__(self, policy, side):
        super().__init__()
        self.policy, self.side, self.num_classes = policy, side, policy.num_classes

    def forward(self, x, target, group=None, generator=None):
        images = x.view(len(x), 1, self.side, self.side)
        return self.policy(images, target, group, generator=generator).flatten(1)


def test_hypergradient_of_an_image_policy_converges_to_exact():
    """The image policy's magnitudes and probabilities (warp, colour, relaxed-Bernoulli
    gates) as hyperparameters: with the draw fixed, CG's hypergradient equals the
    exact implicit one and the finite differences of the re-solved problem."""
    from autobalance.augment import ImagePolicy
    g = torch.Generator().manual_seed(7)
    side = 3
    centers = torch.randn(K, side * side, generator=g, dtype=torch.float64)
    y = torch.arange(90) % K
    x = centers[y] + 0.8 * torch.randn(90, side * side, generator=g, dtype=torch.float64)
    policy = ImagePolicy(K, torch.tensor([0, 0, 1, 1]), ops=("rotate", "contrast"), magnitude=0.5,
                         probability=torch.tensor([[0.3, 0.6], [0.7, 0.4]]))
    c = check_hypergrad(ParametricCE(K, learn=()), BalancedCE(K), (x[:60], y[:60]), (x[60:], y[60:]), l2=0.05,
                        solver="cg", cg_iterations=200, cg_tol=0.0, augment=_FlatImages(policy, side),
                        finite_differences=True)
    assert c.exact.shape == (8,) and float(c.exact.abs().min()) > 0  # 2 clusters x 2 ops, magnitude and probability
    assert c.cosine >= 0.999 and c.relative_error <= 1e-3, (c.cosine, c.relative_error)
    assert c.fd_cosine >= 0.999, c.fd_cosine


def test_hyper_step_moves_the_augmentation_radii_and_checks_its_arguments():
    from autobalance.augment import SphericalAugment
    criterion, train, val = logistic_problem(seed=5)
    model = nn.Linear(D, K, bias=False).double()
    augment = SphericalAugment(K, radius=0.5).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.05)
    bopt = BilevelOptimizer(opt, criterion.double(), BalancedCE(K), augment=augment, hyper_every=1,
                            hyper_optimizer=torch.optim.Adam([*criterion.parameters(), *augment.parameters()],
                                                             lr=0.05))
    assert bopt._hyper_names[-1] == "augment.radius_param"
    before = augment.radius_param.detach().clone()
    for _ in range(3):
        loss = criterion(model(augment(train[0], train[1])), train[1])
        bopt.zero_grad()
        loss.backward()
        bopt.step()
        assert bopt.hyper_step(model, [train], [val]).applied
    assert not torch.equal(before, augment.radius_param.detach())
    assert bopt.state_dict()["hyperparameters"].keys() >= {"augment.radius_param"}
    with pytest.raises(TypeError, match="`augment` must be None or an nn.Module augmentation"):
        BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), criterion, BalancedCE(K), augment=lambda x: x)
    with pytest.raises(ValueError, match=r"`augment` has num_classes = 3 but `criterion` has 4"):
        BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), criterion, BalancedCE(K),
                         augment=SphericalAugment(3))
    with pytest.raises(ValueError, match=r"`augment` has num_groups = 2 but `criterion` has 1; their cluster maps "
                                         r"must cover the same classes and groups"):
        BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), criterion, BalancedCE(K),
                         augment=SphericalAugment(K, num_groups=2))
    with pytest.raises(ValueError, match="has no learnable parameters and neither has `augment`"):
        BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ParametricCE(K, learn=()), BalancedCE(K),
                         augment=SphericalAugment(K, learn=False))


def test_state_dict_keeps_the_augmentation_draws_and_layout():
    """A resumed search draws the augmentations an uninterrupted one would, and a
    checkpoint of another augmentation (or none) is refused."""
    from autobalance.augment import SphericalAugment
    criterion, train, val = logistic_problem(seed=6)
    criterion = criterion.double()

    def build(augment):
        model = nn.Linear(D, K, bias=False).double()
        torch.manual_seed(0)
        nn.init.normal_(model.weight)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.05)
        return model, BilevelOptimizer(opt, copy.deepcopy(criterion), BalancedCE(K), augment=augment, hyper_every=1)

    def run(bopt, model, augment, steps):
        for _ in range(steps):
            loss = bopt.criterion(model(augment(train[0], train[1])), train[1])
            bopt.zero_grad()
            loss.backward()
            bopt.step()
            bopt.hyper_step(model, [train], [val])

    aug_a = SphericalAugment(K, radius=0.4).double()
    model_a, bopt_a = build(aug_a)
    run(bopt_a, model_a, aug_a, 2)
    saved, weights = copy.deepcopy(bopt_a.state_dict()), copy.deepcopy(model_a.state_dict())
    assert saved["schedule"]["augment_draws"] == 2
    h_a = bopt_a.hypergradient(model_a, [train], [val])  # the third hyper-step's (no state changes)
    assert bopt_a._augment_draws == 2 and all(torch.equal(a, b) for a, b in
                                              zip(h_a, bopt_a.hypergradient(model_a, [train], [val])))
    aug_b = SphericalAugment(K, radius=0.4).double()
    model_b, bopt_b = build(aug_b)
    model_b.load_state_dict(weights)
    bopt_b.load_state_dict(saved)
    h_b = bopt_b.hypergradient(model_b, [train], [val])
    assert all(torch.equal(a, b) for a, b in zip(h_a, h_b))
    bopt_b._augment_draws = 0  # another draw gives another hypergradient
    assert not all(torch.equal(a, b) for a, b in zip(h_a, bopt_b.hypergradient(model_b, [train], [val])))
    _, other = build(SphericalAugment(K, torch.tensor([0, 0, 1, 1]), radius=0.4).double())
    with pytest.raises(ValueError, match="augment clusters"):
        other.load_state_dict(saved)
    _, none = build(None)
    with pytest.raises(ValueError, match="augment: one saved, none here"):
        none.load_state_dict(saved)
