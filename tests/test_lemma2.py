"""Lemma 2 as a demonstration (autobalance.experiments.lemma2): unregularised
logistic regression on separable 2-D data with a minority class, trained to its
max-margin direction with personalised spherical augmentation and with the
parametric loss (2.1). Small step and copy counts, fixed seeds; the exact
max-margin problems are solved by SLSQP."""
import pytest
import torch

pytest.importorskip("scipy")

from autobalance.experiments import lemma2 as L  # noqa: E402

RADII = (0.0, 0.25, 0.5, 1.0)
COPIES = 64    # augmented draws per minority point
STEPS = 1000   # normalised GD steps per fit


@pytest.fixture(scope="module")
def data():
    return L.make_data(seed=0)


@pytest.fixture(scope="module")
def augmented_fits(data):
    x, target = data
    fits = {}
    for eps in RADII:
        xa, ta = L.augmented_copies(x, target, (0.0, eps), COPIES, seed=1) if eps > 0 else (x, target)
        fits[eps] = L.train(xa, ta, steps=STEPS)
    return fits


def test_data_is_separable_and_plain_fit_is_the_svm(data, augmented_fits):
    """(a): the plain logistic fit has reached the max-margin direction; centring the
    data puts the SVM's boundary through the origin (b = 0)."""
    x, target = data
    svm = L.max_margin(x, target)
    assert abs(float(svm[2])) < 1e-8 * float(svm.norm())
    fit = augmented_fits[0.0]
    minority, majority = L.margins(fit.theta, x, target)
    assert min(minority, majority) > 0.5
    assert L.cosine(fit.theta, svm) > 0.9999 and fit.angle_change < 0.5


def test_minority_radius_moves_boundary_toward_majority(data, augmented_fits):
    """(i): the minority margin (min over the minority points of their signed distance
    to the boundary) grows with eps_min, and the majority margin shrinks, while the
    boundary still separates the original data."""
    x, target = data
    m = [L.margins(augmented_fits[eps].theta, x, target) for eps in RADII]
    minority, majority = [v[0] for v in m], [v[1] for v in m]
    for i in range(1, len(RADII)):
        step = RADII[i] - RADII[i - 1]
        assert minority[i] - minority[i - 1] > 0.3 * step, minority
        assert majority[i - 1] - majority[i] > 0.3 * step, majority
    assert majority[-1] > 0.1
    assert all(fit.angle_change < 2.0 for fit in augmented_fits.values())


def test_augmented_direction_is_the_enlarged_margin_max_margin(data, augmented_fits):
    """(ii): GD on the augmented copies goes to the max-margin direction of the
    original data with the minority's margin enlarged by eps_min
    (s f >= 1 + eps |w|, the whole ball's constraint), up to finite copies and steps;
    and to the exact max-margin of the finite augmented set, closer."""
    x, target = data
    for eps in RADII[1:]:
        theta = augmented_fits[eps].theta
        ball = L.max_margin(x, target, radius=(0.0, eps))
        assert L.cosine(theta, ball) >= 0.99, (eps, L.angle(theta, ball))
        got, want = L.margins(theta, x, target), L.margins(ball, x, target)
        assert abs(got[0] - want[0]) < 0.1 * eps + 0.01 and abs(got[1] - want[1]) < 0.1 * eps + 0.01
        xa, ta = L.augmented_copies(x, target, (0.0, eps), COPIES, seed=1)
        finite = L.max_margin(xa, ta)
        assert L.cosine(theta, finite) >= 0.999, (eps, L.angle(theta, finite))


def test_exact_references_equal_radii_and_free_bias_equivalence(data):
    """The exact problems behind the figure: equal radii leave the max-margin boundary
    where it is (here b = 0); with the bias free (textbook SVM) the enlarged minority
    margin only shifts the boundary by eps_min / 2, and the cost-sensitive SVM of
    (2.1) with the matched Delta is the same classifier (Lemma 2's equivalence)."""
    x, target = data
    plain = L.max_margin(x, target)
    equal = L.max_margin(x, target, radius=(0.5, 0.5))
    assert L.cosine(equal, plain) > 1 - 1e-9
    svm = L.max_margin(x, target, penalize_bias=False)
    base = L.margins(svm, x, target)
    for eps in RADII[1:]:
        aug = L.max_margin(x, target, radius=(0.0, eps), penalize_bias=False)
        m = L.margins(aug, x, target)
        assert m[0] == pytest.approx(base[0] + eps / 2, abs=1e-5) and m[1] == pytest.approx(base[1] - eps / 2, abs=1e-5)
        delta = L.matched_delta(aug, x, target)
        assert delta[1] < 1
        cs = L.max_margin(x, target, margin=(1 / delta[0], 1 / delta[1]), penalize_bias=False)
        tilt, shift = L.boundary_difference(cs, aug)
        assert tilt < 1e-3 and abs(shift) < 1e-5


def test_parametric_loss_moves_boundary_toward_majority(data, augmented_fits):
    """(iii): the binary (2.1) loss softplus(l_y - Delta_y s f) without regularisation:
    a smaller minority Delta (a larger minority margin 1 / Delta) moves the boundary
    toward the majority; with Delta matched to eps_min = 0.5 it lands next to (b)'s
    boundary; the additive shift l alone leaves the max-margin boundary (nearly) in place."""
    x, target = data
    deltas = (1.0, 0.7, 0.5, 0.25)
    m = [L.margins(L.train(x, target, delta=(1.0, d), steps=STEPS).theta, x, target) for d in deltas]
    minority, majority = [v[0] for v in m], [v[1] for v in m]
    assert all(b - a > 0.05 for a, b in zip(minority, minority[1:])), minority
    assert all(a - b > 0.05 for a, b in zip(majority, majority[1:])), majority
    eps = 0.5
    delta = L.matched_delta(L.max_margin(x, target, radius=(0.0, eps)), x, target)
    param = L.train(x, target, delta=delta, steps=STEPS).theta
    aug = augmented_fits[eps].theta
    assert L.cosine(param, aug) >= 0.99
    tilt, shift = L.boundary_difference(param, aug)
    assert tilt < 3.0 and abs(shift) < 0.05
    plain = L.margins(augmented_fits[0.0].theta, x, target)
    shifted = L.margins(L.train(x, target, shift=(0.0, 2.0), steps=STEPS).theta, x, target)
    assert abs(shifted[0] - plain[0]) < 0.02 and abs(shifted[1] - plain[1]) < 0.02
