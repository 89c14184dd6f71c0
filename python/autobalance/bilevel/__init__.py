"""Bilevel optimisation of the loss hyperparameters (docs/math.md section 5):

- ``optimizer``: ``BilevelOptimizer``, the optimizer wrapper and its schedule;
- ``solvers``: the linear solvers of the implicit hypergradient (``Neumann``,
  ``ConjugateGradient``, ``FirstOrder``) and ``ridge``;
- ``products``: the gradients and Hessian-vector / mixed products;
- ``layers``: convolutions and eval-mode BatchNorm with cheaper second
  derivatives, for the hyper-step's passes;
- ``distributed``: the reductions over DDP ranks.
"""
from autobalance.bilevel.optimizer import HYPER_EVERY, BilevelOptimizer, HyperStepResult
from autobalance.bilevel.solvers import ConjugateGradient, FirstOrder, Neumann, SolverState, ridge

__all__ = ["HYPER_EVERY", "BilevelOptimizer", "ConjugateGradient", "FirstOrder", "HyperStepResult", "Neumann",
           "SolverState", "ridge"]
