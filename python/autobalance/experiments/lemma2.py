"""Lemma 2 of the paper as a demonstration: on linearly separable 2-D data with a
minority class, a stronger spherical augmentation of the minority moves the
max-margin boundary of unregularised logistic regression toward the majority,
as a parametric loss (2.1) with a larger minority margin does (issue 16, item 5).

Setup. Binary labels ``target`` in {0 = majority, 1 = minority}, signs
``s = -1 / +1``, a linear score ``f(x) = w . x + b`` (a bias). Gradient descent on
an unregularised loss of separable data goes to infinity in the direction of a
max-margin solution (Soudry et al. 2018). With the bias trained like the
weights (the constant feature 1), that is the max-margin problem of the
lifted points ``(x, 1)``: ``min |w|^2 + b^2`` subject to the constraints below.
``make_data`` translates the data so that the textbook SVM (free bias) has its
boundary through the origin; there the lifted and the free-bias SVM coincide, so
(a) below is the textbook SVM; away from ``b = 0`` the lifted problem also
penalises the bias a little (this is what logistic regression with a bias does).

The variants (``run``):

(a) plain logistic loss, no augmentation (radius 0 for both classes):
    ``s (w . x + b) >= 1``, the max-margin boundary. Equal radii for both classes
    (``equal``, radius ``EQUAL_RADIUS``) give the same boundary: with ``b = 0`` the
    constraints ``s f >= 1 + eps |w|`` only rescale ``w`` (the paper's "augmentation
    has no benefit").
(b) personalised spherical augmentation (``SphericalAugment``): each point is
    replaced by ``copies`` draws uniform in the l2 ball of radius ``eps[y]`` around
    it (majority radius 0, minority radius ``eps_min``), a fixed augmented set on
    which GD runs to its max-margin direction. As the number of copies grows, the
    worst draw of a ball approaches the ball's point nearest the boundary,
    ``x - s eps w / |w|``, so the limit is the max-margin problem of the ORIGINAL
    data with the minority's margin enlarged by ``eps_min``:
    ``s (w . x + b) >= 1 + eps[y] |w|`` (geometric margin ``>= 1/|w| + eps[y]``).
    This is Lemma 2's equivalence; ``max_margin(..., radius=...)`` solves it
    exactly, and ``run`` compares GD's direction with it (and with the exact
    max-margin of the finite augmented set).
(c) the parametric loss (2.1) in its binary form (the VS loss of [38]):
    ``softplus(l[y] - Delta[y] s f(x))``. Its GD limit is ``s f >= 1 / Delta[y]``
    (a cost-sensitive SVM): a smaller minority ``Delta`` is a larger minority margin.
    The additive shift ``l`` does not change the limit (its effect decays like
    ``l / |theta|``; ``run`` checks it with ``shift_only``), so the margin
    parameter is ``Delta``. Matching (c) to (b): take the exact solution of (b),
    whose active constraints are ``s f = 1`` (majority) and ``s f = 1 + eps |w|``
    (minority), and set ``1 / Delta_min = rho`` = the ratio of its minority to
    majority functional margins (``matched_delta``), ``Delta_maj = 1``. Without a
    bias the two problems then have the same KKT point exactly; with the bias
    penalised they differ by a small tilt (measured by ``run``: ``angle_bc``).

Training (``train``): full-batch gradient descent on ``log L(theta)`` (the mean
loss's logarithm; its gradient is ``grad L / L``, GD with the step ``lr / L``),
which keeps a useful step as the loss vanishes, so the direction converges in
a few thousand steps instead of the plain step's ``1 / log t`` rate; float64,
with the per-sample losses in log space. ``Fit.angle_change`` is the angle
between the directions of ``theta = (w, b)`` at half and all of the steps.

``python -m autobalance.experiments.lemma2 --out docs/figures/lemma2_boundaries.png``
draws the figure and prints the margins and angles.
"""
import argparse
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from autobalance.augment import SphericalAugment

MAJORITY, MINORITY = 0, 1
RADII = (0.0, 0.25, 0.5, 1.0)  # eps_min of (b); the majority's radius is 0
EQUAL_RADIUS = 0.5  # the equal-augmentation check: both classes at this radius
DTYPE = torch.float64


