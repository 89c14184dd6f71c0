"""``BilevelOptimizer``: the paper's Algorithm 1 with hypergradients by
approximate implicit differentiation (MATH.md section 5; paper sections 2.1,
2.2 and the implementation paragraphs of section 3), and ``check_hypergrad``,
which compares those hypergradients with the exact ones of a problem solved
to optimality.

Notation as in MATH.md: ``theta`` the network weights (or a chosen subset),
``alpha`` the loss hyperparameters (the learnable ``nn.Parameter``s of the
criterion, e.g. ``ParametricCE.scale_param`` / ``shift_param`` in cluster
space, MATH.md section 2), ``L_T`` the training loss, ``L_V`` the validation
objective (MATH.md section 6), ``H = d^2 L_T / d theta^2``.
"""
import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterable, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode

from autobalance.losses import ParametricCE

SOLVERS = ("neumann", "cg", "first_order")


class HyperStepResult(NamedTuple):
    """What one hyper-step did. ``hypergrad_norm`` is the norm after gauge
    fixing and before clipping (NaN or inf when the step was skipped);
    ``train_loss`` / ``val_loss`` are this rank's means over its batches;
    ``step_size`` is the Neumann / first-order ``eta`` (None for CG)."""
    applied: bool
    hypergrad_norm: float
    train_loss: float
    val_loss: float
    step_size: Optional[float]


class _SolverState(NamedTuple):
    """The power-iteration estimate a hyper-step leaves for the next ones, and how often
    this hyper-step corrected the Neumann step size."""
    eigenvector: Optional[torch.Tensor]
    eigenvalue: Optional[float]
    corrections: int = 0


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat, like):
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in like]), like)]


def _grad(outputs, inputs, grad_outputs=None, **kwargs):
    """``torch.autograd.grad`` as a flat vector; outputs that do not require grad
    and inputs they do not reach contribute zeros."""
    if grad_outputs is None:
        grad_outputs = [None] * len(outputs)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return _flat([torch.zeros_like(x) for x in inputs])
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True, **kwargs)
    return _flat([torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)])


def _loss(fn, logits, target, group):
    """``fn(logits, target[, group])``: a loss used without groups need not take one."""
    return fn(logits, target) if group is None else fn(logits, target, group)


def _fix_shift_gauge(criterion, names, grads):
    """Projects the hypergradient of ``ParametricCE.shift_param`` to zero mean across
    clusters in every row: a per-row constant shift changes no loss value (MATH.md
    section 2), so the exact hypergradient has no component along it."""
    if isinstance(criterion, ParametricCE) and "shift_param" in names:
        i = names.index("shift_param")
        grads[i] = grads[i] - grads[i].mean(1, keepdim=True)
    return grads


def _int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"autobalance: `{name}` must be an int >= {minimum}, got {value!r}")
    return value


def _positive(value, name, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"autobalance: `{name}` must be a positive finite float, got {value!r}")
    return float(value)


# ---- distributed: the hyper-step treats the union of all ranks' batches as its batches

def _process_group(model):
    if isinstance(model, DistributedDataParallel) and dist.is_available() and dist.is_initialized():
        group = model.process_group
        if dist.get_world_size(group) > 1:
            return group
    return None


def _mean_over_ranks(t, group):
    """All-reduce mean of a theta-sized vector (inside the solver)."""
    if group is None:
        return t
    dist.all_reduce(t, group=group)
    return t / dist.get_world_size(group)


def _ordered_mean_over_ranks(t, group):
    """Mean over ranks summed in rank order on every rank, so every rank gets
    bit-identical values whatever the all-reduce algorithm."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total / len(parts)


# ---- the hyper-step's layers: PyTorch's kernels, cheaper second derivatives
#
# PyTorch's generic double backward of a convolution runs slower kernels than its backward,
# and that of eval-mode BatchNorm is a long chain of full-size elementwise ops: on CPU
# about a fifth of each Hessian-vector product of ResNet-32 and a third of the small
# CNN's. During the hyper-step's passes ``_HyperStepLayers`` routes these layers through
# autograd Functions that compute the same values and gradients with the same kernels and
# whose derivatives are written out: the double backward of a convolution is two
# convolutions and PyTorch's backward-data and backward-weights kernels, and eval-mode
# BatchNorm, an affine map per channel, needs a few elementwise passes. They also give the
# forward-mode derivatives (``jvp``) of the mixed term. Third derivatives are not needed.

def _per_channel(t, like):
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def _conv(x, weight, bias, args):
    stride, padding, dilation, groups = args
    return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)


def _conv_jvp(x, weight, t_x, t_weight, t_bias, args, shape):
    """The convolution's derivative along ``(t_x, t_weight, t_bias)`` (each may be None);
    the bias tangent rides in one of the convolutions."""
    out = None if t_weight is None else _conv(x, t_weight, t_bias, args)
    if t_x is not None:
        part = _conv(t_x, weight, t_bias if out is None else None, args)
        out = part if out is None else out.add_(part)
    if out is None and t_bias is not None:
        out = _per_channel(t_bias, x).expand(shape)
    return out


def _conv_backward(grad, x, weight, args, mask):
    """PyTorch's convolution backward: ``(grad_x, grad_weight, grad_bias)``, None where ``mask`` is False."""
    stride, padding, dilation, groups = args
    bias_sizes = [weight.shape[0]] if mask[2] else None
    out = torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation, False,
                                              [0] * len(stride), groups, list(mask))
    return tuple(t if m else None for t, m in zip(out, mask))


