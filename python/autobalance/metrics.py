"""Test metrics of docs/math.md section 6 (paper sections 1.1 and 4).

Every metric is a function of the per-(class, group) sample and error counts.
The functions take ``(prediction, target, group=None, *, num_classes,
num_groups=1)`` where ``prediction`` is ``[N]`` int64 predicted classes or
``[N, K]`` logits (the prediction is then the arg-max, first index on ties);
``ErrorCounts`` accumulates the same counts over a data loader and reports
every metric at once.

Empty cells have no error rate: averages and maxima run over the cells (or
classes) that have at least one sample; the per-class error of an absent
class is NaN. A metric with no present cell at all is NaN.
"""
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

from autobalance._validation import check_int
from autobalance.objectives import cell_index


class CellErrors(NamedTuple):
    """``total[g, k]`` samples and ``errors[g, k]`` misclassified samples per (group, class)
    cell, int64 ``[G, K]``."""
    total: torch.Tensor
    errors: torch.Tensor


def cell_errors(prediction: torch.Tensor, target: torch.Tensor, group: Optional[torch.Tensor] = None, *,
                num_classes: int, num_groups: int = 1) -> CellErrors:
    """Samples and errors per (group, class) cell."""
    check_int(num_classes, "num_classes")
    check_int(num_groups, "num_groups")
    if not isinstance(prediction, torch.Tensor):
        raise TypeError(f"autobalance: `prediction` must be a Tensor, got {type(prediction).__name__}")
    if prediction.dim() == 2:
        if prediction.shape[1] != num_classes:
            raise ValueError(f"autobalance: logits `prediction` must have shape [N, K = {num_classes}], got "
                             f"{list(prediction.shape)}")
        prediction = prediction.argmax(1)
    index = cell_index(target, group, num_classes, num_groups)
    if prediction.dim() != 1 or prediction.shape != target.shape or prediction.is_floating_point():
        raise ValueError(f"autobalance: `prediction` must be [N] = {list(target.shape)} integer classes or "
                         f"[N, K] logits, got {prediction.dtype} of shape {list(prediction.shape)}")
    cells = num_classes * num_groups
    # integer one-hot sums rather than scatter-adds: exact and deterministic on every device
    one_hot = F.one_hot(index, cells)
    total = one_hot.sum(0).view(num_groups, num_classes).cpu()
    errors = (one_hot * (prediction != target).long()[:, None]).sum(0).view(num_groups, num_classes).cpu()
    return CellErrors(total, errors)


def _rates(counts: CellErrors):
    total, errors = counts
    return errors.double() / total.clamp(min=1).double(), total > 0


def _nan():
    return float("nan")


def _standard_error(counts, cell_weights=None):
    if cell_weights is None:
        total = int(counts.total.sum())
        return int(counts.errors.sum()) / total if total else _nan()
    rate, present = _rates(counts)
    weights = torch.as_tensor(cell_weights, dtype=torch.float64).reshape(-1)
    if weights.numel() != rate.numel() or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"autobalance: `cell_weights` must be [G, K] = {list(rate.shape)} non-negative finite "
                         f"cell frequencies ([K] when G = 1), got {list(torch.as_tensor(cell_weights).shape)}")
    weights = weights.view_as(rate) * present
    if float(weights.sum()) == 0.0:
        return _nan()
    return float((weights * rate).sum() / weights.sum())


def _per_class_error(counts):
    total, errors = counts.total.sum(0), counts.errors.sum(0)
    rate = errors.double() / total.clamp(min=1).double()
    return torch.where(total > 0, rate, torch.full_like(rate, _nan()))


def _balanced_error(counts):
    rate = _per_class_error(counts)
    present = ~rate.isnan()
    return float(rate[present].mean()) if bool(present.any()) else _nan()


def _worst_cell_error(counts):
    rate, present = _rates(counts)
    return float(rate[present].max()) if bool(present.any()) else _nan()


def _group_balanced_error(counts):
    rate, present = _rates(counts)
    return float(rate[present].mean()) if bool(present.any()) else _nan()


