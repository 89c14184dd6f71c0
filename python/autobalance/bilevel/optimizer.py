"""``BilevelOptimizer``: the paper's Algorithm 1 with hypergradients by
approximate implicit differentiation (docs/math.md section 5; paper sections 2.1,
2.2 and the implementation paragraphs of section 3), and its schedule.

Notation as in docs/math.md: ``theta`` the network weights (or a chosen subset),
``alpha`` the loss hyperparameters (the learnable ``nn.Parameter``s of the
criterion, e.g. ``ParametricCE.scale_param`` / ``shift_param`` in cluster
space, docs/math.md section 2), ``L_T`` the training loss, ``L_V`` the validation
objective (docs/math.md section 6), ``H = d^2 L_T / d theta^2``.
"""
import math
import numbers
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from autobalance._validation import check_int, check_non_negative, check_positive
from autobalance.bilevel.distributed import (max_over_ranks, mean_over_ranks, ordered_mean_over_ranks, process_group,
                                            rank_in)
from autobalance.bilevel.layers import hyper_passes
from autobalance.bilevel.products import TrainGradients, flat, graph_budget, split, validation_gradient
from autobalance.bilevel.solvers import Solver, SolverState, make_solver, ridge
from autobalance.losses import ParametricCE

HYPER_EVERY = 20  # training steps between hyper-steps, as in the published code (docs/math.md section 5)
# A hyper-step's augmentation of training batch i is drawn with a generator seeded
# augment_seed(hyper-steps before it, rank * batches per rank + i): the same draw in
# every product, another on every rank and batch, and under DDP the draws one process
# would make of all ranks' batches in rank order.
AUGMENT_SEED_STRIDE = 1_000_003


def augment_seed(draws: int, batch: int) -> int:
    """The seed of the augmentation draw of (global) training batch ``batch`` in the
    hyper-step taken after ``draws`` augmented ones."""
    return AUGMENT_SEED_STRIDE * draws + batch

Batch = Tuple[torch.Tensor, ...]
BatchSource = Union[Iterable[Batch], Callable[[], Batch]]


class HyperStepResult(NamedTuple):
    """What one hyper-step did. ``applied`` is False for a skipped step, and then
    ``skip_reason`` says why (``BilevelOptimizer``'s "Applying it"); ``hypergrad_norm``
    is the norm after gauge fixing and before clipping;
    ``train_loss`` / ``val_loss`` are this rank's means over its batches;
    ``step_size`` is the Neumann / first-order ``eta`` (None for CG);
    ``kept_graphs`` is how many of the training batches' graphs were kept for the
    solver's products (the rest were rebuilt for each, see ``graph_memory``) and
    ``graph_bytes`` their measured size if all were kept."""
    applied: bool
    hypergrad_norm: float
    train_loss: float
    val_loss: float
    step_size: Optional[float]
    kept_graphs: int = 1
    graph_bytes: int = 0
    skip_reason: Optional[str] = None


def _unsound(val_loss, train_loss, v, p, state, hypergrad, group) -> Optional[str]:
    """Why a hyper-step's results cannot be applied, or None (docs/math.md section 5,
    "Applying it"): a non-finite loss, validation gradient ``v``, solution ``p`` (or CG
    residual) or hypergradient (the mixed term), or a zero ``v``, ``p`` or hypergradient,
    which only degenerate batches give (no row counted, a solver that stopped before its
    first step) and which would still move ``alpha`` through the hyper-optimizer's
    momentum. Under DDP a reason on any rank is one on every rank (the losses are each
    rank's own), so all ranks skip together, with the same reason (the values are in
    ``HyperStepResult``)."""
    reasons = ["the validation loss is not finite", "the training loss is not finite",
               "the solver's residual is not finite",
               "the validation gradient is not finite",
               "the validation gradient is zero (no validation row reached the loss)",
               "the solver's solution is not finite",
               "the solver's solution is zero (it stopped before its first step, e.g. at a direction of "
               "non-positive curvature)",
               "the hypergradient (the mixed term) is not finite",
               "the hypergradient (the mixed term) is zero (the training batches do not depend on the "
               "hyperparameters, e.g. every label ignored)"]
    host = [not math.isfinite(val_loss), not math.isfinite(train_loss),
            state.residual is not None and not math.isfinite(state.residual)]
    # (not finite, zero) of each vector, on its device: one transfer for all of them
    flags = torch.cat([torch.stack([~torch.isfinite(t).all(), ~t.any()]) for t in (v, p, hypergrad)]).float()
    if group is None:
        flags = host + flags.tolist()
    else:  # one all-reduce of every check
        flags = max_over_ranks(torch.cat([torch.tensor(host, dtype=flags.dtype, device=flags.device), flags]),
                               group).tolist()
    return next((reason for reason, flag in zip(reasons, flags) if flag), None)


def hyperparameters(criterion: nn.Module, augment: Optional[nn.Module] = None
                    ) -> Tuple[List[str], List[torch.Tensor]]:
    """The hyperparameters alpha of a search and their names: the learnable
    parameters of ``criterion``, then those of ``augment`` (named ``augment.<name>``)."""
    names, params = [], []
    for prefix, module in (("", criterion), ("augment.", augment)):
        for name, p in (module.named_parameters() if module is not None else ()):
            if p.requires_grad:
                names.append(prefix + name)
                params.append(p)
    return names, params


