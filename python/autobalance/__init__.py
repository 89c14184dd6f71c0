"""AutoBalance: a parametric cross-entropy whose per-class / per-group
parameters are tuned on validation data by bilevel optimisation (Li et al.,
NeurIPS 2021), with fused CPU/CUDA kernels for the loss and its first and
second derivatives.

The library needs only torch and numpy. The experiments (data sets, models,
recipes, report, the ``autobalance`` command) are the separate package
``autobalance.experiments`` (install extra ``experiments``); the library never
imports them. The math is in ``docs/math.md``, the layout in
``docs/architecture.md``.
"""
from autobalance.bilevel import BilevelOptimizer, HyperStepResult
from autobalance.functional import parametric_cross_entropy
from autobalance.losses import (GroupDRO, LATemperature, LDAMLoss, LossTables, ParametricCE, frequency_clusters,
                                loss_tables)
from autobalance.metrics import (ErrorCounts, balanced_error, cell_errors, deo_error, group_balanced_error,
                                 per_class_error, standard_error, worst_cell_error)
from autobalance.objectives import BalancedCE, Blend, CrossEntropy, DeoCE, GroupBalancedCE, SoftWorstCellCE
from autobalance.testing import HypergradCheck, check_hypergrad

__all__ = ["BalancedCE", "BilevelOptimizer", "Blend", "CrossEntropy", "DeoCE", "ErrorCounts", "GroupBalancedCE",
           "GroupDRO", "HyperStepResult", "HypergradCheck", "LATemperature", "LDAMLoss", "LossTables",
           "ParametricCE", "SoftWorstCellCE", "balanced_error", "cell_errors", "check_hypergrad", "deo_error",
           "frequency_clusters", "group_balanced_error", "loss_tables", "parametric_cross_entropy",
           "per_class_error", "standard_error", "worst_cell_error"]
__version__ = "0.1.0"
