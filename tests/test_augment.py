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
    torch.testing.assert_close(grad, per_class[None])


def test_negative_learned_radius_augments_nothing():
    aug = SphericalAugment(2, radius=0.5)
    with torch.no_grad():
        aug.radius_param.fill_(-1.0)
    x = torch.randn(8, 4)
    out = aug(x, torch.zeros(8, dtype=torch.long))
    assert torch.equal(out, x)
    (grad,) = torch.autograd.grad(out.sum(), aug.radius_param)
    assert torch.equal(grad, torch.zeros(1, 2))


def test_same_generator_same_draw():
    aug = SphericalAugment(3, radius=1.0)
    x, y = torch.randn(10, 6), torch.arange(10) % 3
    a = aug(x, y, generator=torch.Generator().manual_seed(5))
    b = aug(x, y, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"`radius` must be finite and >= 0: a number, \[C\] = \[3\] or "
                                         r"\[rows, C\] = \[1, 3\] \(rows = num_groups with group_params, else 1\), "
                                         r"got -0.1\d* at \[row, C\] = \[0, 0\]"):
        SphericalAugment(3, radius=-0.1)
    with pytest.raises(ValueError, match=r"`radius` must be finite and >= 0: .* got shape \[2\]"):
        SphericalAugment(3, radius=torch.ones(2))
    with pytest.raises(ValueError, match=r"\[rows, C\] = \[2, 3\] .* got shape \[3, 3\]"):
        SphericalAugment(3, num_groups=2, radius=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"`radius` must be finite"):
        SphericalAugment(3, radius=float("nan"))
    with pytest.raises(ValueError, match=r"`clusters` must be None or an int64 map of shape \[K\] = \[3\]"):
        SphericalAugment(3, torch.tensor([0, 1]))
    aug = SphericalAugment(3, radius=1.0)
    with pytest.raises(ValueError, match=r"`x` must be a floating-point \[N, \.\.\.\] tensor"):
        aug(torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`target` must be an int64 tensor of shape \[N\] = \[4\]"):
        aug(torch.ones(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(IndexError, match=r"`target` must hold classes in \[0, 3\)"):
        aug(torch.ones(4, 2), torch.tensor([0, 1, 2, 3]))


# ------------------------------------------------------------ groups

def test_strengths_per_group_and_cluster():
    """With groups (ParametricCE's layout) sample i gets the radius of cell
    (group_i, clusters[y_i]), and the gradient reaches only the cells in the batch."""
    clusters = torch.tensor([0, 0, 1, 2])
    radius = torch.tensor([[0.5, 0.0, 2.0], [0.0, 1.0, 0.25]])
    aug = SphericalAugment(4, clusters, num_groups=2, radius=radius)
    assert aug.group_params and aug.radius_param.shape == (2, 3)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 5, generator=gen), torch.arange(400) % 4
    g = (torch.arange(400) // 4) % 2
    g[(y == 3) & (g == 1)] = 0  # cell (1, cluster 2) absent
    out = aug(x, y, g, generator=torch.Generator().manual_seed(2))
    moved = (out - x).detach().norm(dim=1)
    bound = radius[g, clusters[y]]
    assert bool((moved <= bound + 1e-6).all())
    assert float(moved[(g == 0) & (y == 3)].max()) > 1.5 and float(moved[(g == 1) & (y == 2)].max()) > 0.7
    assert float(moved[(g == 1) & (y < 2)].max()) == 0.0
    (grad,) = torch.autograd.grad(out.sum(), aug.radius_param)
    assert grad[1, 2] == 0 and bool((grad.flatten()[:5] != 0).all())
    # the same draw as the per-cell radii applied by hand
    u = unit_ball((400,), 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, x + bound[:, None] * u)


def test_group_params_false_shares_strengths_across_groups():
    from autobalance.augment import ImagePolicy
    aug = SphericalAugment(3, num_groups=4, group_params=False, radius=torch.tensor([0.1, 0.2, 0.3]))
    assert aug.radius_param.shape == (1, 3)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    g = torch.tensor([0, 1, 2, 3, 3, 0])
    a = aug(x, y, g, generator=torch.Generator().manual_seed(3))
    b = aug(x, y, generator=torch.Generator().manual_seed(3))  # the group is not needed
    assert torch.equal(a, b)
    policy = ImagePolicy(4, num_groups=3, magnitude=torch.full((4, 7), 0.3))
    assert policy.magnitudes().shape == policy.probabilities().shape == (3, 4, 7)
    torch.testing.assert_close(policy.magnitudes(), torch.full((3, 4, 7), 0.3))
    images, labels = _images()
    groups = (torch.arange(len(images)) // 4) % 2  # every class in groups 0 and 1; group 2 absent
    out = policy(images, labels, groups, generator=torch.Generator().manual_seed(4))
    dm, dp = torch.autograd.grad(out.square().sum(), [policy.magnitude_param, policy.probability_param])
    assert float(dm[2].abs().sum()) == float(dp[2].abs().sum()) == 0 and float(dm[:2].abs().min()) > 0


def test_group_arguments_are_checked():
    aug = SphericalAugment(3, num_groups=2, radius=0.5)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"`group` is needed: this augmentation has strengths per group "
                                         r"\(num_groups = 2, group_params=True\)"):
        aug(x, y)
    with pytest.raises(ValueError, match=r"`group` must be an int64 tensor of shape \[N\] = \[4\], got "
                                         r"torch.int32 of shape \[4\]"):
        aug(x, y, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(IndexError, match=r"`group` must hold groups in \[0, 2\), got values in \[0, 2\]"):
        aug(x, y, torch.tensor([0, 1, 2, 0]))
    aug.eval()  # nothing is applied, so nothing is indexed: the values are not checked
    assert aug(x, y, torch.tensor([0, 1, 2, 0])) is x
    with pytest.raises(ValueError, match=r"`num_groups` must be an int >= 1, got 0"):
        SphericalAugment(3, num_groups=0)


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
    assert dm.shape == dp.shape == (1, 3, 1)
    assert bool((dm[0, :2] != 0).all()) and bool((dp[0, :2] != 0).all())
    assert float(dm[0, 2].abs().sum()) == 0 and float(dp[0, 2].abs().sum()) == 0  # cluster 2: class 3 only


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
    with pytest.raises(ValueError, match=r"`magnitude` must be in the open interval \(0, 1\): a number, \[C, ops\] = "
                                         r"\[4, 7\] or \[rows, C, ops\] = \[1, 4, 7\]"):
        ImagePolicy(4, magnitude=1.5)
    with pytest.raises(ValueError, match=r"`probability` must be in the open interval \(0, 1\): .* got 0.0 at \[row, C, ops\] = \[0, 0, 0\]"):
        ImagePolicy(4, probability=0.0)
    with pytest.raises(ValueError, match="`temperature` must be a positive finite float"):
        ImagePolicy(4, temperature=0)
    with pytest.raises(ValueError, match=r"ImagePolicy takes images: `x` must be a floating-point \[N, channels, H, W\]"):
        ImagePolicy(4)(torch.randn(5, 10), torch.zeros(5, dtype=torch.long))
