"""Validation objectives ``L_V`` of the bilevel problem (docs/math.md section 6;
paper sections 2.1 and 4).

Each objective is an ``nn.Module`` called as ``objective(logits, target,
group=None)`` that returns a scalar. Objectives have no parameters the
bilevel optimizer tunes: ``L_V`` depends on the network weights only
(docs/math.md section 5).

Per-cell losses ``L[g, k]`` (the mean CE over the samples of group ``g``
and class ``k``; cells are ``[G, K]``, as the loss tables) are computed per call, i.e. per validation batch. A cell
with no sample in the batch has no loss; every objective then averages (or
takes the max / min / soft-max) over the cells that are present, and a class
with no sample at all is left out of the class average. Cell sums use a
one-hot matrix product rather than scatter-adds, so they are deterministic
on every device.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from autobalance._validation import check_fraction, check_int, check_labels, check_positive


class CellMeans(NamedTuple):
    """Per-(group, class) means ``[G, K]`` and which cells have samples."""
    mean: torch.Tensor
    count: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        return self.count > 0


def cell_index(target: torch.Tensor, group: Optional[torch.Tensor], num_classes: int,
               num_groups: int) -> torch.Tensor:
    """The flat index ``group * K + target`` of each sample's ``[G, K]`` cell, after checking
    ``target`` (``[N]`` int64 in ``[0, K)``) and ``group`` (``[N]`` int64 in
    ``[0, G)``; may be None only when ``G = 1``)."""
    check_labels(target, "target", num_classes, "classes")
    if group is None:
        if num_groups != 1:
            raise ValueError(f"autobalance: `group` is required when num_groups = {num_groups} > 1")
        return target
    check_labels(group, "group", num_groups, "groups", like=target)
    return group * num_classes + target


def cell_means(values: torch.Tensor, target: torch.Tensor, group: Optional[torch.Tensor],
               num_classes: int, num_groups: int = 1) -> CellMeans:
    """Means of per-sample ``values`` over each (group, class) cell (docs/math.md section 6).

    Returns ``CellMeans(mean [G, K], count [G, K])``; an empty cell has mean 0
    and count 0. Differentiable w.r.t. ``values``.
    """
    return _cell_means(values, cell_index(target, group, num_classes, num_groups), num_classes, num_groups)


def _cell_means(values, index, num_classes, num_groups):
    one_hot = F.one_hot(index, num_classes * num_groups).to(values.dtype)
    count = one_hot.sum(0)
    mean = (values @ one_hot) / count.clamp(min=1)
    return CellMeans(mean.view(num_groups, num_classes), count.view(num_groups, num_classes))


def _per_sample_ce(logits, target):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"autobalance: `logits` must have shape [N, K], got {got}")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, target, reduction="none")


class _CellObjective(nn.Module):
    """An objective computed from the per-cell mean CE ``L[g, k]``."""

    def __init__(self, num_classes: int, num_groups: int = 1):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes")
        self.num_groups = check_int(num_groups, "num_groups")

    def cell_losses(self, logits, target, group=None) -> CellMeans:
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] != self.num_classes:
            raise ValueError(f"autobalance: `logits` must have K = {self.num_classes} columns, got shape "
                             f"{list(logits.shape)}")
        index = cell_index(target, group, self.num_classes, self.num_groups)
        return _cell_means(_per_sample_ce(logits, target), index, self.num_classes, self.num_groups)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_groups={self.num_groups}"


class CrossEntropy(nn.Module):
    """``CE``: the plain mean cross-entropy over the batch (groups are ignored)."""

    def forward(self, logits, target, group=None):
        return _per_sample_ce(logits, target).mean()


class BalancedCE(_CellObjective):
    """``CE_bal = (1/K) sum_k L_k``, the class-balanced CE (paper section 3's
    validation loss), averaged over the classes present in the batch. Groups
    are ignored."""

    def __init__(self, num_classes: int):
        super().__init__(num_classes, 1)

    def forward(self, logits, target, group=None):
        cells = self.cell_losses(logits, target, None)
        return cells.mean[cells.present].mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class GroupBalancedCE(_CellObjective):
    """``CE_bal^G = (1/(G K)) sum_{g,k} L[g, k]``, averaged over the (group,
    class) cells present in the batch."""

    def forward(self, logits, target, group=None):
        cells = self.cell_losses(logits, target, group)
        return cells.mean[cells.present].mean()


class DeoCE(_CellObjective):
    """``CE_deo = sum_k (max_g L[g, k] - min_g L[g, k])`` over the groups present
    for class ``k`` (paper eq. 4.1 for ``K = G = 2``); a class present in fewer
    than two groups contributes 0."""

    def forward(self, logits, target, group=None):
        cells = self.cell_losses(logits, target, group)
        present = cells.present
        inf = torch.tensor(float("inf"), dtype=cells.mean.dtype, device=cells.mean.device)
        high = torch.where(present, cells.mean, -inf).amax(0)
        low = torch.where(present, cells.mean, inf).amin(0)
        spread = torch.where(present.sum(0) >= 2, high - low, torch.zeros_like(high))
        return spread.sum()


class SoftWorstCellCE(_CellObjective):
    """Soft worst cell ``(1/beta) log sum_{g,k} exp(beta L[g, k])`` over the cells
    present in the batch: between ``max L`` and ``max L + log(cells) / beta``."""

    def __init__(self, num_classes: int, num_groups: int = 1, beta: float = 10.0):
        super().__init__(num_classes, num_groups)
        self.beta = check_positive(beta, "beta")

    def forward(self, logits, target, group=None):
        cells = self.cell_losses(logits, target, group)
        return torch.logsumexp(self.beta * cells.mean[cells.present], 0) / self.beta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"


class Blend(nn.Module):
    """``(1 - lam) CE + lam R`` for a fairness term ``R`` (another objective),
    e.g. ``Blend(BalancedCE(K), 0.5)`` or the paper's ``Blend(DeoCE(2, 2), 0.9)``."""

    def __init__(self, regulariser: nn.Module, lam: float):
        super().__init__()
        if not isinstance(regulariser, nn.Module):
            raise TypeError(f"autobalance: `regulariser` must be an objective module, got "
                            f"{type(regulariser).__name__}")
        self.regulariser, self.lam = regulariser, check_fraction(lam, "lam", closed=True)
        self.ce = CrossEntropy()

    def forward(self, logits, target, group=None):
        return (1.0 - self.lam) * self.ce(logits, target, group) + self.lam * self.regulariser(logits, target, group)

    def extra_repr(self) -> str:
        return f"lam={self.lam}"
