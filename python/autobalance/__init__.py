"""AutoBalance: a parametric cross-entropy whose per-class / per-group
parameters are tuned on validation data by bilevel optimisation (Li et al.,
NeurIPS 2021), with fused CPU/CUDA kernels for the loss and its first and
second derivatives."""
from autobalance.functional import parametric_cross_entropy
from autobalance.losses import LossTables, ParametricCE, frequency_clusters, loss_tables

__all__ = ["LossTables", "ParametricCE", "frequency_clusters", "loss_tables", "parametric_cross_entropy"]
__version__ = "0.1.0"
