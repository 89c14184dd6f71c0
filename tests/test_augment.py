"""Personalized augmentation (autobalance.augment): the spherical augmentation of
Lemma 2, its distribution, gradients and argument checks."""
import pytest
import torch
from scipy import stats

from autobalance.augment import SphericalAugment, unit_ball


def test_unit_ball_is_uniform():
    """Uniform in the ball: norms <= 1, ||u||^d ~ U(0, 1), and the direction's
    mean is 0."""
    gen = torch.Generator().manual_seed(0)
    for dim in (1, 2, 7):
        u = unit_ball((4000,), dim, generator=gen, dtype=torch.float64)
        norms = u.norm(dim=1)
        assert u.shape == (4000, dim) and bool((norms <= 1).all())
        assert stats.kstest((norms ** dim).numpy(), "uniform").pvalue > 1e-3
        assert float(u.mean(0).abs().max()) < 0.05


def test_radius_per_cluster_and_eval_identity():
    clusters = torch.tensor([0, 0, 1, 2])
    aug = SphericalAugment(4, clusters, radius=torch.tensor([0.5, 0.0, 2.0]))
    x = torch.randn(400, 3, 2, generator=torch.Generator().manual_seed(1))
    y = torch.arange(400) % 4
    out = aug(x, y, generator=torch.Generator().manual_seed(2))
    moved = (out - x).detach().flatten(1).norm(dim=1)
    expected = torch.tensor([0.5, 0.5, 0.0, 2.0])[y]
    assert bool((moved <= expected + 1e-6).all())
    assert float(moved[y == 3].max()) > 1.5 and float(moved[y == 2].max()) == 0.0
    aug.eval()
    assert aug(x, y) is x


def test_radius_gradient_is_the_reparameterised_one():
    """d sum(x') / d eps_c = sum of the components of u over the samples of cluster c."""
    aug = SphericalAugment(3, radius=torch.tensor([0.3, 1.0, 0.0]))
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(3))
    y = torch.arange(50) % 3
    out = aug(x, y, generator=torch.Generator().manual_seed(4))
    (grad,) = torch.autograd.grad(out.sum(), aug.radius_param)
    u = unit_ball((50,), 5, generator=torch.Generator().manual_seed(4))
    per_class = torch.zeros(3).index_add_(0, y, u.sum(1))
    # at a radius of exactly 0 the clamp passes the gradient too, so a search can leave 0
    torch.testing.assert_close(grad, per_class)


def test_negative_learned_radius_augments_nothing():
    aug = SphericalAugment(2, radius=0.5)
    with torch.no_grad():
        aug.radius_param.fill_(-1.0)
    x = torch.randn(8, 4)
    out = aug(x, torch.zeros(8, dtype=torch.long))
    assert torch.equal(out, x)
    (grad,) = torch.autograd.grad(out.sum(), aug.radius_param)
    assert torch.equal(grad, torch.zeros(2))


def test_same_generator_same_draw():
    aug = SphericalAugment(3, radius=1.0)
    x, y = torch.randn(10, 6), torch.arange(10) % 3
    a = aug(x, y, generator=torch.Generator().manual_seed(5))
    b = aug(x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"`radius` must be a finite number >= 0"):
        SphericalAugment(3, radius=-0.1)
    with pytest.raises(ValueError, match=r"`radius` must be a finite number >= 0 or a \[C\] = \[3\]"):
        SphericalAugment(3, radius=torch.ones(2))
    with pytest.raises(ValueError, match=r"`radius` must be a finite number"):
        SphericalAugment(3, radius=float("nan"))
    with pytest.raises(ValueError, match=r"`clusters` must be None or an int64 map of shape \[K\] = \[3\]"):
        SphericalAugment(3, torch.tensor([0, 1]))
    aug = SphericalAugment(3, radius=1.0)
    with pytest.raises(ValueError, match=r"`x` must be a floating-point \[N, \.\.\.\] tensor"):
        aug(torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`target` must be int64 of shape \[N\] = \[4\]"):
        aug(torch.ones(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(IndexError, match=r"`target` must hold classes in \[0, 3\)"):
        aug(torch.ones(4, 2), torch.tensor([0, 1, 2, 3]))
