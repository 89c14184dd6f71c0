"""BENCHMARK BASELINE, not part of the package: the hypergradient code path of the
AutoBalance paper's published implementation, re-implemented from its algorithm
(approximate implicit differentiation with a Neumann series, Lorraine et al. 2020,
as the paper's section 3 describes and its code runs it) so that
``bench_hyperstep.py`` can time the package against what a user would otherwise run.

Per hyper-step, with ``n`` training and ``n`` validation batches:

1. the model stays in the mode the published code leaves it in, train mode
   (BatchNorm normalises with the batch's statistics and updates its running
   statistics at every forward); ``mode="eval"`` runs the same path in eval mode
   to compare like with like;
2. ``g = (1/n) sum_i grad_theta L_T(batch_i)`` with ``create_graph=True``; the
   ``n`` graphs stay alive until the end of the hyper-step;
3. ``v = (1/n) sum_i grad_theta L_V(val_i)``;
4. Neumann series, ``eta = 1``, ``J = 5`` in the published code::

       p = v ; c = v ;  repeat J times:  c = c - eta * H c ;  p = p + c ;  p = eta * p

   each ``H c`` one reverse-over-reverse ``torch.autograd.grad(g, theta, c,
   retain_graph=True)`` through all ``n`` kept graphs;
5. the mixed term, one more backward through the kept graphs:
   ``hypergrad = - torch.autograd.grad(g, alpha, p)``.

There is no weight-decay term in ``H`` (the published code puts weight decay in
SGD, outside the loss); compare with a package optimizer without weight decay.
"""
import torch


def _flat(tensors, like):
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like)])


def hypergradient(model, criterion, objective, train_batches, val_batches, theta, alpha, eta=1.0, terms=5,
                  mode="train"):
    """The baseline's hypergradient ``dL_V/dalpha``, flat, for ``(inputs, target)``
    batches; ``theta`` and ``alpha`` are lists of tensors (network weights, loss
    hyperparameters). Leaves the model in ``mode``."""
    model.train(mode == "train")
    n = len(train_batches)
    g = None
    for inputs, target in train_batches:
        grads = torch.autograd.grad(criterion(model(inputs), target), theta, create_graph=True, allow_unused=True)
        part = _flat(grads, theta)
        g = part if g is None else g + part
    g = g / n
    v = None
    for inputs, target in val_batches:
        part = _flat(torch.autograd.grad(objective(model(inputs), target), theta, allow_unused=True), theta)
        v = part if v is None else v + part
    v = v / len(val_batches)
    p, c = v.clone(), v
    for _ in range(terms):
        hc = _flat(torch.autograd.grad(g, theta, c, retain_graph=True, allow_unused=True), theta)
        c = c - eta * hc
        p = p + c
    p = eta * p
    return -_flat(torch.autograd.grad(g, alpha, p, allow_unused=True), alpha)
