"""Fake kernels (for torch.compile / FakeTensor tracing) and autograd for the
three ops. The backward of ``parametric_ce`` is ``parametric_ce_backward``;
the backward of that is the fused ``parametric_ce_double_backward``; a third
derivative raises."""
import torch

from ._checks import accumulate_dtype, check_cotangents, check_inputs, check_per_row

_lib = "autobalance::"


@torch.library.register_fake(_lib + "parametric_ce")
def _parametric_ce_fake(logits, target, group, weight, scale, shift, ignore_index):
    rows, _, _ = check_inputs(logits, target, group, weight, scale, shift)
    acc = accumulate_dtype(logits.dtype)
    return logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc)


@torch.library.register_fake(_lib + "parametric_ce_backward")
def _parametric_ce_backward_fake(grad_loss, logits, target, group, weight, scale, shift, lse,
                                 ignore_index, table_grads):
    rows, _, _ = check_inputs(logits, target, group, weight, scale, shift)
    acc = accumulate_dtype(logits.dtype)
    check_per_row(grad_loss, "grad_loss", rows, acc)
    check_per_row(lse, "lse", rows, acc)
    rows, classes = logits.shape
    return (logits.new_empty((rows, classes)),) + tuple(weight.new_empty(weight.shape) for _ in range(3))


@torch.library.register_fake(_lib + "parametric_ce_double_backward")
def _parametric_ce_double_backward_fake(grad_loss, logits, target, group, weight, scale, shift, lse,
                                        u_logits, u_weight, u_scale, u_shift, ignore_index, table_grads):
    rows, _, groups = check_inputs(logits, target, group, weight, scale, shift)
    acc = accumulate_dtype(logits.dtype)
    check_per_row(grad_loss, "grad_loss", rows, acc)
    check_per_row(lse, "lse", rows, acc)
    check_cotangents(logits, groups, u_logits, u_weight, u_scale, u_shift)
    classes = logits.shape[1]
    return ((grad_loss.new_empty((rows,)), logits.new_empty((rows, classes)))
            + tuple(weight.new_empty(weight.shape) for _ in range(3)))


# ---- autograd: parametric_ce -> parametric_ce_backward

def _setup_forward(ctx, inputs, output):
    logits, target, group, weight, scale, shift, ignore_index = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)  # a statistic for the backward, not a model output
    ctx.save_for_backward(logits, target, group, weight, scale, shift, lse)
    ctx.ignore_index = ignore_index


def _forward_backward(ctx, grad_loss, _grad_lse):
    logits, target, group, weight, scale, shift, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    table_grads = any(need[3:6])
    grad_logits, grad_weight, grad_scale, grad_shift = torch.ops.autobalance.parametric_ce_backward(
        grad_loss, logits, target, group, weight, scale, shift, lse, ctx.ignore_index, table_grads)
    return (grad_logits if need[0] else None, None, None,
            grad_weight if need[3] else None, grad_scale if need[4] else None,
            grad_shift if need[5] else None, None)


torch.library.register_autograd(_lib + "parametric_ce", _forward_backward, setup_context=_setup_forward)


# ---- autograd: parametric_ce_backward -> parametric_ce_double_backward

def _setup_backward(ctx, inputs, output):
    grad_loss, logits, target, group, weight, scale, shift, lse, ignore_index, table_grads = inputs
    ctx.save_for_backward(grad_loss, logits, target, group, weight, scale, shift, lse)
    ctx.ignore_index = ignore_index
    ctx.table_grads = table_grads
    ctx.set_materialize_grads(False)  # absent cotangents stay None: no [N, K] zeros


def _backward_backward(ctx, u_logits, u_weight, u_scale, u_shift):
    grad_loss, logits, target, group, weight, scale, shift, lse = ctx.saved_tensors
    if not ctx.table_grads:  # the table outputs were constant zeros
        u_weight = u_scale = u_shift = None
    need = ctx.needs_input_grad
    if all(u is None for u in (u_logits, u_weight, u_scale, u_shift)):
        return (None,) * 10
    outs = torch.ops.autobalance.parametric_ce_double_backward(
        grad_loss, logits, target, group, weight, scale, shift, lse,
        u_logits, u_weight, u_scale, u_shift, ctx.ignore_index, any(need[4:7]))
    grad_grad_loss, grad_logits, grad_weight, grad_scale, grad_shift = outs
    return (grad_grad_loss if need[0] else None, grad_logits if need[1] else None, None, None,
            grad_weight if need[4] else None, grad_scale if need[5] else None,
            grad_shift if need[6] else None, None, None, None)


torch.library.register_autograd(_lib + "parametric_ce_backward", _backward_backward,
                                setup_context=_setup_backward)


# ---- third derivatives: not needed by anything in the package

def _setup_double_backward(ctx, inputs, output):
    pass


def _third_derivative(ctx, *grads):
    raise NotImplementedError(
        "autobalance: third derivatives of the parametric cross-entropy are not implemented; "
        "differentiate at most twice (create_graph=True once)")


torch.library.register_autograd(_lib + "parametric_ce_double_backward", _third_derivative,
                                setup_context=_setup_double_backward)
