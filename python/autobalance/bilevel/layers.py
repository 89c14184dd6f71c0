"""The hyper-step's layers: PyTorch's kernels, cheaper second derivatives
(docs/math.md section 5), and ``hyper_passes``, the mode the hyper-step's forward
passes run in.

PyTorch's generic double backward of a convolution runs slower kernels than its backward,
and that of eval-mode BatchNorm is a long chain of full-size elementwise ops: on CPU
about a fifth of each Hessian-vector product of ResNet-32 and a third of the small
CNN's. During the hyper-step's passes ``HyperStepLayers`` routes these layers through
autograd Functions that compute the same values and gradients with the same kernels (on
a CPU with oneDNN, 2-D convolutions in channels-last layout, see ``_nhwc``: the same
values up to rounding) and whose derivatives are written out: the double backward of a convolution is two
convolutions and PyTorch's backward-data and backward-weights kernels, and eval-mode
BatchNorm, an affine map per channel, needs a few elementwise passes. They also give the
forward-mode derivatives (``jvp``) of the mixed term. Third derivatives are not needed.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from autobalance.bilevel.distributed import no_sync


def _per_channel(t, like):
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def _nhwc(*tensors):
    """The tensors in channels-last layout where that is the faster one: 4-D, on a CPU
    with oneDNN, whose NCHW convolutions reorder their operands at every call (measured
    on ResNet-32's 16-channel layers: backward 2.1x, forward 1.5x faster)."""
    if tensors[0].dim() != 4 or tensors[0].device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return tensors
    return tuple(t.contiguous(memory_format=torch.channels_last) for t in tensors)


def _conv(x, weight, bias, args):
    stride, padding, dilation, groups = args
    x, weight = _nhwc(x, weight)
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
    grad, x, weight = _nhwc(grad, x, weight)
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


class HyperStepLayers(TorchFunctionMode):
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
def hyper_passes(model, theta=None):
    """Runs the hyper-step's forward passes with every module of the model in
    eval mode (each module's own mode is restored afterwards), for three reasons:

    - BatchNorm uses its running statistics and does not update them, so the
      hyper-step leaves the model's buffers as they were;
    - stochastic layers (dropout) are off, so every pass computes the same
      function and the solver's Hessian-vector products share one Hessian;
    - PyTorch's double backward of train-mode BatchNorm costs several times that
      of eval mode, where BatchNorm is a per-channel affine map.

    The passes also run under ``HyperStepLayers`` (cheaper second derivatives of
    convolutions and eval-mode BatchNorm).

    Under DDP the passes also run in ``no_sync()``: DDP's gradient hooks do not
    fire for ``torch.autograd.grad``, and the hyper-step reduces explicitly.

    With ``theta`` (the hypergradient's weights), the model's other parameters stop
    requiring grad for the passes (restored afterwards): nothing is differentiated
    with respect to them, so autograd records no graph through the layers before
    the first weight of ``theta`` (e.g. only the classifier's, for ``theta`` = the
    last layer).
    """
    modes = [(m, m.training) for m in model.modules()]
    keep = None if theta is None else {id(p) for p in theta}
    fixed = [] if keep is None else [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    model.eval()
    try:
        for p in fixed:
            p.requires_grad_(False)
        with no_sync(model), torch.enable_grad(), HyperStepLayers():
            yield
    finally:
        for p in fixed:
            p.requires_grad_(True)
        for module, training in modes:
            module.training = training
