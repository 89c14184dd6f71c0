"""Fake kernels of the three ops, for torch.compile / FakeTensor tracing.

Their autograd is C++ (``csrc/autograd.cpp``): the backward of
``parametric_ce`` is ``parametric_ce_backward``, the backward of that is the
fused ``parametric_ce_double_backward``, and a third derivative raises."""
import torch

from ._checks import accumulate_dtype, check_cotangents, check_inputs, check_label_smoothing, check_per_row

_lib = "autobalance::"


@torch.library.register_fake(_lib + "parametric_ce")
def _parametric_ce_fake(logits, target, group, weight, scale, shift, ignore_index, label_smoothing=0.0):
    rows, _, _ = check_inputs(logits, target, group, weight, scale, shift)
    check_label_smoothing(label_smoothing)
    acc = accumulate_dtype(logits.dtype)
    return logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc)


@torch.library.register_fake(_lib + "parametric_ce_backward")
def _parametric_ce_backward_fake(grad_loss, logits, target, group, weight, scale, shift, lse,
                                 ignore_index, table_grads, label_smoothing=0.0):
    rows, _, _ = check_inputs(logits, target, group, weight, scale, shift)
    check_label_smoothing(label_smoothing)
    acc = accumulate_dtype(logits.dtype)
    check_per_row(grad_loss, "grad_loss", rows, acc)
    check_per_row(lse, "lse", rows, acc)
    rows, classes = logits.shape
    return (logits.new_empty((rows, classes)),) + tuple(weight.new_empty(weight.shape) for _ in range(3))


@torch.library.register_fake(_lib + "parametric_ce_double_backward")
def _parametric_ce_double_backward_fake(grad_loss, logits, target, group, weight, scale, shift, lse,
                                        u_logits, u_weight, u_scale, u_shift, ignore_index, table_grads,
                                        label_smoothing=0.0):
    rows, _, groups = check_inputs(logits, target, group, weight, scale, shift)
    check_label_smoothing(label_smoothing)
    acc = accumulate_dtype(logits.dtype)
    check_per_row(grad_loss, "grad_loss", rows, acc)
    check_per_row(lse, "lse", rows, acc)
    check_cotangents(logits, groups, u_logits, u_weight, u_scale, u_shift)
    classes = logits.shape[1]
    return ((grad_loss.new_empty((rows,)), logits.new_empty((rows, classes)))
            + tuple(weight.new_empty(weight.shape) for _ in range(3)))


@torch.library.register_fake(_lib + "_parametric_ce_with_residual")
def _parametric_ce_with_residual_fake(logits, target, group, weight, scale, shift, ignore_index):
    loss, lse = _parametric_ce_fake(logits, target, group, weight, scale, shift, ignore_index)
    return loss, lse, logits.new_empty(logits.shape)


@torch.library.register_fake(_lib + "_parametric_ce_reduced_with_gradient")
def _parametric_ce_reduced_with_gradient_fake(logits, target, group, weight, scale, shift, ignore_index, mean,
                                              table_grads, label_smoothing=0.0):
    """Takes spatial [B, K, D] logits too; the gradient has their shape."""
    check_label_smoothing(label_smoothing)
    rows, _, _ = check_inputs(logits, target, group, weight, scale, shift, spatial=True)
    acc = accumulate_dtype(logits.dtype)
    if logits.dim() == 3:
        return ((logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc),
                 weight.new_empty((weight.numel(),)), logits.new_empty(logits.shape, dtype=acc))
                + tuple(weight.new_empty(weight.shape) for _ in range(3)))
    loss, lse, grad_logits = _parametric_ce_with_residual_fake(logits, target, group, weight, scale, shift,
                                                               ignore_index)
    return ((loss, lse, weight.new_empty((weight.numel(),)), grad_logits)
            + tuple(weight.new_empty(weight.shape) for _ in range(3)))


@torch.library.register_fake(_lib + "_parametric_ce_backward_from_residual_")
def _parametric_ce_backward_from_residual_fake(grad_loss, logits, target, group, weight, scale, shift, lse,
                                               residual, ignore_index, table_grads):
    """Overwrites `residual` with grad_logits; returns the three table gradients."""
    if residual.shape != logits.shape or residual.dtype != logits.dtype:
        raise ValueError(f"autobalance: `residual` must have the shape and dtype of logits "
                         f"({list(logits.shape)}, {logits.dtype}), got {list(residual.shape)}, {residual.dtype}")
    return _parametric_ce_backward_fake(grad_loss, logits, target, group, weight, scale, shift, lse,
                                        ignore_index, table_grads)[1:]
