"""Test metrics (docs/math.md section 6)."""
import math

import pytest
import torch

from autobalance.metrics import (ErrorCounts, balanced_error, cell_errors, deo_error, group_balanced_error,
                                 per_class_error, standard_error, worst_cell_error)

# 2 groups x 2 classes; per cell (group, class): samples, errors
#   (0, 0): 4 samples, 1 wrong   (0, 1): 3 samples, 0 wrong
#   (1, 0): 2 samples, 2 wrong   (1, 1): 1 sample,  1 wrong
TARGET = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
GROUP = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0, 0, 1])
PRED = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 0])
ARGS = dict(num_classes=2, num_groups=2)


def test_cell_counts():
    counts = cell_errors(PRED, TARGET, GROUP, **ARGS)
    assert counts.total.tolist() == [[4, 3], [2, 1]]  # [G, K], as the loss tables
    assert counts.errors.tolist() == [[1, 0], [2, 1]]


def test_metric_values():
    assert standard_error(PRED, TARGET, GROUP, **ARGS) == pytest.approx(4 / 10)
    assert balanced_error(PRED, TARGET, GROUP, **ARGS) == pytest.approx((3 / 6 + 1 / 4) / 2)
    assert per_class_error(PRED, TARGET, GROUP, **ARGS).tolist() == pytest.approx([3 / 6, 1 / 4])
    assert worst_cell_error(PRED, TARGET, GROUP, **ARGS) == pytest.approx(1.0)
    assert group_balanced_error(PRED, TARGET, GROUP, **ARGS) == pytest.approx((1 / 4 + 1 + 0 + 1) / 4)
    # paper eq. 4.1 with errors: |E[0, 0] - E[1, 0]| + |E[0, 1] - E[1, 1]| (cells [group, class])
    assert deo_error(PRED, TARGET, GROUP, **ARGS) == pytest.approx(abs(1 / 4 - 1) + abs(0 - 1))


def test_reweighted_standard_error():
    weights = torch.tensor([[0.1, 0.3], [0.2, 0.4]])  # [G, K]
    expected = 0.1 * 1 / 4 + 0.2 * 1 + 0.3 * 0 + 0.4 * 1
    assert standard_error(PRED, TARGET, GROUP, cell_weights=weights, **ARGS) == pytest.approx(expected)
    # cell frequencies of the data themselves give the plain error
    counts = cell_errors(PRED, TARGET, GROUP, **ARGS)
    assert standard_error(PRED, TARGET, GROUP, cell_weights=counts.total.double(), **ARGS) == pytest.approx(0.4)
    # uniform class weights (G = 1) give the balanced error
    assert standard_error(PRED, TARGET, num_classes=2, cell_weights=[1.0, 1.0]) == pytest.approx(
        balanced_error(PRED, TARGET, num_classes=2))


def test_logits_and_predictions_agree():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 3, generator=g)
    target = torch.randint(0, 3, (50,), generator=g)
    for fn in (standard_error, balanced_error, worst_cell_error, group_balanced_error, deo_error):
        assert fn(logits, target, num_classes=3) == fn(logits.argmax(1), target, num_classes=3)


def test_absent_cells_and_classes():
    target = torch.tensor([0, 0, 2])
    pred = torch.tensor([0, 1, 2])
    per_class = per_class_error(pred, target, num_classes=3)
    assert per_class[0] == 0.5 and math.isnan(per_class[1]) and per_class[2] == 0.0
    assert balanced_error(pred, target, num_classes=3) == pytest.approx(0.25)
    assert worst_cell_error(pred, target, num_classes=3) == pytest.approx(0.5)
    # a class seen in a single group has no spread
    assert deo_error(pred, target, torch.tensor([0, 0, 1]), num_classes=3, num_groups=2) == 0.0
    empty = torch.zeros(0, dtype=torch.long)
    assert math.isnan(standard_error(empty, empty, num_classes=3))
    assert math.isnan(balanced_error(empty, empty, num_classes=3))


def test_accumulator_matches_one_shot_over_batches():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(101, 4, generator=g)
    target = torch.randint(0, 4, (101,), generator=g)
    group = torch.randint(0, 3, (101,), generator=g)
    counts = ErrorCounts(num_classes=4, num_groups=3)
    for start in range(0, 101, 17):
        counts.update(logits[start:start + 17], target[start:start + 17], group[start:start + 17])
    result = counts.compute()
    args = dict(num_classes=4, num_groups=3)
    assert result["standard_error"] == standard_error(logits, target, group, **args)
    assert result["balanced_error"] == balanced_error(logits, target, group, **args)
    assert result["worst_cell_error"] == worst_cell_error(logits, target, group, **args)
    assert result["group_balanced_error"] == group_balanced_error(logits, target, group, **args)
    assert result["deo_error"] == deo_error(logits, target, group, **args)
    assert torch.equal(result["per_class_error"], per_class_error(logits, target, group, **args))
    assert "samples=101" in repr(counts)
    counts.reset()
    assert int(counts.counts.total.sum()) == 0


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"logits `prediction` must have shape \[N, K = 3\]"):
        standard_error(torch.randn(10, 2), TARGET, num_classes=3)
    with pytest.raises(ValueError, match="`prediction` must be"):
        standard_error(PRED[:5], TARGET, num_classes=2)
    with pytest.raises(IndexError, match="`target` must hold classes"):
        standard_error(PRED, TARGET + 5, num_classes=2)
    with pytest.raises(ValueError, match="`cell_weights` must be"):
        standard_error(PRED, TARGET, GROUP, cell_weights=torch.ones(3), **ARGS)
    with pytest.raises(ValueError, match="`num_groups` must be an int >= 1"):
        ErrorCounts(num_classes=2, num_groups=0)
