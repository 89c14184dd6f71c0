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


# ------------------------------------------------------------ the image policy

def _images(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 9, generator=gen), torch.arange(n) % 4


def test_image_policy_identity_in_eval_and_at_zero_magnitude():
    from autobalance.augment import ImagePolicy
    x, y = _images()
    policy = ImagePolicy(4, magnitude=1e-7, probability=0.999)
    out = policy(x, y, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    policy.eval()
    assert policy(x, y) is x


@pytest.mark.parametrize("op", ["translate_x", "translate_y", "rotate", "shear", "brightness", "contrast", "noise"])
def test_image_policy_ops_change_images_and_give_gradients(op):
    """Each op moves the images and gives its magnitude and probability a gradient,
    only in the clusters that the batch's labels reach."""
    from autobalance.augment import ImagePolicy
    x, y = _images()
    y = torch.where(y == 3, torch.zeros_like(y), y)  # class 3 absent
    policy = ImagePolicy(4, torch.tensor([0, 1, 1, 2]), ops=(op,), magnitude=0.6, probability=0.7)
    out = policy(x, y, generator=torch.Generator().manual_seed(2))
    assert out.shape == x.shape and float((out - x).detach().abs().max()) > 1e-3
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    dm, dp = torch.autograd.grad((out * weights).sum(), [policy.magnitude_param, policy.probability_param])
    assert bool((dm[:2] != 0).all()) and bool((dp[:2] != 0).all())
    assert float(dm[2].abs().sum()) == 0 and float(dp[2].abs().sum()) == 0  # cluster 2: class 3 only


def test_image_policy_gradients_match_finite_differences():
    from autobalance.augment import ImagePolicy
    x, y = _images(6, seed=4)
    policy = ImagePolicy(4, ops=("rotate", "contrast", "translate_x"), magnitude=0.4, probability=0.6).double()
    x = x.double()

    def f(mag, prob):
        params = {"magnitude_param": mag, "probability_param": prob}
        out = torch.func.functional_call(policy, params, (x, y), {"generator": torch.Generator().manual_seed(5)})
        return (out ** 2).sum()
    mag, prob = policy.magnitude_param.detach().clone(), policy.probability_param.detach().clone()
    assert torch.autograd.gradcheck(f, (mag.requires_grad_(), prob.requires_grad_()))


def test_image_policy_bad_arguments():
    from autobalance.augment import ImagePolicy
    with pytest.raises(ValueError, match="`ops` must be distinct names from"):
        ImagePolicy(4, ops=("rotate", "solarize"))
    with pytest.raises(ValueError, match=r"`magnitude` must be a number or a \[C, ops\] = \[4, 7\] tensor in the open "
                                         r"interval \(0, 1\)"):
        ImagePolicy(4, magnitude=1.5)
    with pytest.raises(ValueError, match=r"`probability` must be .* in the open interval \(0, 1\)"):
        ImagePolicy(4, probability=0.0)
    with pytest.raises(ValueError, match="`temperature` must be a positive finite float"):
        ImagePolicy(4, temperature=0)
    with pytest.raises(ValueError, match=r"ImagePolicy takes images: `x` must be a floating-point \[N, channels, H, W\]"):
        ImagePolicy(4)(torch.randn(5, 10), torch.zeros(5, dtype=torch.long))
