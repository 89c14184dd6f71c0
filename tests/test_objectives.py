"""Validation objectives (docs/math.md section 6)."""
import math

import pytest
import torch
import torch.nn.functional as F

from autobalance.objectives import (BalancedCE, Blend, CrossEntropy, DeoCE, GroupBalancedCE, SoftWorstCellCE,
                                    cell_means)


def data(seed=0, n=40, classes=3, groups=2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64, requires_grad=True)
    return logits, torch.randint(0, classes, (n,), generator=g), torch.randint(0, groups, (n,), generator=g)


def cell_loss(logits, y, grp, k, j):
    mask = (y == k) & (grp == j)
    return F.cross_entropy(logits[mask], y[mask])


def test_cross_entropy_is_plain_mean_ce():
    logits, y, grp = data()
    torch.testing.assert_close(CrossEntropy()(logits, y, grp), F.cross_entropy(logits, y))


def test_balanced_ce_averages_class_means():
    logits, y, _ = data()
    expected = sum(F.cross_entropy(logits[y == k], y[y == k]) for k in range(3)) / 3
    torch.testing.assert_close(BalancedCE(3)(logits, y), expected)
    # with equal class counts it is the plain CE
    balanced = torch.arange(30) % 3
    torch.testing.assert_close(BalancedCE(3)(logits[:30], balanced), F.cross_entropy(logits[:30], balanced))


def test_absent_classes_are_left_out_of_the_average():
    logits, _, _ = data()
    y = torch.tensor([0, 0, 2, 2, 2] * 8)  # class 1 absent
    expected = (F.cross_entropy(logits[y == 0], y[y == 0]) + F.cross_entropy(logits[y == 2], y[y == 2])) / 2
    torch.testing.assert_close(BalancedCE(3)(logits, y), expected)


def test_group_balanced_ce_averages_cell_means():
    logits, y, grp = data()
    expected = sum(cell_loss(logits, y, grp, k, j) for k in range(3) for j in range(2)) / 6
    torch.testing.assert_close(GroupBalancedCE(3, 2)(logits, y, grp), expected)


def test_deo_ce_is_paper_eq_4_1_for_two_classes_and_groups():
    logits, y, grp = data(classes=2)
    loss = lambda k, j: cell_loss(logits, y, grp, k, j)  # noqa: E731
    expected = (loss(1, 0) - loss(1, 1)).abs() + (loss(0, 0) - loss(0, 1)).abs()
    torch.testing.assert_close(DeoCE(2, 2)(logits, y, grp), expected)


def test_deo_ce_general_spread_and_single_group_classes():
    logits, y, _ = data(classes=3, groups=3)
    grp = torch.where(y == 2, torch.zeros_like(y), torch.arange(len(y)) % 3)  # class 2 only in group 0
    expected = sum(max(cell_loss(logits, y, grp, k, j) for j in range(3))
                   - min(cell_loss(logits, y, grp, k, j) for j in range(3)) for k in range(2))
    torch.testing.assert_close(DeoCE(3, 3)(logits, y, grp), expected)


def test_soft_worst_cell_bounds_the_worst_cell():
    logits, y, grp = data()
    cells = torch.stack([cell_loss(logits, y, grp, k, j) for k in range(3) for j in range(2)])
    for beta in (1.0, 10.0, 1000.0):
        value = SoftWorstCellCE(3, 2, beta=beta)(logits, y, grp)
        torch.testing.assert_close(value, torch.logsumexp(beta * cells, 0) / beta)
        assert cells.max() <= value <= cells.max() + math.log(6) / beta + 1e-12


def test_blend_interpolates_ce_and_the_regulariser():
    logits, y, grp = data()
    reg = GroupBalancedCE(3, 2)
    ce, r = CrossEntropy()(logits, y), reg(logits, y, grp)
    torch.testing.assert_close(Blend(reg, 0.0)(logits, y, grp), ce)
    torch.testing.assert_close(Blend(reg, 1.0)(logits, y, grp), r)
    torch.testing.assert_close(Blend(reg, 0.9)(logits, y, grp), 0.1 * ce + 0.9 * r)


@pytest.mark.parametrize("objective", [CrossEntropy(), BalancedCE(3), GroupBalancedCE(3, 2), DeoCE(3, 2),
                                       SoftWorstCellCE(3, 2), Blend(DeoCE(3, 2), 0.5)])
def test_objectives_are_differentiable_deterministic_and_parameter_free(objective):
    logits, y, grp = data(3)
    first = objective(logits, y, grp)
    grad = torch.autograd.grad(first, logits)[0]
    assert first.dim() == 0 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.equal(first, objective(logits, y, grp))
    assert torch.equal(grad, torch.autograd.grad(objective(logits, y, grp), logits)[0])
    assert not list(objective.parameters())


def test_cell_means_counts_and_empty_cells():
    values = torch.tensor([1.0, 3.0, 5.0, 7.0])
    cells = cell_means(values, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]), 3, 2)
    # [G, K] = [2, 3], as the loss tables
    torch.testing.assert_close(cells.mean, torch.tensor([[2.0, 5.0, 0.0], [0.0, 7.0, 0.0]]))
    assert cells.count.tolist() == [[2, 1, 0], [0, 1, 0]]
    assert cells.present.tolist() == [[True, True, False], [False, True, False]]


def test_bad_input_raises_clear_errors():
    logits, y, grp = data()
    with pytest.raises(IndexError, match=r"`target` must hold classes in \[0, 2\)"):
        BalancedCE(2)(logits[:, :2], y)
    with pytest.raises(ValueError, match="`group` is required when num_groups = 2"):
        GroupBalancedCE(3, 2)(logits, y)
    with pytest.raises(IndexError, match=r"`group` must hold groups in \[0, 1\)"):
        GroupBalancedCE(3, 1)(logits, y, grp)
    with pytest.raises(ValueError, match="`logits` must have K = 4 columns"):
        BalancedCE(4)(logits, y)
    with pytest.raises(ValueError, match="`target` must be an int64 tensor"):
        BalancedCE(3)(logits, y.float())
    with pytest.raises(ValueError, match=r"`lam` must be a number in the interval \[0, 1\]"):
        Blend(BalancedCE(3), 1.5)
    with pytest.raises(ValueError, match="`beta` must be a positive"):
        SoftWorstCellCE(3, beta=0)
    with pytest.raises(ValueError, match="`num_classes` must be an int >= 1"):
        BalancedCE(0)