def fix_shift_gauge(criterion, names, grads):
    """Projects the hypergradient of ``ParametricCE.shift_param`` to zero mean across
    clusters in every row: a per-row constant shift changes no loss value (docs/math.md
    section 2), so the exact hypergradient has no component along it."""
    if isinstance(criterion, ParametricCE) and "shift_param" in names:
        i = names.index("shift_param")
        grads[i] = grads[i] - grads[i].mean(1, keepdim=True)
    return grads


def criterion_layout(criterion) -> dict:
    """What a checkpoint's hyperparameters mean beyond their shapes: the criterion's
    type and, where it has them, ``num_classes``, ``num_groups``, ``group_params``,
    ``learn``, ``scale_max`` and the cluster map ``clusters`` (saved by ``BilevelOptimizer.state_dict``,
    compared by ``load_state_dict``)."""
    layout = {"type": type(criterion).__name__}
    for name in ("num_classes", "num_groups", "group_params", "learn", "scale_max"):
        if hasattr(criterion, name):
            layout[name] = getattr(criterion, name)
    clusters = getattr(criterion, "clusters", None)
    if isinstance(clusters, torch.Tensor):
        layout["clusters"] = clusters.detach().cpu().clone()
    return layout


def _layout_differences(saved, current):
    """``name: saved vs current`` for every entry of both layouts that differs."""
    def text(value):
        if isinstance(value, torch.Tensor):
            return str(value.tolist()) if value.numel() <= 20 else f"a map of {value.numel()} classes"
        return repr(value)
    out = []
    for name in current:
        if name in saved:
            a, b = saved[name], current[name]
            same = (a.shape == b.shape and torch.equal(a, b)) if isinstance(a, torch.Tensor) else a == b
            if not same:
                out.append(f"{name}: {text(a)} in the state dict, {text(b)} here")
    return out