def signs(target: torch.Tensor) -> torch.Tensor:
    """+1 for the minority, -1 for the majority."""
    return torch.where(target == MINORITY, 1.0, -1.0).to(DTYPE)


def make_data(n_majority: int = 200, n_minority: int = 10, *, seed: int = 0, spread: float = 0.5,
              offset: Tuple[float, float] = (3.0, 2.0), center: bool = True):
    """Two Gaussian clouds (std ``spread``, means ``-offset/2`` for the majority and
    ``+offset/2`` for the minority), separable for the defaults. With ``center``,
    translated so that the free-bias SVM boundary passes through the origin (at
    its point nearest the data's mean). Returns ``x`` ``[N, 2]`` float64 and
    ``target`` int64 ``[N]`` (majority rows first)."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.tensor(offset, dtype=DTYPE) / 2
    x = torch.cat([torch.randn(n_majority, 2, generator=gen, dtype=DTYPE) * spread - half,
                   torch.randn(n_minority, 2, generator=gen, dtype=DTYPE) * spread + half])
    target = torch.cat([torch.full((n_majority,), MAJORITY), torch.full((n_minority,), MINORITY)])
    if center:
        svm = max_margin(x, target, penalize_bias=False)
        w, b = svm[:2], svm[2]
        mean = x.mean(0)
        x = x - (mean - (w @ mean + b) / (w @ w) * w)
    return x, target


def augmented_copies(x: torch.Tensor, target: torch.Tensor, radius: Tuple[float, float], copies: int, *,
                     seed: int = 1):
    """A fixed augmented training set: ``copies`` draws of ``SphericalAugment`` (radius
    ``radius[y]``, uniform in the ball) of every point of a class with a radius > 0,
    and the points of a class with radius 0 once (their copies would coincide)."""
    radii = torch.tensor(radius, dtype=torch.float32)
    aug = SphericalAugment(2, radius=radii, learn=False)  # training mode: augments
    many = radii[target] > 0
    xr = torch.cat([x[~many], x[many].repeat(copies, 1)])
    tr = torch.cat([target[~many], target[many].repeat(copies)])
    with torch.no_grad():
        return aug(xr, tr, generator=torch.Generator().manual_seed(seed)), tr


@dataclass
class Fit:
    theta: torch.Tensor  # (w1, w2, b)
    angle_change: float  # degrees between the directions at steps // 2 and steps
    steps: int


def _log_softplus(z: torch.Tensor) -> torch.Tensor:
    # log(log(1 + e^z)); equals z to within e^z below -30, where softplus underflows its log
    return torch.where(z < -30, z, torch.log(F.softplus(z.clamp_min(-30))))


def train(x: torch.Tensor, target: torch.Tensor, *, delta: Tuple[float, float] = (1.0, 1.0),
          shift: Tuple[float, float] = (0.0, 0.0), steps: int = 4000, lr: float = 1.0) -> Fit:
    """Unregularised linear classifier with a bias on the loss
    ``softplus(shift[y] - delta[y] s (w . x + b))`` (the plain logistic loss for the
    defaults), by full-batch GD on ``log`` of the mean loss from ``theta = 0``."""
    s = signs(target)
    d = torch.tensor(delta, dtype=DTYPE)[target] * s
    l = torch.tensor(shift, dtype=DTYPE)[target]
    lifted = torch.cat([x.to(DTYPE), torch.ones(len(x), 1, dtype=DTYPE)], 1)
    theta = torch.zeros(3, dtype=DTYPE, requires_grad=True)
    half = None
    for step in range(1, steps + 1):
        log_loss = torch.logsumexp(_log_softplus(l - d * (lifted @ theta)), 0) - math.log(len(x))
        grad, = torch.autograd.grad(log_loss, theta)
        with torch.no_grad():
            theta -= lr * grad
        if step == steps // 2:
            half = theta.detach().clone()
    theta = theta.detach()
    return Fit(theta, angle(half, theta) if half is not None else float("nan"), steps)


def _solve(X, s, a, e, pen, theta):
    """``min sum(pen theta^2)`` s.t. ``s (X w + b) - a - e |w| >= 0``, from ``theta``, by
    SLSQP on a working set grown by the violated constraints."""
    import numpy as np
    from scipy.optimize import minimize

    def slack(th, idx):
        return s[idx] * (X[idx] @ th[:2] + th[2]) - a[idx] - e[idx] * np.linalg.norm(th[:2])

    def slack_jac(th, idx):
        J = np.empty((len(idx), 3))
        J[:, :2] = s[idx, None] * X[idx] - e[idx, None] * (th[:2] / np.linalg.norm(th[:2]))[None]
        J[:, 2] = s[idx]
        return J

    every = np.arange(len(X))
    work = set()
    for cls in (-1.0, 1.0):  # the points nearest the initial boundary, per class
        idx = every[s == cls]
        work.update(idx[np.argsort(slack(theta, idx) / a[idx])[:8]].tolist())
    for _ in range(100):
        idx = np.array(sorted(work))
        res = minimize(lambda th: float((pen * th * th).sum()), theta, jac=lambda th: 2 * pen * th,
                       method="SLSQP", options=dict(ftol=1e-13, maxiter=2000),
                       constraints=[dict(type="ineq", fun=lambda th: slack(th, idx),
                                         jac=lambda th: slack_jac(th, idx))])
        if not res.success:
            raise RuntimeError(f"autobalance: max_margin: SLSQP failed: {res.message}")
        theta = res.x
        violation = slack(theta, every)
        bad = every[violation < -1e-9]
        if len(bad) == 0:
            return theta
        work.update(bad[np.argsort(violation[bad])[:20]].tolist())
    raise RuntimeError("autobalance: max_margin: the working set did not converge")


def max_margin(x: torch.Tensor, target: torch.Tensor, *, margin: Tuple[float, float] = (1.0, 1.0),
               radius: Tuple[float, float] = (0.0, 0.0), penalize_bias: bool = True) -> torch.Tensor:
    """The exact max-margin classifier ``theta = (w, b)``:
    ``min |w|^2 + b^2`` (``|w|^2`` without ``penalize_bias``: the textbook SVM) subject
    to ``s_i (w . x_i + b) >= margin[y_i] + radius[y_i] |w|`` for every point: the
    robust constraint of the whole ball of radius ``radius[y_i]`` around ``x_i``.
    Convex; solved by SLSQP (scipy) on a working set of points, grown by the
    violated constraints until none is violated (at 1e-9), from a feasible start
    (the textbook SVM's direction, its intercept moved to split the free width
    evenly beyond the radii, scaled to the margins). Raises if the balls of the two
    classes cannot be separated."""
    import numpy as np

    X = x.detach().to(DTYPE).numpy()
    t = target.numpy()
    s = signs(target).numpy()
    a = np.asarray(margin, dtype=float)[t]
    e = np.asarray(radius, dtype=float)[t]
    mean_p, mean_n = X[s > 0].mean(0), X[s < 0].mean(0)
    w0 = (mean_p - mean_n) / np.dot(mean_p - mean_n, mean_p - mean_n) * 4
    theta = np.array([*w0, -np.dot(w0, (mean_p + mean_n) / 2)])
    ones, zeros = np.ones(len(X)), np.zeros(len(X))
    svm = _solve(X, s, ones, zeros, np.array([1.0, 1.0, 0.0]), theta)  # the textbook SVM
    u = svm[:2] / np.linalg.norm(svm[:2])
    proj = X @ u
    hi, lo = proj[s > 0].min(), proj[s < 0].max()  # the free width is hi - lo
    e_p, e_n = float(radius[MINORITY]), float(radius[MAJORITY])
    spare = (hi - lo - e_p - e_n) / 2
    if spare <= 0:
        raise ValueError(f"autobalance: max_margin: the radii {tuple(radius)} exceed the data's free width "
                         f"{hi - lo:.4f}: the augmented classes are not separable")
    k = 1.1 * max(margin) / spare
    theta = k * np.array([*u, -(lo + e_n + spare)])
    pen = np.array([1.0, 1.0, 1.0 if penalize_bias else 0.0])
    return torch.tensor(_solve(X, s, a, e, pen, theta), dtype=DTYPE)


def margins(theta: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> Tuple[float, float]:
    """(minority margin, majority margin): the minimum over each class's points of the
    signed distance ``s (w . x + b) / |w|`` to the boundary (positive: correct side)."""
    dist = signs(target) * (x.to(DTYPE) @ theta[:2] + theta[2]) / theta[:2].norm()
    return float(dist[target == MINORITY].min()), float(dist[target == MAJORITY].min())


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Degrees between two vectors (the directions of ``theta = (w, b)``)."""
    cos = float(a @ b / (a.norm() * b.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def boundary_difference(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """(tilt, shift) between the boundaries of ``a`` and ``b``: the angle between their
    normals ``w`` in degrees, and the difference of their offsets ``-b / |w|`` along
    the normal (the distance between them when parallel)."""
    ua, ub = a[:2] / a[:2].norm(), b[:2] / b[:2].norm()
    tilt = math.degrees(math.acos(max(-1.0, min(1.0, float(ua @ ub)))))
    return tilt, float(-a[2] / a[:2].norm() + b[2] / b[:2].norm())


def matched_delta(theta: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> Tuple[float, float]:
    """``(Delta_maj, Delta_min) = (1, 1 / rho)`` with ``rho`` the ratio of the minority's to
    the majority's functional margin ``min s f`` of ``theta`` (for the exact solution of
    (b): ``1 + eps_min |w|``), so that (2.1)'s limit ``s f >= 1 / Delta[y]`` asks for the
    margins ``theta`` has."""
    f = signs(target) * (x.to(DTYPE) @ theta[:2] + theta[2])
    rho = float(f[target == MINORITY].min() / f[target == MAJORITY].min())
    return 1.0, 1.0 / rho


def run(radii: Sequence[float] = RADII, *, copies: int = 1000, steps: int = 4000, lr: float = 1.0,
        seed: int = 0, n_majority: int = 200, n_minority: int = 10) -> Dict[str, object]:
    """Every variant of the module docstring on ``make_data(seed=seed)``. Returns a dict:
    ``x``, ``target``; ``plain`` and ``equal`` (variant (a) and the equal radii) and
    ``shift_only`` (the plain loss with ``l_min = 2``), each a dict; ``augmented`` and
    ``parametric`` (variants (b) and (c)), dicts keyed by ``eps_min``. Each row holds
    ``fit`` (a ``Fit``), ``reference`` (the exact max-margin solution of its limit
    problem), ``margins`` (of the fit, on the original points), ``angle_ref`` (fit
    against reference, degrees), ``boundary_ref`` (``boundary_difference`` of the
    two) and, for (b), ``finite`` (the exact max-margin of the finite augmented set)
    and ``angle_finite``; for (c) ``delta``, ``angle_bc`` (fit (c) against fit (b))
    and ``angle_bc_ref`` (their exact references), ``boundary_bc`` /
    ``boundary_bc_ref`` (the same pairs as ``boundary_difference``) and
    ``boundary_bc_free``, that of the two exact references with the bias not penalised
    (the textbook SVMs; Lemma 2's equivalence, exact there)."""
    x, target = make_data(n_majority, n_minority, seed=seed)

    def row(fit, reference, **extra):
        return dict(fit=fit, reference=reference, margins=margins(fit.theta, x, target),
                    reference_margins=margins(reference, x, target), angle_ref=angle(fit.theta, reference),
                    boundary_ref=boundary_difference(fit.theta, reference), **extra)

    plain_ref = max_margin(x, target)
    out = dict(x=x, target=target, radii=tuple(radii), copies=copies, steps=steps)
    out["plain"] = row(train(x, target, steps=steps, lr=lr), plain_ref)
    # every point is augmented here: a tenth of the copies keeps the run short
    out["equal_copies"] = max(1, copies // 10)
    xe, te = augmented_copies(x, target, (EQUAL_RADIUS, EQUAL_RADIUS), out["equal_copies"], seed=seed + 1)
    out["equal"] = row(train(xe, te, steps=steps, lr=lr),
                       max_margin(x, target, radius=(EQUAL_RADIUS, EQUAL_RADIUS)), radius=EQUAL_RADIUS)
    out["shift_only"] = row(train(x, target, shift=(0.0, 2.0), steps=steps, lr=lr), plain_ref, shift=(0.0, 2.0))
    out["augmented"], out["parametric"] = {}, {}
    for eps in radii:
        if eps > 0:
            xa, ta = augmented_copies(x, target, (0.0, eps), copies, seed=seed + 1)
            finite, fit = max_margin(xa, ta), train(xa, ta, steps=steps, lr=lr)
        else:  # no augmentation: the plain fit
            finite, fit = plain_ref, out["plain"]["fit"]
        reference = max_margin(x, target, radius=(0.0, eps))
        out["augmented"][eps] = row(fit, reference, finite=finite, angle_finite=angle(fit.theta, finite))
        delta = matched_delta(reference, x, target)
        cs_reference = max_margin(x, target, margin=(1.0 / delta[0], 1.0 / delta[1]))
        cfit = train(x, target, delta=delta, steps=steps, lr=lr)
        free_b = max_margin(x, target, radius=(0.0, eps), penalize_bias=False)
        free_c = max_margin(x, target, margin=(1.0 / delta[0], 1.0 / delta[1]), penalize_bias=False)
        out["parametric"][eps] = row(cfit, cs_reference, delta=delta,
                                     boundary_bc_free=boundary_difference(free_c, free_b),
                                     angle_bc=angle(cfit.theta, fit.theta),
                                     angle_bc_ref=angle(cs_reference, reference),
                                     boundary_bc=boundary_difference(cfit.theta, fit.theta),
                                     boundary_bc_ref=boundary_difference(cs_reference, reference))
    return out


def report(res: Dict[str, object]) -> str:
    """The margins and angles of ``run``'s result, as a text table."""
    lines = [f"Lemma 2 demonstration: {int((res['target'] == MAJORITY).sum())} majority / "
             f"{int((res['target'] == MINORITY).sum())} minority points, {res['copies']} augmented copies, "
             f"{res['steps']} GD steps",
             "variant                          minority m  majority m  (exact: min / maj)   angle to exact  "
             "(tilt / shift)          last-checkpoint change"]

    def line(name, r, extra=""):
        m, rm = r["margins"], r["reference_margins"]
        tilt, shift = r["boundary_ref"]
        lines.append(f"{name:<32} {m[0]:10.4f}  {m[1]:10.4f}  ({rm[0]:.4f} / {rm[1]:.4f})   {r['angle_ref']:8.4f} deg  "
                     f"({tilt:.3f} deg / {shift:+.4f})  {r['fit'].angle_change:8.4f} deg{extra}")

    line("(a) plain logistic", res["plain"])
    to_plain = angle(res["equal"]["fit"].theta, res["plain"]["fit"].theta)
    line(f"equal radii {EQUAL_RADIUS}", res["equal"], f"  angle to (a) {to_plain:.4f} deg")
    line("shift l_min=2 only (vs (a))", res["shift_only"])
    for eps, r in res["augmented"].items():
        line(f"(b) PDA eps_min={eps}", r, f"  angle to finite-set exact {r['angle_finite']:.4f} deg")
    for eps, r in res["parametric"].items():
        (tf, sf), (tr, sr) = r["boundary_bc"], r["boundary_bc_ref"]
        line(f"(c) Delta_min={r['delta'][1]:.4f} (eps {eps})", r,
             f"  vs (b): angle fits {r['angle_bc']:.4f} deg, exact {r['angle_bc_ref']:.4f} deg; "
             f"boundary tilt/shift fits {tf:.3f} deg/{sf:+.4f}, exact {tr:.3f} deg/{sr:+.4f}, "
             f"exact free-bias {r['boundary_bc_free'][0]:.3f} deg/{r['boundary_bc_free'][1]:+.4f}")
    return "\n".join(lines)


def _boundary(ax, theta, lim, **kw):
    w1, w2, b = (float(v) for v in theta)
    (x0, x1), (y0, y1) = lim
    if abs(w2) >= abs(w1):
        xs = torch.tensor([x0, x1], dtype=DTYPE)
        ys = -(w1 * xs + b) / w2
    else:
        ys = torch.tensor([y0, y1], dtype=DTYPE)
        xs = -(w2 * ys + b) / w1
    ax.plot(xs.tolist(), ys.tolist(), **kw)


def plot(res: Dict[str, object], out: str) -> None:
    """The data, the minority's largest augmentation balls and the boundaries of (a),
    (b) for each radius, (c) matched to each, and the equal radii; saved to ``out``."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    x, target = res["x"], res["target"]
    maj, mnr = x[target == MAJORITY], x[target == MINORITY]
    pad = 0.8
    lim = ((float(x[:, 0].min()) - pad, float(x[:, 0].max()) + pad),
           (float(x[:, 1].min()) - pad, float(x[:, 1].max()) + pad))
    fig, ax = plt.subplots(figsize=(8.5, 8))
    radii = [e for e in res["augmented"] if e > 0]
    if radii:
        for i, p in enumerate(mnr):
            ax.add_patch(Circle((float(p[0]), float(p[1])), max(radii), facecolor="tab:orange", alpha=0.06, lw=0))
            ax.add_patch(Circle((float(p[0]), float(p[1])), max(radii), fill=False, ec="tab:orange", lw=0.6,
                                ls=":", label=f"minority augmentation balls, radius {max(radii)}" if i == 0 else None))
    ax.scatter(maj[:, 0], maj[:, 1], s=12, c="tab:blue", label=f"majority (n={len(maj)})", zorder=3)
    ax.scatter(mnr[:, 0], mnr[:, 1], s=60, c="tab:orange", edgecolors="k", marker="D",
               label=f"minority (n={len(mnr)})", zorder=4)
    m = res["plain"]["margins"]
    _boundary(ax, res["plain"]["fit"].theta, lim, color="k", lw=2.2,
              label=f"(a) plain logistic loss (= max-margin SVM); margins minority/majority {m[0]:.2f}/{m[1]:.2f}")
    m = res["equal"]["margins"]
    _boundary(ax, res["equal"]["fit"].theta, lim, color="0.55", lw=1.6, ls=(0, (1, 1.5)),
              label=f"equal augmentation, radius {EQUAL_RADIUS} for both classes; margins {m[0]:.2f}/{m[1]:.2f} "
                    f"(its limit is exactly (a); the tilt is from {res['equal_copies']} draws per point)")
    colors = plt.cm.plasma([0.12, 0.42, 0.68, 0.88])
    for i, eps in enumerate(radii):
        m = res["augmented"][eps]["margins"]
        _boundary(ax, res["augmented"][eps]["fit"].theta, lim, color=colors[i % 4], lw=2.4,
                  label=f"(b) personalised augmentation eps_min={eps}, eps_maj=0; margins {m[0]:.2f}/{m[1]:.2f}")
    for i, eps in enumerate(radii):
        _boundary(ax, res["parametric"][eps]["fit"].theta, lim, color="k", lw=1.0, ls=(0, (4, 3)), zorder=5,
                  label=(f"(c) loss (2.1), Delta_maj=1, Delta_min=" +
                         ", ".join(f"{res['parametric'][e]['delta'][1]:.2f}" for e in radii) +
                         " (matched to each (b)): dashed, over its (b)") if i == 0 else None)
    ax.set_xlim(*lim[0])
    ax.set_ylim(*lim[1])
    ax.set_aspect("equal")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_title("Lemma 2: stronger minority augmentation moves the max-margin boundary toward the majority,\n"
                 "as the parametric loss (2.1) with a larger minority margin does (logistic regression, no "
                 "regularisation)", fontsize=9.5)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), fontsize=8, ncol=1, frameon=False)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m autobalance.experiments.lemma2",
                                     description="Lemma 2 demonstration: draw the boundaries and print the margins.")
    parser.add_argument("--out", default="docs/figures/lemma2_boundaries.png", help="the figure's path")
    parser.add_argument("--radii", type=float, nargs="+", default=list(RADII), help="eps_min values of (b)")
    parser.add_argument("--copies", type=int, default=1000, help="augmented draws per minority point")
    parser.add_argument("--steps", type=int, default=4000, help="GD steps per variant")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run(args.radii, copies=args.copies, steps=args.steps, lr=args.lr, seed=args.seed)
    print(report(res))
    plot(res, args.out)
    print(f"figure: {args.out}")
    return res


if __name__ == "__main__":
    main()