class _ConvBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, weight, args, mask):
        ctx.save_for_backward(grad, x, weight)
        ctx.args = args
        ctx.set_materialize_grads(False)
        return _conv_backward(grad, x, weight, args, mask)

    @staticmethod
    def backward(ctx, u_x, u_weight, u_bias):
        grad, x, weight = ctx.saved_tensors
        need, args = ctx.needs_input_grad, ctx.args
        d_grad = d_x = d_weight = None
        if need[0]:
            d_grad = _conv_jvp(x, weight, u_x, u_weight, u_bias, args, grad.shape)
        if need[1] and u_weight is not None:
            d_x = _conv_backward(grad, x, u_weight, args, (True, False, False))[0]
        if need[2] and u_x is not None:
            d_weight = _conv_backward(grad, u_x, weight, args, (False, True, False))[1]
        return d_grad, d_x, d_weight, None, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, args):
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.args = args
        out = _conv(x, weight, bias, args)
        ctx.shape = out.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return _ConvBackward.apply(grad, x, weight, ctx.args, tuple(ctx.needs_input_grad[:3])) + (None,)

    @staticmethod
    def jvp(ctx, t_x, t_weight, t_bias, _):
        x, weight = ctx.saved_tensors
        return _conv_jvp(x, weight, t_x, t_weight, t_bias, ctx.args, ctx.shape)


def _affine_map(x, mean, var, eps, weight, d_weight, d_bias, d_x):
    """``r d_weight (x - mean) + d_bias + weight r d_x`` per channel, ``r = 1 / sqrt(var + eps)``:
    eval-mode BatchNorm is ``y = weight r (x - mean) + bias``, linear in each of ``x``,
    ``weight``, ``bias``, and this is its derivative along ``(d_x, d_weight, d_bias)``."""
    out = torch.batch_norm(x, d_weight, d_bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    return torch.addcmul(out, d_x, _per_channel(weight * torch.rsqrt(var + eps), x))


class _EvalBatchNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, weight, mean, var, eps):
        ctx.save_for_backward(grad, x, weight, mean, var)
        ctx.eps = eps
        return tuple(torch.ops.aten.native_batch_norm_backward(grad, x, weight, mean, var, None, None, False, eps,
                                                               [True, True, True]))

    @staticmethod
    def backward(ctx, u_x, u_weight, u_bias):
        grad, x, weight, mean, var = ctx.saved_tensors
        r = torch.rsqrt(var + ctx.eps)
        need = ctx.needs_input_grad
        d_grad = _affine_map(x, mean, var, ctx.eps, weight, u_weight, u_bias, u_x) if need[0] else None
        # (eval-mode native_batch_norm_backward with input u_x, weight u_weight and mean 0 gives
        # these two in one call, but measured slower on the CPU than the product and channel sum)
        d_x = grad * _per_channel(u_weight * r, x) if need[1] else None
        d_weight = (u_x * grad).sum([d for d in range(x.dim()) if d != 1]) * r if need[2] else None
        return d_grad, d_x, d_weight, None, None, None


class _EvalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):
        ctx.save_for_backward(x, weight, mean, var)
        ctx.save_for_forward(x, weight, mean, var)
        ctx.eps = eps
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, var = ctx.saved_tensors
        return _EvalBatchNormBackward.apply(grad, x, weight, mean, var, ctx.eps) + (None, None, None)

    @staticmethod
    def jvp(ctx, t_x, t_weight, t_bias, *_):
        x, weight, mean, var = ctx.saved_tensors
        zero = lambda t, like: torch.zeros_like(like) if t is None else t  # noqa: E731
        return _affine_map(x, mean, var, ctx.eps, weight, zero(t_weight, weight), zero(t_bias, weight), zero(t_x, x))


def _conv_layer(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str) or input.dim() != weight.dim():  # "same" / "valid"; unbatched input
        return NotImplemented
    dims = weight.dim() - 2
    args = tuple(tuple(a) if isinstance(a, (tuple, list)) else (a,) * dims for a in (stride, padding, dilation))
    return _Conv.apply(input, weight, bias, args + (groups,))


def _batch_norm_layer(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                      eps=1e-5):
    if training or any(t is None for t in (running_mean, running_var, weight, bias)):
        return NotImplemented
    return _EvalBatchNorm.apply(input, weight, bias, running_mean, running_var, eps)