def _check_optimizer_state(optimizer, saved, name):
    """Raises if a saved per-parameter state tensor (a momentum buffer, Adam's moments) is
    shaped unlike the parameter it would be loaded into (torch.optim checks only the
    number of parameters, so such a state fails later, in ``step()``)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved.get("param_groups", []) for i in group["params"]]
    if len(ids) != len(params):
        return  # torch.optim's load_state_dict names this mismatch
    for index, p in zip(ids, params):
        for key, value in saved.get("state", {}).get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"autobalance: the state dict's `{name}` state {key!r} of parameter {index} has "
                                 f"shape {list(value.shape)}, but that parameter has shape {list(p.shape)}; the "
                                 "checkpoint is of another model or criterion")


class _BatchStream:
    """Batches drawn from an iterable (iterated again from the start when it runs
    out, like epochs of a DataLoader) or from a callable that returns one batch."""

    def __init__(self, source, name):
        if isinstance(source, Iterable) and not isinstance(source, (torch.Tensor, str)):
            self._draw = self._next
        elif callable(source):
            self._draw = source
        else:
            raise TypeError(f"autobalance: `{name}` must be an iterable of batches (e.g. a DataLoader) or a "
                            f"callable that returns one batch, got {type(source).__name__}")
        self.source, self.name, self._iterator = source, name, None

    def _next(self):
        for fresh in (False, True):
            if self._iterator is None or fresh:
                self._iterator = iter(self.source)
            try:
                return next(self._iterator)
            except StopIteration:
                pass
        raise ValueError(f"autobalance: `{self.name}` yields no batches (an exhausted iterator cannot start "
                         "again; pass a list, a DataLoader or a callable)")

    def take(self, n, device):
        """``n`` batches, their tensors moved to ``device``."""
        return [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)
                if isinstance(batch, (tuple, list)) else batch for batch in (self._draw() for _ in range(n))]

    def __repr__(self) -> str:
        return type(self.source).__name__


class BilevelOptimizer(torch.optim.Optimizer):
    """Wraps a ``torch.optim`` optimizer of the network weights ``theta`` and tunes
    the learnable parameters ``alpha`` of the training loss on validation data
    (the paper's Algorithm 1, docs/math.md section 5).

    It behaves like the optimizer it wraps: ``step``, ``zero_grad``, ``param_groups``
    (the wrapped optimizer's list itself), ``state_dict`` / ``load_state_dict``, step
    and state-dict hooks, and LR schedulers attached to it schedule the wrapped
    optimizer. It adds ``hyper_step``::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        criterion = ParametricCE.from_counts(counts, "la", clusters=10)
        bopt = BilevelOptimizer(opt, criterion, BalancedCE(num_classes), warmup_steps=...,
                                model=model, train_loader=train_loader, val_loader=val_loader,
                                batches_per_hyper_step=(10, 10))  # as the published code
        for x, y in train_loader:                      # search phase
            loss = criterion(model(x), y)
            bopt.zero_grad(); loss.backward(); bopt.step()
            if bopt.hyper_step_due:
                bopt.hyper_step()
        bopt.freeze()                                  # retrain phase: the learned loss is fixed

    Without the bound ``model`` and loaders, pass them to each call:
    ``bopt.hyper_step(model, train_batches=[...], val_batches=[...])`` (an explicit
    argument also overrides a bound one). Batches are ``(inputs, target)`` or
    ``(inputs, target, group)``; ``model(inputs)`` must return ``[N, K]`` logits.

    **The hypergradient** (docs/math.md section 5)::

        dL_V/dalpha = - d/dalpha <grad_theta L_T(theta, alpha), p>,   H p = grad_theta L_V

    where ``grad_theta L_V`` is averaged over the validation batches, ``H`` is the
    Hessian of ``L_T`` averaged over the training batches plus a ridge ``diag(c)``
    (``solvers.ridge``), and the mixed term is averaged over the training batches.

    **Weight decay** (``ridge``, docs/math.md section 5): the hypergradient assumes
    ``theta`` is at the wrapped optimizer's fixed point. With ``ridge="auto"`` (default)
    ``c`` comes from its param groups: ``weight_decay`` is taken as an L2 term of the
    loss, ``c = weight_decay`` (SGD, Adam, and the other ``torch.optim`` optimizers,
    whose ``weight_decay`` adds ``weight_decay * theta`` to the gradient); AdamW's (and
    ``Adam(decoupled_weight_decay=True)``'s) decoupled decay stops where
    ``grad L_T = -weight_decay * (sqrt(v_hat) + eps) * theta``, so ``c = weight_decay *
    (sqrt(v_hat) + eps)`` per weight, from its second-moment estimate at the hyper-step
    (held fixed: the ridge of the stationarity condition, not of a loss). Other
    optimizers with decoupled decay (``RAdam`` / ``NAdam(decoupled_weight_decay=True)``)
    raise; ``ridge=c`` (a float >= 0) sets the coefficient of every weight instead.

    ``p`` comes from the ``solver`` (``autobalance.bilevel.solvers``):

    - ``"neumann"`` (default), ``Neumann``: ``neumann_terms`` terms of the Neumann
      series with step ``step_size``; ``"auto"`` (default) is ``1 / lambda_max(H)`` by
      power iteration (``power_iterations`` steps at first, then one warm-started step
      at every ``power_refresh_every``-th hyper-step), corrected when a product shows
      it stale. The published configuration is ``step_size=1.0, neumann_terms=5``.
    - ``"cg"``, ``ConjugateGradient``: at most ``cg_iterations`` iterations, stopping
      at relative residual ``cg_tol`` or at non-positive curvature.
    - ``"first_order"``, ``FirstOrder``: ``p = eta grad_theta L_V`` (``H^-1 ~ eta I``).

    or a solver object, e.g. ``solver=Neumann(terms=10, step_size=0.5)``, which
    takes the options itself. Options left None take the solver's defaults; those
    of another solver than the named one are not used. The power-iteration estimate
    a hyper-step leaves for the next is ``solver_state`` (saved by ``state_dict``);
    ``step_size_corrections`` counts the Neumann series' restarts.

    **Cost**: each Hessian-vector product is one ``torch.autograd.grad`` per training
    batch through a ``create_graph=True`` gradient of its loss (built once). The
    mixed term uses that the loss sees ``theta`` only through the logits ``z``:
    ``d/dalpha <grad_theta L_T, p> = d/dalpha <dl/dz, J_theta p>``, with ``J_theta p`` from
    one forward pass in forward-mode AD and the rest a second derivative of the loss
    in logit space (models with a layer lacking forward-mode AD fall back to reverse
    over reverse). With ``ParametricCE(backend="fused")`` the loss part of both runs in
    the fused double backward kernel. So a Neumann hyper-step costs a validation
    gradient, a training gradient with graph, ``J`` Hessian-vector products (plus one
    every ``power_refresh_every`` hyper-steps) and one forward-mode pass, per batch.

    **Memory** (``graph_memory``): the training batches' gradient graphs are what a
    hyper-step holds; with ``n`` batches they take ``n`` times one batch's. They are
    kept for the solver's products while their total size, measured as they are built,
    stays within ``graph_memory`` bytes; the graphs of the batches beyond it are rebuilt
    for every product, one at a time, which costs one forward and one backward more per
    such batch and product (about 1.7x the time of a kept graph's product on the CPU,
    ``bench/README.md``). The default ``"auto"`` is half the memory available when the
    hyper-step starts (free CUDA memory plus PyTorch's unused cache; on the CPU the
    system's available memory), so graphs are kept unless memory is short;
    ``float("inf")`` keeps all of them (as the published code does); ``0`` keeps only
    one batch's (the least memory). ``HyperStepResult.kept_graphs`` and ``graph_bytes``
    report what a hyper-step kept and what keeping all would have taken.

    **Personalized augmentation** (docs/math.md section 9): with ``augment=`` a module
    ``augment(inputs, target[, group], generator=None)`` with learnable strengths
    (``autobalance.augment.SphericalAugment`` or ``ImagePolicy``, e.g. with the loss's
    ``clusters`` and ``num_groups``), those strengths are hyperparameters too, after the
    criterion's (named ``augment.<name>``; the default hyper-optimizer holds them). The
    training loop applies it, ``criterion(model(augment(x, y[, g])), y[, g])``; a
    hyper-step augments each of its training batches with one draw (a generator seeded
    by ``augment_seed`` from the hyper-step count, the rank and the batch index) used in
    all its products, and the mixed product goes through the batch's graph (no
    forward-mode shortcut). It costs 1.16-1.34x the hyper-step without augmentation
    (``bench/README.md``).

    **Applying it**: the hypergradient of ``ParametricCE.shift_param`` is projected to
    zero mean across clusters in each row (the shift gauge of docs/math.md section 2); it
    is clipped to total norm ``max_hypergrad_norm`` if given. A hyper-step whose
    validation or training loss, validation gradient, solver solution (or CG residual)
    or hypergradient is not finite, or whose validation gradient, solution or
    hypergradient is exactly zero (degenerate batches, e.g. every label ignored, or a
    solver that stopped before its first step), is skipped: the hyper-optimizer is not
    called (so its momentum does not move ``alpha``), ``alpha``, the hyper-optimizer and
    the solver state stay untouched, ``skipped_hyper_steps`` counts it and
    ``HyperStepResult.skip_reason`` says which check failed (under DDP every rank skips
    when one does). The update is made by ``hyper_optimizer``, by default
    ``SGD(lr=0.05, momentum=0.9, weight_decay=1e-4)`` as in the paper.

    **Schedule**: ``hyper_step_due`` is true after training step ``t`` (counted by
    ``step``) when ``t >= max(warmup_steps, 1)`` and ``(t - warmup_steps) %
    hyper_every == 0``, once per step. ``hyper_step`` runs whenever it is called,
    except before the first training step or after ``freeze()`` (both raise).

    **The hyper-step's passes** run the model in eval mode (BatchNorm with its running
    statistics, which stay untouched; no dropout), then restore every module's mode
    (see ``layers.hyper_passes``).

    **DDP**: with the model wrapped in ``DistributedDataParallel``, ``grad_theta L_V``
    and every Hessian-vector product are all-reduced (averaged over ranks), so the
    solve uses the union of every rank's batches; the final hypergradient is
    gathered and summed in rank order, so every rank ends the hyper-step with
    bit-identical ``alpha``. Every rank must take the same number of train and
    validation batches per hyper-step.

    Args:
        optimizer: the ``torch.optim.Optimizer`` of the network weights.
        criterion: the training loss, an ``nn.Module`` called as
            ``criterion(logits, target[, group])`` whose learnable parameters are
            ``alpha`` (typically ``ParametricCE``). Its parameters must not be in
            ``optimizer``.
        objective: the validation objective ``L_V`` (``autobalance.objectives``),
            called as ``objective(logits, target[, group])``; it must not depend on
            ``alpha``.
        hyper_optimizer: an optimizer over exactly the criterion's learnable
            parameters; default SGD as above.
        warmup_steps, hyper_every: the schedule above (``hyper_every`` defaults to
            ``HYPER_EVERY = 20``).
        solver: a name above or a solver object; ``neumann_terms``, ``step_size``,
            ``power_iterations``, ``power_refresh_every``, ``cg_iterations``, ``cg_tol``:
            the named solver's options.
        inner_params: ``theta``, a subset of ``optimizer``'s parameters (e.g. the last
            layer); default all of them that require grad.
        max_hypergrad_norm: clips the hypergradient's total norm (default: no clipping).
        model: the network whose weights ``optimizer`` trains (its DDP wrapper under
            DDP), for ``hyper_step()`` without arguments.
        train_loader, val_loader: where ``hyper_step()`` draws its training and
            validation batches: an iterable of batches (a DataLoader, a list; iterated
            again from the start when it runs out) or a callable that returns one
            batch. Their tensors are moved to the device of ``theta``. The loaders'
            positions are not part of ``state_dict``.
        batches_per_hyper_step: ``(n_train, n_val)``, how many batches of each loader a
            hyper-step averages over (the published code: 10 and 10).
        graph_memory: ``"auto"``, or the bytes of training graphs a hyper-step may keep
            alive (``float("inf")``: all; ``0``: one batch's); see **Memory** above.
        ridge: ``"auto"`` or the ridge coefficient of every weight; see **Weight decay**.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, criterion: nn.Module, objective, *,
                 hyper_optimizer: Optional[torch.optim.Optimizer] = None, warmup_steps: int = 0,
                 hyper_every: int = HYPER_EVERY, solver: Union[str, Solver] = "neumann",
                 neumann_terms: Optional[int] = None, step_size: Union[str, float, None] = None,
                 power_iterations: Optional[int] = None, power_refresh_every: Optional[int] = None,
                 cg_iterations: Optional[int] = None, cg_tol: Optional[float] = None,
                 inner_params: Optional[Iterable[torch.Tensor]] = None, max_hypergrad_norm: Optional[float] = None,
                 model: Optional[nn.Module] = None, train_loader: Optional[BatchSource] = None,
                 val_loader: Optional[BatchSource] = None, batches_per_hyper_step: Tuple[int, int] = (1, 1),
                 graph_memory: Union[str, float] = "auto", ridge: Union[str, float] = "auto",
                 augment: Optional[nn.Module] = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"autobalance: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(criterion, nn.Module):
            raise TypeError(f"autobalance: `criterion` must be an nn.Module loss with learnable hyperparameters "
                            f"(e.g. ParametricCE), got {type(criterion).__name__}")
        self.optimizer, self.criterion, self.objective = optimizer, criterion, objective
        # Optimizer.__init__ would make param_groups of its own; its __setstate__ sets up the rest of
        # its machinery (the step and state-dict hook registries, the hook-running step) and no more
        torch.optim.Optimizer.__setstate__(self, {})
        if augment is not None and not isinstance(augment, nn.Module):
            raise TypeError(f"autobalance: `augment` must be None or an nn.Module augmentation (e.g. "
                            f"autobalance.augment.SphericalAugment), got {type(augment).__name__}")
        for size in ("num_classes", "num_groups"):
            sizes = (getattr(criterion, size, None), getattr(augment, size, None))
            if None not in sizes and sizes[0] != sizes[1]:
                raise ValueError(f"autobalance: `augment` has {size} = {sizes[1]} but `criterion` has {sizes[0]}; "
                                 f"their cluster maps must cover the same classes and groups")
        self.augment = augment
        self._hyper_names, self._hyper = hyperparameters(criterion, augment)
        if not self._hyper:
            raise ValueError(f"autobalance: `criterion` ({type(criterion).__name__}) has no learnable parameters"
                             f"{'' if augment is None else ' and neither has `augment`'}; expected a loss with "
                             "learnable hyperparameters, e.g. ParametricCE(learn=('scale', 'shift')), or an "
                             "augmentation with learnable strengths")
        if not callable(objective):
            raise TypeError(f"autobalance: `objective` must be a callable loss, got {type(objective).__name__}")
        hyper_ids = {id(p) for p in self._hyper}
        if objective is criterion or (isinstance(objective, nn.Module)
                                      and any(id(p) in hyper_ids for p in objective.parameters())):
            raise ValueError("autobalance: `objective` must not depend on the loss hyperparameters (L_V(theta) of "
                             "docs/math.md section 5); got an objective that shares parameters with `criterion`")

        trained = [p for group in optimizer.param_groups for p in group["params"]]
        if any(id(p) in hyper_ids for p in trained):
            raise ValueError("autobalance: `optimizer` must not hold the criterion's hyperparameters; they are "
                             "trained by the hyper-optimizer")
        trained_ids = {id(p) for p in trained}
        theta = [p for p in trained if p.requires_grad] if inner_params is None else list(inner_params)
        if not theta:
            raise ValueError("autobalance: `inner_params` (theta) is empty; expected trainable parameters of "
                             "`optimizer`")
        for i, p in enumerate(theta):
            if id(p) not in trained_ids or not p.requires_grad:
                raise ValueError(f"autobalance: `inner_params[{i}]` (shape {list(p.shape)}) is not a trainable "
                                 "parameter of `optimizer`; theta must be a subset of the parameters it trains")
        self._theta = theta
        device, dtype = theta[0].device, theta[0].dtype
        for i, p in enumerate(theta):
            if p.device != device or p.dtype != dtype:
                raise ValueError(f"autobalance: theta must share one device and dtype; parameter {i} is "
                                 f"{p.dtype} on {p.device}, parameter 0 is {dtype} on {device}")
        for name, p in zip(self._hyper_names, self._hyper):
            if p.device != device:
                raise ValueError(f"autobalance: `criterion` parameter {name!r} is on {p.device} but the network "
                                 f"weights are on {device}; move the criterion to {device}")

        if hyper_optimizer is None:
            hyper_optimizer = torch.optim.SGD(self._hyper, lr=0.05, momentum=0.9, weight_decay=1e-4)
        elif not isinstance(hyper_optimizer, torch.optim.Optimizer):
            raise TypeError(f"autobalance: `hyper_optimizer` must be a torch.optim.Optimizer, got "
                            f"{type(hyper_optimizer).__name__}")
        held = {id(p) for g in hyper_optimizer.param_groups for p in g["params"]}
        if held != hyper_ids:
            raise ValueError(f"autobalance: `hyper_optimizer` must hold exactly the hyperparameters (the learnable "
                             f"parameters of `criterion` and `augment`) {self._hyper_names}, got {len(held)} "
                             f"parameters of which {len(held & hyper_ids)} match")
        self.hyper_optimizer = hyper_optimizer

        self.solver = make_solver(solver, neumann_terms=neumann_terms, step_size=step_size,
                                  power_iterations=power_iterations, power_refresh_every=power_refresh_every,
                                  cg_iterations=cg_iterations, cg_tol=cg_tol)
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", 0)
        self.hyper_every = check_int(hyper_every, "hyper_every", 1)
        self.max_hypergrad_norm = check_positive(max_hypergrad_norm, "max_hypergrad_norm", allow_none=True)

        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"autobalance: `model` must be an nn.Module, got {type(model).__name__}")
            held = {id(p) for p in model.parameters()}
            if not all(id(p) in held for p in theta):
                raise ValueError("autobalance: `model` does not hold the weights theta that `optimizer` trains; "
                                 "pass the network whose parameters the optimizer was built with")
        self.model = model
        self._streams = {name: None if source is None else _BatchStream(source, name)
                         for name, source in (("train_loader", train_loader), ("val_loader", val_loader))}
        if not isinstance(batches_per_hyper_step, (tuple, list)) or len(batches_per_hyper_step) != 2:
            raise ValueError(f"autobalance: `batches_per_hyper_step` must be a pair (n_train, n_val), got "
                             f"{batches_per_hyper_step!r}")
        self.batches_per_hyper_step = tuple(check_int(n, f"batches_per_hyper_step[{i}]", 1)
                                            for i, n in enumerate(batches_per_hyper_step))
        if not (graph_memory == "auto" if isinstance(graph_memory, str) else
                isinstance(graph_memory, numbers.Real) and not isinstance(graph_memory, bool) and graph_memory >= 0):
            raise ValueError(f"autobalance: `graph_memory` must be 'auto' or a number of bytes >= 0 (float('inf') "
                             f"keeps every graph), got {graph_memory!r}")
        self.graph_memory = graph_memory
        if not (isinstance(ridge, str) and ridge == "auto"):
            try:
                ridge = check_non_negative(ridge, "ridge")
            except ValueError:
                raise ValueError(f"autobalance: `ridge` must be 'auto' or a finite float >= 0, got {ridge!r}") from None
        self.ridge = ridge
        self._ridge()  # a wrapped optimizer whose weight decay the hypergradient cannot model raises now

        self.steps = self.hyper_steps = self.skipped_hyper_steps = self.step_size_corrections = 0
        self.frozen = False
        self._last_hyper_step_at = -1
        self.solver_state = SolverState()
        # False once the model turned out to lack forward-mode derivatives, and with a learned
        # augmentation (its hyperparameters reach the loss through the network, not the logits)
        self._forward_ad = augment is None
        self._augment_draws = 0  # hyper-steps taken with an augmentation (each draws its own)

    # ---- the wrapped optimizer's interface

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def __getstate__(self):  # plain attributes, not torch.optim.Optimizer's three
        return self.__dict__

    def add_param_group(self, param_group) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure=None):
        """One training step of the wrapped optimizer (Algorithm 1, line 6). It runs the
        step hooks (``register_step_pre_hook`` / ``register_step_post_hook``) once; the
        global ones (``torch.optim.optimizer.register_optimizer_step_pre_hook``) run for
        this optimizer and again for the wrapped one, whose own step this is."""
        loss = self.optimizer.step(closure)
        self.steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of the network weights and of the hyperparameters
        (``loss.backward()`` also reaches the latter)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self._hyper:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        """The wrapped and hyper-optimizers' states, the hyperparameters, the schedule
        counters and frozen state, the solver state (the power-iteration eigenvector and
        eigenvalue) and the criterion's layout (``criterion_layout``);
        with the state-dict hooks (``register_state_dict_pre_hook`` / ``_post_hook``)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        solver = self.solver_state
        state_dict = {"optimizer": self.optimizer.state_dict(),
                      "hyper_optimizer": self.hyper_optimizer.state_dict(),
                      "hyperparameters": {n: p.detach().clone() for n, p in zip(self._hyper_names, self._hyper)},
                      "schedule": {"steps": self.steps, "hyper_steps": self.hyper_steps,
                                   "skipped_hyper_steps": self.skipped_hyper_steps,
                                   "step_size_corrections": self.step_size_corrections,
                                   "last_hyper_step_at": self._last_hyper_step_at, "frozen": self.frozen,
                                   "augment_draws": self._augment_draws},
                      "criterion": criterion_layout(self.criterion),
                      "augment": None if self.augment is None else criterion_layout(self.augment),
                      "solver": {"eigenvector": None if solver.eigenvector is None else solver.eigenvector.clone(),
                                 "eigenvalue": solver.eigenvalue, "solves": solver.solves}}
        for hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a ``state_dict()``, with the load-state-dict hooks. It checks first, and
        changes nothing if a check fails, that the checkpoint fits: the hyperparameters'
        names and shapes, the criterion's layout (``criterion_layout``: type, classes,
        groups, cluster map, learned tables, scale_max), the shapes of both optimizers' per-parameter
        states and the solver's eigenvector. The frozen state is the checkpoint's:
        the hyperparameters require grad exactly when it was not frozen."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        saved = state_dict["hyperparameters"]
        differences = _layout_differences(state_dict.get("criterion", {}), criterion_layout(self.criterion))
        if (state_dict.get("augment") is None) != (self.augment is None):
            differences.append(f"augment: {'none' if state_dict.get('augment') is None else 'one'} saved, "
                               f"{'none' if self.augment is None else 'one'} here")
        elif self.augment is not None:
            differences += [f"augment {d}" for d in _layout_differences(state_dict["augment"],
                                                                        criterion_layout(self.augment))]
        if differences:
            raise ValueError("autobalance: the state dict was saved for another criterion (" + "; ".join(differences)
                             + "); load it into a BilevelOptimizer built with the same criterion")
        if sorted(saved) != sorted(self._hyper_names):
            raise ValueError(f"autobalance: the state dict holds hyperparameters {sorted(saved)}, but the criterion "
                             f"has {sorted(self._hyper_names)}")
        for name, p in zip(self._hyper_names, self._hyper):
            if saved[name].shape != p.shape:
                raise ValueError(f"autobalance: hyperparameter {name!r} has shape {list(p.shape)}, the state dict "
                                 f"holds {list(saved[name].shape)}")
        _check_optimizer_state(self.optimizer, state_dict["optimizer"], "optimizer")
        _check_optimizer_state(self.hyper_optimizer, state_dict["hyper_optimizer"], "hyper_optimizer")
        vector, weights = state_dict["solver"]["eigenvector"], sum(p.numel() for p in self._theta)
        if vector is not None and vector.numel() != weights:
            raise ValueError(f"autobalance: the state dict's solver eigenvector has {vector.numel()} entries, but "
                             f"theta has {weights} weights; the checkpoint is of another model or `inner_params`")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.hyper_optimizer.load_state_dict(state_dict["hyper_optimizer"])
        with torch.no_grad():
            for name, p in zip(self._hyper_names, self._hyper):
                p.copy_(saved[name])
        schedule = state_dict["schedule"]
        self.steps, self.hyper_steps = schedule["steps"], schedule["hyper_steps"]
        self.skipped_hyper_steps = schedule["skipped_hyper_steps"]
        self.step_size_corrections = schedule.get("step_size_corrections", 0)
        self._last_hyper_step_at = schedule["last_hyper_step_at"]
        self._augment_draws = schedule.get("augment_draws", 0)
        solver = state_dict["solver"]
        vector = solver["eigenvector"]
        self.solver_state = SolverState(None if vector is None else vector.to(self._theta[0].device).clone(),
                                        solver["eigenvalue"], solver.get("solves", self.hyper_steps))
        self._set_frozen(bool(schedule["frozen"]))
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        hyper = "\n".join("    " + line for line in repr(self.hyper_optimizer).splitlines())
        bound = ""
        if self.model is not None or any(self._streams.values()):
            train, val = self._streams.values()
            bound = (f"  model: {type(self.model).__name__ if self.model is not None else None}, "
                     f"train_loader: {train}, val_loader: {val}, "
                     f"batches_per_hyper_step={self.batches_per_hyper_step}\n")
        return (f"BilevelOptimizer(\n  optimizer:\n{inner}\n  hyper_optimizer:\n{hyper}\n"
                f"  hyperparameters: {self._hyper_names}\n  objective: {self.objective!r}\n"
                f"  solver: {self.solver!r}, theta={sum(p.numel() for p in self._theta)} weights, "
                f"ridge={self.ridge!r}\n{bound}"
                f"  warmup_steps={self.warmup_steps}, hyper_every={self.hyper_every}, steps={self.steps}, "
                f"hyper_steps={self.hyper_steps}, skipped_hyper_steps={self.skipped_hyper_steps}, "
                f"step_size_corrections={self.step_size_corrections}, frozen={self.frozen}\n)")

    # ---- schedule

    @property
    def hyper_step_due(self) -> bool:
        """Whether Algorithm 1 takes a hyper-step after the current training step."""
        t = self.steps
        return (not self.frozen and t >= max(self.warmup_steps, 1) and (t - self.warmup_steps) % self.hyper_every == 0
                and self._last_hyper_step_at != t)

    def freeze(self) -> None:
        """Fixes the learned loss for the retrain phase (Algorithm 1, lines 11-12):
        no more hyper-steps, and the hyperparameters stop requiring grad."""
        self._set_frozen(True)

    def _set_frozen(self, frozen):
        self.frozen = frozen
        for p in self._hyper:
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None

    # ---- the hypergradient

    def _batches(self, batches, name, drawn=False):
        if isinstance(batches, (torch.Tensor, str)) or not isinstance(batches, Iterable):
            raise TypeError(f"autobalance: `{name}` must be a list of (inputs, target) or (inputs, target, group) "
                            f"batches, got {type(batches).__name__}")
        batches = list(batches)
        if not batches:
            raise ValueError(f"autobalance: `{name}` is empty; expected at least one batch")
        device = self._theta[0].device
        out = []
        for i, batch in enumerate(batches):
            where = f"batch {i} from `{name}`" if drawn else f"`{name}[{i}]`"
            if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                raise ValueError(f"autobalance: {where} must be (inputs, target) or (inputs, target, group), "
                                 f"got {type(batch).__name__}"
                                 + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
            inputs, target, group = (*batch, None)[:3]
            for part, t in (("inputs", inputs), ("target", target), ("group", group)):
                if isinstance(t, torch.Tensor) and t.device != device:
                    raise ValueError(f"autobalance: {where} {part} is on {t.device} but the network weights "
                                     f"are on {device}")
            out.append((inputs, target, group))
        return out

    def _arguments(self, model, train_batches, val_batches):
        """``(model, train, val)`` of a hyper-step: the arguments given, else the bound
        model and batches drawn from the bound loaders."""
        if model is None:
            if self.model is None:
                raise TypeError("autobalance: no `model`; pass it to this call or bind it with "
                                "BilevelOptimizer(..., model=model)")
            model = self.model
        out = [model]
        for batches, name, loader, n in zip((train_batches, val_batches), ("train_batches", "val_batches"),
                                            ("train_loader", "val_loader"), self.batches_per_hyper_step):
            if batches is not None:
                out.append(self._batches(batches, name))
            elif self._streams[loader] is None:
                raise TypeError(f"autobalance: no `{name}`; pass them to this call or bind a source with "
                                f"BilevelOptimizer(..., {loader}=...)")
            else:
                out.append(self._batches(self._streams[loader].take(n, self._theta[0].device), loader, drawn=True))
        return out

    def _ridge(self):
        """The ridge coefficient of every weight of theta, flat (None without any decay): the ``ridge``
        argument, or read from the wrapped optimizer (docs/math.md section 5, "Weight
        decay"): ``weight_decay`` as an L2 term, or for Adam's decoupled decay (AdamW,
        ``Adam(decoupled_weight_decay=True)``) ``weight_decay * (sqrt(v_hat) + eps)``."""
        if self.ridge != "auto":
            return None if self.ridge == 0 else torch.cat([torch.full((p.numel(),), self.ridge, dtype=p.dtype,
                                                                      device=p.device) for p in self._theta])
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        if not any(float(group_of[id(p)].get("weight_decay", 0.0)) for p in self._theta):
            return None  # no decay: nothing to build, no device work
        parts = []
        for p in self._theta:
            group = group_of[id(p)]
            decay = float(group.get("weight_decay", 0.0))
            coefficient = torch.full_like(p, decay, memory_format=torch.contiguous_format)
            if decay and group.get("decoupled_weight_decay", False):
                if not isinstance(self.optimizer, torch.optim.Adam):
                    raise ValueError(f"autobalance: the wrapped optimizer {type(self.optimizer).__name__} has "
                                     f"decoupled weight decay (weight_decay={decay}), whose fixed point the "
                                     "hypergradient models only for AdamW / Adam(decoupled_weight_decay=True) "
                                     "(docs/math.md section 5); use L2 weight decay, or give the ridge of the "
                                     "inner problem yourself: BilevelOptimizer(..., ridge=coefficient)")
                state = self.optimizer.state.get(p, {})
                if "exp_avg_sq" in state:
                    second = state["max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"]
                    correction = 1.0 - float(group["betas"][1]) ** float(state["step"])
                    coefficient *= (second / correction).sqrt() + float(group["eps"])
                else:  # no step yet: v_hat = 0
                    coefficient *= float(group["eps"])
            parts.append(coefficient.reshape(-1))
        return torch.cat(parts)

    def _hypergradient(self, model, train_batches, val_batches):
        model, train, val = self._arguments(model, train_batches, val_batches)
        group = process_group(model)
        with hyper_passes(model, self._theta):
            v, val_loss = 0.0, 0.0
            for batch in val:
                grad, loss = validation_gradient(model, self.objective, self._theta, self._hyper, batch)
                v, val_loss = v + grad, val_loss + loss / len(val)
            v = mean_over_ranks(v / len(val), group)
            products = TrainGradients(model, self.criterion, self._theta, self._hyper, train, group,
                                      self._forward_ad, graph_budget(self.graph_memory, self._theta[0].device),
                                      augment=self.augment,
                                      draw_seed=augment_seed(self._augment_draws, rank_in(group) * len(train)))
            p, state = self.solver.solve(ridge(products.hvp, self._ridge()), v, self.solver_state)
            hypergrad = -products.mixed(p)
            self._forward_ad = products.forward_ad
            train_loss = sum(products.losses) / len(products.losses)
        hypergrad = ordered_mean_over_ranks(hypergrad, group)
        reason = _unsound(val_loss, train_loss, v, p, state, hypergrad, group)
        graphs = (products.kept, sum(products.graph_bytes))
        hypergrad = fix_shift_gauge(self.criterion, self._hyper_names, split(hypergrad, self._hyper))
        return hypergrad, train_loss, val_loss, state, graphs, reason

    def hypergradient(self, model: Optional[nn.Module] = None, train_batches: Optional[Sequence[Batch]] = None,
                      val_batches: Optional[Sequence[Batch]] = None) -> List[torch.Tensor]:
        """The gauge-fixed hypergradient ``dL_V/dalpha`` (docs/math.md section 5), one tensor per
        learnable parameter of the criterion, without applying it or changing any state
        (but for the batches it draws from bound loaders). It is returned as computed, even
        where ``hyper_step`` would skip it (see "Applying it" in the class docstring)."""
        return self._hypergradient(model, train_batches, val_batches)[0]

    def hyper_step(self, model: Optional[nn.Module] = None, train_batches: Optional[Sequence[Batch]] = None,
                   val_batches: Optional[Sequence[Batch]] = None) -> HyperStepResult:
        """One hyper-step (Algorithm 1, lines 7-9): the hypergradient at the current
        weights, applied by the hyper-optimizer. Arguments left None come from the
        bound ``model`` and loaders. See the class docstring."""
        if self.frozen:
            raise RuntimeError("autobalance: hyper_step after freeze(); the learned loss is fixed for the retrain "
                               "phase")
        if self.steps == 0:
            raise RuntimeError("autobalance: hyper_step before any training step; the hypergradient assumes weights "
                               "trained on the current loss (take at least one step(), see warmup_steps)")
        hypergrad, train_loss, val_loss, state, graphs, reason = self._hypergradient(model, train_batches,
                                                                                    val_batches)
        self._last_hyper_step_at = self.steps
        self._augment_draws += self.augment is not None  # the next hyper-step draws anew
        norm = float(torch.linalg.vector_norm(flat(hypergrad)))
        if reason is None and not math.isfinite(norm):  # finite entries whose norm overflows
            reason = f"the hypergradient's norm is not finite ({norm})"
        if reason is not None:
            self.skipped_hyper_steps += 1
            return HyperStepResult(False, norm, train_loss, val_loss, state.step_size, *graphs, reason)
        factor = 1.0 if self.max_hypergrad_norm is None else min(1.0, self.max_hypergrad_norm / (norm + 1e-12))
        for p, g in zip(self._hyper, hypergrad):
            p.grad = (g * factor).to(p.dtype)
        self.hyper_optimizer.step()
        for p in self._hyper:
            p.grad = None
        self.solver_state = state
        self.step_size_corrections += state.corrections
        self.hyper_steps += 1
        return HyperStepResult(True, norm, train_loss, val_loss, state.step_size, *graphs)