def _deo_error(counts):
    rate, present = _rates(counts)
    if not bool(present.any()):
        return _nan()
    inf = torch.tensor(float("inf"), dtype=rate.dtype)
    spread = torch.where(present, rate, -inf).amax(0) - torch.where(present, rate, inf).amin(0)
    return float(torch.where(present.sum(0) >= 2, spread, torch.zeros_like(spread)).sum())


def standard_error(prediction, target, group=None, *, num_classes, num_groups=1, cell_weights=None) -> float:
    """Fraction misclassified. With ``cell_weights`` (``[G, K]``, or ``[K]`` when
    ``G = 1``: cell frequencies ``pi``) it is the reweighted error
    ``sum pi[g, k] E[g, k] / sum pi[g, k]`` over the cells present."""
    return _standard_error(cell_errors(prediction, target, group, num_classes=num_classes,
                                       num_groups=num_groups), cell_weights)


def balanced_error(prediction, target, group=None, *, num_classes, num_groups=1) -> float:
    """``E_bal = (1/K) sum_k E_k`` over the classes present."""
    return _balanced_error(cell_errors(prediction, target, group, num_classes=num_classes, num_groups=num_groups))


def per_class_error(prediction, target, group=None, *, num_classes, num_groups=1) -> torch.Tensor:
    """``E_k`` as a float64 ``[K]`` tensor; NaN for a class with no sample."""
    return _per_class_error(cell_errors(prediction, target, group, num_classes=num_classes,
                                        num_groups=num_groups))


def worst_cell_error(prediction, target, group=None, *, num_classes, num_groups=1) -> float:
    """``max_{g,k} E[g, k]`` over the (group, class) cells present."""
    return _worst_cell_error(cell_errors(prediction, target, group, num_classes=num_classes,
                                         num_groups=num_groups))


def group_balanced_error(prediction, target, group=None, *, num_classes, num_groups=1) -> float:
    """``E_bal^G = (1/(G K)) sum_{g,k} E[g, k]`` over the cells present."""
    return _group_balanced_error(cell_errors(prediction, target, group, num_classes=num_classes,
                                             num_groups=num_groups))


def deo_error(prediction, target, group=None, *, num_classes, num_groups=1) -> float:
    """``E_deo = sum_k (max_g E[g, k] - min_g E[g, k])`` over the groups present
    for each class (paper eq. 4.1 for ``K = G = 2``)."""
    return _deo_error(cell_errors(prediction, target, group, num_classes=num_classes, num_groups=num_groups))


class ErrorCounts:
    """Accumulates ``CellErrors`` over a data loader::

        counts = ErrorCounts(num_classes=10)
        for x, y in test_loader:
            counts.update(model(x), y)
        counts.compute()   # {"standard_error": ..., "balanced_error": ..., ...}

    ``update`` takes the arguments of the metric functions; counts are kept
    on the CPU as int64, so the result does not depend on how the data were
    batched.
    """

    def __init__(self, *, num_classes: int, num_groups: int = 1, cell_weights=None):
        self.num_classes = check_int(num_classes, "num_classes")
        self.num_groups = check_int(num_groups, "num_groups")
        self.cell_weights = cell_weights
        self.reset()

    def reset(self) -> None:
        shape = (self.num_groups, self.num_classes)
        self.counts = CellErrors(torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long))

    def update(self, prediction, target, group=None) -> None:
        new = cell_errors(prediction, target, group, num_classes=self.num_classes, num_groups=self.num_groups)
        self.counts = CellErrors(self.counts.total + new.total, self.counts.errors + new.errors)

    def compute(self) -> Dict[str, object]:
        """Every metric of this module, from the counts so far."""
        c = self.counts
        return {"standard_error": _standard_error(c, self.cell_weights),
                "balanced_error": _balanced_error(c),
                "per_class_error": _per_class_error(c),
                "worst_cell_error": _worst_cell_error(c),
                "group_balanced_error": _group_balanced_error(c),
                "deo_error": _deo_error(c)}

    def __repr__(self) -> str:
        return (f"ErrorCounts(num_classes={self.num_classes}, num_groups={self.num_groups}, "
                f"samples={int(self.counts.total.sum())})")