class _HyperStepLayers(TorchFunctionMode):
    """Routes ``F.conv1d/2d/3d`` (numeric padding) and ``F.batch_norm`` with running statistics
    and affine parameters (``nn.BatchNorm*`` in eval mode) through the autograd Functions
    above; anything else runs unchanged."""

    LAYERS = {F.conv1d: _conv_layer, F.conv2d: _conv_layer, F.conv3d: _conv_layer, F.batch_norm: _batch_norm_layer}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        layer = self.LAYERS.get(func)
        out = NotImplemented if layer is None else layer(*args, **kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


@contextlib.contextmanager
def _hyper_passes(model):
    """Runs the hyper-step's forward passes with every module of the model in
    eval mode (each module's own mode is restored afterwards), for three reasons:

    - BatchNorm uses its running statistics and does not update them, so the
      hyper-step leaves the model's buffers as they were;
    - stochastic layers (dropout) are off, so every pass computes the same
      function and the solver's Hessian-vector products share one Hessian;
    - PyTorch's double backward of train-mode BatchNorm costs several times that
      of eval mode, where BatchNorm is a per-channel affine map.

    The passes also run under ``_HyperStepLayers`` (cheaper second derivatives of
    convolutions and eval-mode BatchNorm).

    Under DDP the passes also run in ``no_sync()``: DDP's gradient hooks do not
    fire for ``torch.autograd.grad``, and the hyper-step reduces explicitly.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    no_sync = model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    try:
        with no_sync, torch.enable_grad(), _HyperStepLayers():
            yield
    finally:
        for module, training in modes:
            module.training = training


class _TrainGradients:
    """The two second-order products of MATH.md section 5 on the training batches,
    averaged over the batches (and over ranks under DDP):

    - ``hvp(v) = H v + weight_decay * v`` (the wrapped optimizer's L2 term is part
      of the inner problem): reverse over reverse, through ``grad_theta L_T`` of
      each batch built with its graph (``create_graph``);
    - ``mixed(p) = d/d alpha <grad_theta L_T, p>``. The loss depends on theta only
      through the logits ``z``, so this is ``d/d alpha <dl/dz, u>`` with
      ``u = J_theta p`` the network's Jacobian-vector product in logit space. ``u``
      comes from one forward pass in forward-mode AD; the rest is a second
      derivative of the loss alone, ``[N, K]``-sized (with ``ParametricCE(backend=
      "fused")`` the fused double backward with the logit cotangent ``u``). Where a
      layer of the model has no forward-mode derivative, it falls back to reverse
      over reverse through ``grad_theta L_T``, like ``hvp``.

    Both are linear in the batches, so at most one batch's second-order graph is
    alive at a time: with several batches each product rebuilds each batch's
    graph in turn; a single batch's graph is kept for the solver's products.
    """

    def __init__(self, owner, model, batches, weight_decay, group):
        self.owner, self.model, self.batches = owner, model, batches
        self.weight_decay, self.group = weight_decay, group
        self.losses = []
        self._kept = None

    def _record(self, loss):
        _check_scalar(loss, "criterion")
        if len(self.losses) < len(self.batches):  # the first pass over the batches
            self.losses.append(float(loss.detach()))

    def _build(self, batch):
        inputs, target, grp = batch
        loss = _loss(self.owner.criterion, self.model(inputs), target, grp)
        self._record(loss)
        return torch.autograd.grad(loss, self.owner._theta, create_graph=True, allow_unused=True)

    def _average(self, inputs, vector):
        parts = _split(vector, self.owner._theta)
        total = None
        for batch in self.batches:
            grads = self._kept if self._kept is not None else self._build(batch)
            if len(self.batches) == 1:
                self._kept = grads
            term = _grad(grads, inputs, parts, retain_graph=True)
            del grads  # free this batch's second-order graph before the next one is built
            total = term if total is None else total + term
        return total / len(self.batches)

    def hvp(self, v):
        hv = _mean_over_ranks(self._average(self.owner._theta, v), self.group)
        return hv if self.weight_decay is None else hv + self.weight_decay * v

    def _logit_jvp(self, inputs, parts):
        """``(z, J_theta p)`` of one batch by forward-mode AD (``None`` for a zero JVP)."""
        module = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        names = {id(q): name for name, q in module.named_parameters()}
        with torch.no_grad(), fwAD.dual_level():
            duals = {names[id(q)]: fwAD.make_dual(q, t) for q, t in zip(self.owner._theta, parts) if id(q) in names}
            return tuple(fwAD.unpack_dual(functional_call(module, duals, (inputs,))))

    def _mixed_term(self, batch, parts):
        inputs, target, grp = batch
        logits, jvp = self._logit_jvp(inputs, parts)
        logits = logits.detach().requires_grad_(True)
        loss = _loss(self.owner.criterion, logits, target, grp)
        self._record(loss)
        grad_logits = torch.autograd.grad(loss, logits, create_graph=True)[0]
        if jvp is None:
            return _flat([torch.zeros_like(a) for a in self.owner._hyper])
        return _grad([grad_logits], self.owner._hyper, [jvp])

    def mixed(self, p):
        if self.owner._forward_ad:
            self._kept = None  # the solver's graph is not needed any more
            parts = _split(p, self.owner._theta)
            try:
                return sum(self._mixed_term(batch, parts) for batch in self.batches) / len(self.batches)
            except NotImplementedError:  # a layer without a forward-mode derivative
                self.owner._forward_ad = False
        return self._average(self.owner._hyper, p)


def _check_scalar(loss, name):
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"autobalance: the `{name}` must return a scalar loss (reduction 'mean' or 'sum'), "
                         f"got {got}")


class BilevelOptimizer(torch.optim.Optimizer):
    """Wraps a ``torch.optim`` optimizer of the network weights ``theta`` and tunes
    the learnable parameters ``alpha`` of the training loss on validation data
    (the paper's Algorithm 1, MATH.md section 5).

    It behaves like the optimizer it wraps (``step``, ``zero_grad``,
    ``param_groups``, ``state_dict`` / ``load_state_dict``; LR schedulers accept
    it) and adds ``hyper_step``::

        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        criterion = ParametricCE.from_counts(counts, "la", clusters=10)
        bopt = BilevelOptimizer(opt, criterion, BalancedCE(num_classes), warmup_steps=..., hyper_every=20)
        for x, y in train_loader:                      # search phase
            loss = criterion(model(x), y)
            bopt.zero_grad(); loss.backward(); bopt.step()
            if bopt.hyper_step_due:  # the published code averages 10 fresh batches of each
                bopt.hyper_step(model, train_batches=[next(train_iter)], val_batches=[next(val_iter)])
        bopt.freeze()                                  # retrain phase: the learned loss is fixed

    Batches are ``(inputs, target)`` or ``(inputs, target, group)``; ``model(inputs)``
    must return ``[N, K]`` logits.

    **The hypergradient** (MATH.md section 5)::

        dL_V/dalpha = - d/dalpha <grad_theta L_T(theta, alpha), p>,   H p = grad_theta L_V

    where ``grad_theta L_V`` is averaged over ``val_batches``, ``H`` is the Hessian of
    ``L_T`` averaged over ``train_batches`` plus the L2 term ``weight_decay * I`` of the
    wrapped optimizer's param groups, and the mixed term is averaged over
    ``train_batches``. Solvers for ``p``:

    - ``"neumann"`` (default): ``J = neumann_terms`` terms of the Neumann series with
      step ``eta = step_size``; ``"auto"`` (default) sets ``eta = 1 / lambda_max(H)``,
      estimated by power iteration: ``power_iterations`` steps at the first hyper-step,
      then one step warm-started from the previous eigenvector at every
      ``power_refresh_every``-th hyper-step; the hyper-steps in between reuse the last
      estimate (eigenvector and eigenvalue are the "solver state"). A refresh costs one
      Hessian-vector product (about 2 training steps); ``power_refresh_every=1``
      refreshes at every hyper-step. The series converges as long as the true
      ``lambda_max`` stays below twice the estimate (``0 < eta lambda_max < 2``); every
      Hessian-vector product checks it: where ``|H u| / |u| > 2 / eta`` for a term ``u``
      the estimate is stale, so ``lambda`` becomes that ratio (and ``u`` the eigenvector)
      and the series restarts (at most ``MAX_STEP_SIZE_CORRECTIONS = 3`` times a
      hyper-step; ``step_size_corrections`` counts them). Without this check a stale
      estimate lets the series grow like ``|1 - eta lambda_max|^J``.
      The published configuration is ``step_size=1.0, neumann_terms=5``.
    - ``"cg"``: conjugate gradient on ``H p = grad_theta L_V``, at most ``cg_iterations``
      iterations, stopping at relative residual ``cg_tol`` or at non-positive curvature.
    - ``"first_order"``: ``p = eta grad_theta L_V`` (``H^-1 ~ eta I``, DARTS-style).

    **Cost** (one training batch): each Hessian-vector product is one ``torch.autograd.grad``
    through a ``create_graph=True`` gradient of the training loss (built once). The
    mixed term uses that the loss sees ``theta`` only through the logits ``z``:
    ``d/dalpha <grad_theta L_T, p> = d/dalpha <dl/dz, J_theta p>``, with ``J_theta p`` from
    one forward pass in forward-mode AD and the rest a second derivative of the loss
    in logit space (models with a layer lacking forward-mode AD fall back to reverse
    over reverse). With ``ParametricCE(backend="fused")`` the loss part of both runs in
    the fused double backward kernel. So a Neumann hyper-step costs a validation
    gradient, a training gradient with graph, ``J`` Hessian-vector products (plus one
    every ``power_refresh_every`` hyper-steps) and one forward-mode pass. At most one
    training batch's second-order graph is alive at a time.

    **Applying it**: the hypergradient of ``ParametricCE.shift_param`` is projected to
    zero mean across clusters in each row (the shift gauge of MATH.md section 2); it
    is clipped to total norm ``max_hypergrad_norm`` if given; a non-finite
    hypergradient (e.g. from non-finite losses) skips the hyper-step -- ``alpha``, the
    hyper-optimizer and the solver state stay untouched and ``skipped_hyper_steps``
    counts it. The update is made by ``hyper_optimizer``, by default
    ``SGD(lr=0.05, momentum=0.9, weight_decay=1e-4)`` as in the paper.

    **Schedule**: ``hyper_step_due`` is true after training step ``t`` (counted by
    ``step``) when ``t >= max(warmup_steps, 1)`` and ``(t - warmup_steps) %
    hyper_every == 0``, once per step. ``hyper_step`` runs whenever it is called,
    except before the first training step or after ``freeze()`` (both raise).

    **The hyper-step's passes** run the model in eval mode (BatchNorm with its running
    statistics, which stay untouched; no dropout), then restore every module's mode
    (see ``_hyper_passes``).

    **DDP**: with the model wrapped in ``DistributedDataParallel``, ``grad_theta L_V``
    and every Hessian-vector product are all-reduced (averaged over ranks), so the
    solve uses the union of every rank's batches; the final hypergradient is
    gathered and summed in rank order, so every rank ends the hyper-step with
    bit-identical ``alpha``. Every rank must call ``hyper_step`` with the same number
    of train and validation batches.

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
        inner_params: ``theta``, a subset of ``optimizer``'s parameters (e.g. the last
            layer); default all of them that require grad.
    """

    MAX_STEP_SIZE_CORRECTIONS = 3  # restarts of the Neumann series per hyper-step (see the class docstring)

    def __init__(self, optimizer: torch.optim.Optimizer, criterion: nn.Module, objective, *,
                 hyper_optimizer: Optional[torch.optim.Optimizer] = None, warmup_steps: int = 0,
                 hyper_every: int = 20, solver: str = "neumann", neumann_terms: int = 5,
                 step_size: Union[str, float] = "auto", power_iterations: int = 5, power_refresh_every: int = 10,
                 cg_iterations: int = 10, cg_tol: float = 1e-6, inner_params: Optional[Iterable[torch.Tensor]] = None,
                 max_hypergrad_norm: Optional[float] = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"autobalance: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(criterion, nn.Module):
            raise TypeError(f"autobalance: `criterion` must be an nn.Module loss with learnable hyperparameters "
                            f"(e.g. ParametricCE), got {type(criterion).__name__}")
        self.optimizer, self.criterion, self.objective = optimizer, criterion, objective
        self._hyper_names, self._hyper = [], []
        for name, p in criterion.named_parameters():
            if p.requires_grad:
                self._hyper_names.append(name)
                self._hyper.append(p)
        if not self._hyper:
            raise ValueError(f"autobalance: `criterion` ({type(criterion).__name__}) has no learnable parameters; "
                             "expected a loss with learnable hyperparameters, e.g. ParametricCE(learn=('scale', "
                             "'shift'))")
        if not callable(objective):
            raise TypeError(f"autobalance: `objective` must be a callable loss, got {type(objective).__name__}")
        hyper_ids = {id(p) for p in self._hyper}
        if objective is criterion or (isinstance(objective, nn.Module)
                                      and any(id(p) in hyper_ids for p in objective.parameters())):
            raise ValueError("autobalance: `objective` must not depend on the loss hyperparameters (L_V(theta) of "
                             "MATH.md section 5); got an objective that shares parameters with `criterion`")

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
            raise ValueError(f"autobalance: `hyper_optimizer` must hold exactly the criterion's learnable parameters "
                             f"{self._hyper_names}, got {len(held)} parameters of which {len(held & hyper_ids)} match")
        self.hyper_optimizer = hyper_optimizer

        if solver not in SOLVERS:
            raise ValueError(f"autobalance: `solver` must be one of {SOLVERS}, got {solver!r}")
        if step_size != "auto" and (isinstance(step_size, bool) or not isinstance(step_size, (int, float))
                                    or not 0 < step_size < math.inf):
            raise ValueError(f"autobalance: `step_size` must be 'auto' or a positive finite float, got {step_size!r}")
        self.solver, self.step_size = solver, step_size
        self.neumann_terms = _int(neumann_terms, "neumann_terms", 0)
        self.power_iterations = _int(power_iterations, "power_iterations", 1)
        self.power_refresh_every = _int(power_refresh_every, "power_refresh_every", 1)
        self.cg_iterations = _int(cg_iterations, "cg_iterations", 1)
        if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not 0 <= cg_tol < math.inf:
            raise ValueError(f"autobalance: `cg_tol` must be a float >= 0, got {cg_tol!r}")
        self.cg_tol = float(cg_tol)
        self.warmup_steps = _int(warmup_steps, "warmup_steps", 0)
        self.hyper_every = _int(hyper_every, "hyper_every", 1)
        self.max_hypergrad_norm = _positive(max_hypergrad_norm, "max_hypergrad_norm", allow_none=True)

        self.steps = self.hyper_steps = self.skipped_hyper_steps = self.step_size_corrections = 0
        self.frozen = False
        self._last_hyper_step_at = -1
        self._eigenvector: Optional[torch.Tensor] = None
        self._eigenvalue: Optional[float] = None
        self._forward_ad = True  # False once the model turned out to lack forward-mode derivatives

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

    def __setstate__(self, state):
        self.__dict__.update(state)

    def add_param_group(self, param_group) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure=None):
        """One training step of the wrapped optimizer (Algorithm 1, line 6)."""
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
        counters and the solver state (the power-iteration eigenvector and eigenvalue)."""
        return {"optimizer": self.optimizer.state_dict(),
                "hyper_optimizer": self.hyper_optimizer.state_dict(),
                "hyperparameters": {n: p.detach().clone() for n, p in zip(self._hyper_names, self._hyper)},
                "schedule": {"steps": self.steps, "hyper_steps": self.hyper_steps,
                             "skipped_hyper_steps": self.skipped_hyper_steps,
                             "step_size_corrections": self.step_size_corrections,
                             "last_hyper_step_at": self._last_hyper_step_at, "frozen": self.frozen},
                "solver": {"eigenvector": None if self._eigenvector is None else self._eigenvector.clone(),
                           "eigenvalue": self._eigenvalue}}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["hyperparameters"]
        if sorted(saved) != sorted(self._hyper_names):
            raise ValueError(f"autobalance: the state dict holds hyperparameters {sorted(saved)}, but the criterion "
                             f"has {sorted(self._hyper_names)}")
        for name, p in zip(self._hyper_names, self._hyper):
            if saved[name].shape != p.shape:
                raise ValueError(f"autobalance: hyperparameter {name!r} has shape {list(p.shape)}, the state dict "
                                 f"holds {list(saved[name].shape)}")
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
        vector = state_dict["solver"]["eigenvector"]
        self._eigenvector = None if vector is None else vector.to(self._theta[0].device).clone()
        self._eigenvalue = state_dict["solver"]["eigenvalue"]
        self.frozen = False
        if schedule["frozen"]:
            self.freeze()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        hyper = "\n".join("    " + line for line in repr(self.hyper_optimizer).splitlines())
        refresh = f", power_refresh_every={self.power_refresh_every}" if self.step_size == "auto" else ""
        solver = {"neumann": f"neumann_terms={self.neumann_terms}, step_size={self.step_size!r}{refresh}",
                  "cg": f"cg_iterations={self.cg_iterations}, cg_tol={self.cg_tol}",
                  "first_order": f"step_size={self.step_size!r}{refresh}"}[self.solver]
        return (f"BilevelOptimizer(\n  optimizer:\n{inner}\n  hyper_optimizer:\n{hyper}\n"
                f"  hyperparameters: {self._hyper_names}\n  objective: {self.objective!r}\n"
                f"  solver={self.solver!r}, {solver}, theta={sum(p.numel() for p in self._theta)} weights\n"
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
        self.frozen = True
        for p in self._hyper:
            p.requires_grad_(False)
            p.grad = None

    # ---- the hypergradient

    def _batches(self, batches, name):
        if isinstance(batches, (torch.Tensor, str)) or not isinstance(batches, Iterable):
            raise TypeError(f"autobalance: `{name}` must be a list of (inputs, target) or (inputs, target, group) "
                            f"batches, got {type(batches).__name__}")
        batches = list(batches)
        if not batches:
            raise ValueError(f"autobalance: `{name}` is empty; expected at least one batch")
        device = self._theta[0].device
        out = []
        for i, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                raise ValueError(f"autobalance: `{name}[{i}]` must be (inputs, target) or (inputs, target, group), "
                                 f"got {type(batch).__name__}"
                                 + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
            inputs, target, group = (*batch, None)[:3]
            for part, t in (("inputs", inputs), ("target", target), ("group", group)):
                if isinstance(t, torch.Tensor) and t.device != device:
                    raise ValueError(f"autobalance: `{name}[{i}]` {part} is on {t.device} but the network weights "
                                     f"are on {device}")
            out.append((inputs, target, group))
        return out

    def _weight_decay(self):
        """The wrapped optimizer's L2 coefficient of every weight of theta, flat (None if all 0)."""
        decay = {id(p): float(g.get("weight_decay", 0.0)) for g in self.optimizer.param_groups for p in g["params"]}
        if all(decay[id(p)] == 0.0 for p in self._theta):
            return None
        return torch.cat([torch.full((p.numel(),), decay[id(p)], dtype=p.dtype, device=p.device) for p in self._theta])

    def _val_gradient(self, model, batch):
        """``(grad_theta L_V, L_V)`` of one validation batch, flat."""
        inputs, target, grp = batch
        loss = _loss(self.objective, model(inputs), target, grp)
        _check_scalar(loss, "objective")
        grads = torch.autograd.grad(loss, self._theta + self._hyper, allow_unused=True)
        if any(g is not None for g in grads[len(self._theta):]):
            raise ValueError("autobalance: the `objective` depends on the loss hyperparameters; L_V must be a "
                             "function of the network weights only (MATH.md section 5)")
        if all(g is None for g in grads[:len(self._theta)]):
            raise ValueError("autobalance: the validation loss does not depend on theta; pass the `model` "
                             "whose weights the wrapped optimizer trains")
        grad = _flat([torch.zeros_like(p) if g is None else g for p, g in zip(self._theta, grads)])
        return grad, float(loss.detach())

    def _power_iteration(self, hvp, like):
        """``(lambda, u)``: ``lambda = |H u|`` for the unit ``u`` after the power iterations
        (a lower bound on ``lambda_max``); ``(nan, None)`` if it is not positive and finite."""
        u = self._eigenvector
        iterations = 1
        if u is None or u.shape != like.shape:
            generator = torch.Generator().manual_seed(0)  # the same start on every rank
            u = torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
            iterations = self.power_iterations
        u = u / u.norm()
        for _ in range(iterations):
            w = hvp(u)
            eigenvalue = w.norm()
            u = w / eigenvalue
        eigenvalue = float(eigenvalue)
        if not (math.isfinite(eigenvalue) and eigenvalue > 0):
            return math.nan, None
        return eigenvalue, u

    def _eta(self, hvp, like):
        """``(eta, solver state)``: the fixed ``step_size``, or ``1 / lambda`` with ``lambda``
        refreshed by power iteration at every ``power_refresh_every``-th hyper-step (and
        whenever there is no estimate yet), else the saved one."""
        state = _SolverState(self._eigenvector, self._eigenvalue)
        if self.step_size != "auto":
            return float(self.step_size), state
        if (state.eigenvector is None or state.eigenvector.shape != like.shape or state.eigenvalue is None
                or self.hyper_steps % self.power_refresh_every == 0):
            eigenvalue, u = self._power_iteration(hvp, like)
            state = _SolverState(u, eigenvalue)
        return 1.0 / state.eigenvalue, state

    def _solve(self, hvp, v):
        """``(p, eta, solver state)`` with ``p ~ H^-1 v`` (MATH.md section 5)."""
        if self.solver == "cg":
            return _conjugate_gradient(hvp, v, self.cg_iterations, self.cg_tol), None, \
                _SolverState(self._eigenvector, self._eigenvalue)
        eta, state = self._eta(hvp, v)
        if self.solver == "first_order":
            return eta * v, eta, state
        term, p, j = v, v.clone(), 0
        while j < self.neumann_terms:
            h = hvp(term)
            if self.step_size == "auto" and state.corrections < self.MAX_STEP_SIZE_CORRECTIONS:
                # |H u| / |u| <= lambda_max for any u: a ratio above 2 / eta shows a direction in
                # which (I - eta H) expands, i.e. a stale lambda. Restart with that ratio as lambda.
                # (A zero term gives inf or nan: no restart. One host sync per product.)
                ratio = float(torch.linalg.vector_norm(h) / torch.linalg.vector_norm(term))
                if math.isfinite(ratio) and eta * ratio > 2.0:
                    eta = 1.0 / ratio
                    state = _SolverState(term / term.norm(), ratio, state.corrections + 1)
                    term, p, j = v, v.clone(), 0
                    continue
            term = term - eta * h
            p += term
            j += 1
        return eta * p, eta, state

    def _hypergradient(self, model, train_batches, val_batches):
        train = self._batches(train_batches, "train_batches")
        val = self._batches(val_batches, "val_batches")
        group = _process_group(model)
        with _hyper_passes(model):
            v, val_loss = 0.0, 0.0
            for batch in val:
                grad, loss = self._val_gradient(model, batch)
                v, val_loss = v + grad, val_loss + loss / len(val)
            v = _mean_over_ranks(v / len(val), group)
            train_grads = _TrainGradients(self, model, train, self._weight_decay(), group)
            p, eta, state = self._solve(train_grads.hvp, v)
            hypergrad = -train_grads.mixed(p)
            train_loss = sum(train_grads.losses) / len(train_grads.losses)
        hypergrad = _split(_ordered_mean_over_ranks(hypergrad, group), self._hyper)
        return _fix_shift_gauge(self.criterion, self._hyper_names, hypergrad), train_loss, val_loss, eta, state

    def hypergradient(self, model, train_batches, val_batches) -> List[torch.Tensor]:
        """The gauge-fixed hypergradient ``dL_V/dalpha`` (MATH.md section 5), one tensor per
        learnable parameter of the criterion, without applying it or changing any state."""
        return self._hypergradient(model, train_batches, val_batches)[0]

    def hyper_step(self, model, train_batches, val_batches) -> HyperStepResult:
        """One hyper-step (Algorithm 1, lines 7-9): the hypergradient at the current
        weights, applied by the hyper-optimizer. See the class docstring."""
        if self.frozen:
            raise RuntimeError("autobalance: hyper_step after freeze(); the learned loss is fixed for the retrain "
                               "phase")
        if self.steps == 0:
            raise RuntimeError("autobalance: hyper_step before any training step; the hypergradient assumes weights "
                               "trained on the current loss (take at least one step(), see warmup_steps)")
        hypergrad, train_loss, val_loss, eta, state = self._hypergradient(model, train_batches, val_batches)
        self._last_hyper_step_at = self.steps
        norm = float(torch.linalg.vector_norm(_flat(hypergrad)))
        if not math.isfinite(norm):
            self.skipped_hyper_steps += 1
            return HyperStepResult(False, norm, train_loss, val_loss, eta)
        factor = 1.0 if self.max_hypergrad_norm is None else min(1.0, self.max_hypergrad_norm / (norm + 1e-12))
        for p, g in zip(self._hyper, hypergrad):
            p.grad = (g * factor).to(p.dtype)
        self.hyper_optimizer.step()
        for p in self._hyper:
            p.grad = None
        self._eigenvector, self._eigenvalue = state.eigenvector, state.eigenvalue
        self.step_size_corrections += state.corrections
        self.hyper_steps += 1
        return HyperStepResult(True, norm, train_loss, val_loss, eta)


def _conjugate_gradient(hvp, b, iterations, tol):
    """``x ~ H^-1 b`` by conjugate gradient from ``x = 0``; stops at relative
    residual ``tol`` or when a direction has non-positive curvature."""
    x = torch.zeros_like(b)
    r, d = b.clone(), b.clone()
    rs = torch.dot(r, r)
    stop = (tol * float(b.norm())) ** 2
    for _ in range(iterations):
        if float(rs) <= stop:
            break
        hd = hvp(d)
        curvature = torch.dot(d, hd)
        if not float(curvature) > 0:
            break
        a = rs / curvature
        x += a * d
        r -= a * hd
        rs_next = torch.dot(r, r)
        d = r + (rs_next / rs) * d
        rs = rs_next
    return x


# ---- checking the hypergradient on a problem solved to optimality

@dataclass
class HypergradCheck:
    """The exact implicit hypergradient, the ``BilevelOptimizer`` estimate and
    (optionally) central finite differences, as flat float64 vectors over the
    criterion's learnable parameters."""
    exact: torch.Tensor
    estimate: torch.Tensor
    finite_difference: Optional[torch.Tensor] = None

    @staticmethod
    def _compare(a, b):
        cosine = float(torch.dot(a, b) / (a.norm() * b.norm()))
        return cosine, float((a - b).norm() / b.norm())

    @property
    def cosine(self) -> float:
        return self._compare(self.estimate, self.exact)[0]

    @property
    def relative_error(self) -> float:
        """``|estimate - exact| / |exact|``."""
        return self._compare(self.estimate, self.exact)[1]

    @property
    def fd_cosine(self) -> float:
        return self._compare(self.exact, self.finite_difference)[0]

    @property
    def fd_relative_error(self) -> float:
        """``|exact - finite_difference| / |finite_difference|``."""
        return self._compare(self.exact, self.finite_difference)[1]


def _unpack(batch, name):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(f"autobalance: `{name}` must be (features, target) or (features, target, group)")
    return (*batch, None)[:3]


def check_hypergrad(criterion: nn.Module, objective, train: Sequence[torch.Tensor], val: Sequence[torch.Tensor], *,
                    l2: float = 1e-2, finite_differences: bool = False, fd_step: float = 1e-4,
                    **options) -> HypergradCheck:
    """Checks ``BilevelOptimizer``'s hypergradient against the exact one (MATH.md section 5).

    The inner problem is L2-regularised multinomial logistic regression on
    ``train = (features [N, D], target[, group])``: ``theta = W [K, D]`` minimises
    ``criterion(x W^T, y[, g]) + l2/2 |W|^2``, solved to optimality by Newton's
    method in float64 with the dense Hessian. The exact hypergradient of
    ``objective`` on ``val`` is then a linear solve. The estimate is
    ``BilevelOptimizer(SGD(W, weight_decay=l2), criterion, objective, **options)
    .hypergradient`` at the optimum, with the same ``train`` / ``val`` batch. With
    ``finite_differences``, it also returns central differences (step ``fd_step``)
    of the re-solved validation loss along every coordinate of alpha.

    ``criterion`` (a ``ParametricCE``) is copied and cast to float64; the original
    is not changed. The exact hypergradient gets the same shift-gauge projection
    as the estimate; the finite differences get none (they are gauge-free).
    """
    criterion = copy.deepcopy(criterion).double()
    x, y, g = _unpack(train, "train")
    xv, yv, gv = _unpack(val, "val")
    x, xv = x.double(), xv.double()
    classes, features = criterion.num_classes, x.shape[1]
    names = [n for n, q in criterion.named_parameters() if q.requires_grad]
    hyper = [q for q in criterion.parameters() if q.requires_grad]

    def regularised_train_loss(w):  # the l2 term does not depend on alpha
        return _loss(criterion, x @ w.view(classes, features).T, y, g) + 0.5 * l2 * w.dot(w)

    def val_loss(w):
        return _loss(objective, xv @ w.view(classes, features).T, yv, gv)

    def gradient_and_hessian(w):
        w = w.detach().requires_grad_(True)
        grad = torch.autograd.grad(regularised_train_loss(w), w, create_graph=True)[0]
        return w, grad, torch.stack([torch.autograd.grad(grad[i], w, retain_graph=True)[0] for i in range(w.numel())])

    def solve(w):
        for _ in range(100):
            w, grad, hessian = gradient_and_hessian(w)
            step = torch.linalg.solve(hessian, grad.detach())
            w = w.detach() - step
            if float(step.norm()) <= 1e-12 * (1.0 + float(w.norm())):
                return w
        raise RuntimeError("autobalance: check_hypergrad: Newton's method did not converge; increase `l2`")

    w_star = solve(torch.zeros(classes * features, dtype=torch.float64))

    # exact: p = H^-1 grad L_V, hypergrad = -d/dalpha <grad_theta L_T, p>
    w, grad, hessian = gradient_and_hessian(w_star)
    p = torch.linalg.solve(hessian, torch.autograd.grad(val_loss(w), w)[0])
    exact = _fix_shift_gauge(criterion, names, _split(-_grad([grad], hyper, [p]), hyper))

    model = nn.Linear(features, classes, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star.view(classes, features))
    bopt = BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=l2), criterion, objective,
                            **options)
    estimate = bopt.hypergradient(model, [(x, y, g)[:3 if g is not None else 2]],
                                  [(xv, yv, gv)[:3 if gv is not None else 2]])

    fd = None
    if finite_differences:
        columns = []
        for q in hyper:
            flat = q.detach().view(-1)
            for j in range(flat.numel()):
                values = []
                for sign in (1.0, -1.0):
                    flat[j] += sign * fd_step
                    values.append(float(val_loss(solve(w_star)).detach()))
                    flat[j] -= sign * fd_step
                columns.append((values[0] - values[1]) / (2 * fd_step))
        fd = torch.tensor(columns, dtype=torch.float64)
    return HypergradCheck(_flat(exact).double(), _flat(estimate).double(), fd)
