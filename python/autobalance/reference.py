"""The ops of ``autobalance_ext`` in plain PyTorch, one function per op, same
names and argument order (docs/math.md sections 1, 3, 4 and 8).

``parametric_ce`` is written with differentiable PyTorch ops, so autograd
gives its derivatives; the backward and double backward here are those
autograd derivatives, and they serve as the oracle for the fused kernels.

``target`` is int64 class indices [N] (rows equal to ``ignore_index`` give 0
everywhere) or a probability target: a floating [N, K] tensor of the logits'
dtype, any values, no ignored rows. ``label_smoothing`` ε in [0, 1] mixes
the target with the uniform distribution: per row the target distribution is
``q = (1 - ε) onehot(y) + ε / K`` or ``q = (1 - ε) P + ε / K``, and the loss
``sum_k q_k W[g,k] (lse(a) - a_k)`` (section 8).
"""
import torch

from autobalance_ext._checks import (accumulate_dtype, check_cotangents, check_inputs, check_label_smoothing,
                                     check_per_row)


def _check_ranges(target, group, classes, groups, ignore_index):
    """Range checks of the indices; ``target`` None (a probability target): the
    group of every row. Returns the mask of the rows that count (None: all)."""
    valid = None
    if target is not None:
        valid = target != ignore_index
        bad = valid & ((target < 0) | (target >= classes))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"autobalance: `target[{i}]` = {int(target[i])} is out of range: expected a class in "
                             f"[0, {classes}) or ignore_index = {ignore_index}")
    if group is not None:
        bad = (group < 0) | (group >= groups)
        if valid is not None:
            bad = valid & bad
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"autobalance: `group[{i}]` = {int(group[i])} is out of range: expected a group in "
                             f"[0, {groups}) (the tables have G = {groups} rows)")
    return valid


def _probability_target_loss(logits, target, group, weight, scale, shift, label_smoothing, classes, groups):
    """``sum_k q_k W[g,k] (lse - a_k)`` with ``q = (1 - ε) P + ε / K``, every row."""
    if not torch.compiler.is_compiling():
        _check_ranges(None, group, classes, groups, None)
    acc = accumulate_dtype(logits.dtype)
    z = logits.to(acc)
    g = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device) if group is None else group
    a = scale[g] * z + shift[g]
    lse = torch.logsumexp(a, dim=1)
    q = (1.0 - label_smoothing) * target.to(acc) + label_smoothing / classes
    loss = (q * weight[g] * (lse[:, None] - a)).sum(1)
    return loss, lse.detach()


def parametric_ce(logits, target, group, weight, scale, shift, ignore_index, label_smoothing=0.0):
    """Per-sample loss ``sum_k q_k W[g,k] (lse - a_k)`` with ``a = S[g] z + L[g]``, and ``lse``;
    for class indices without smoothing, ``W[g,y] (lse - a_y)``.

    Ignored rows (class-index targets) give 0 for both. Returns ``(loss, lse)`` in
    the accumulation dtype.
    """
    rows, classes, groups = check_inputs(logits, target, group, weight, scale, shift)
    eps = check_label_smoothing(label_smoothing)
    if target.is_floating_point():
        return _probability_target_loss(logits, target, group, weight, scale, shift, eps, classes, groups)
    if torch.compiler.is_compiling():  # range checks read data; eager mode runs them
        valid = target != ignore_index
    else:
        valid = _check_ranges(target, group, classes, groups, ignore_index)
    z = logits.to(accumulate_dtype(logits.dtype))
    y = torch.where(valid, target, torch.zeros_like(target))
    g = torch.zeros_like(target) if group is None else torch.where(valid, group, torch.zeros_like(group))
    a = scale[g] * z + shift[g]
    lse = torch.logsumexp(a, dim=1)
    if eps == 0.0:  # the one-hot target: the label's term alone
        ce = lse - a.gather(1, y[:, None]).squeeze(1)
        loss = weight[g, y] * ce
    else:
        onehot = torch.nn.functional.one_hot(y, classes).to(a.dtype)
        q = (1.0 - eps) * onehot + eps / classes
        loss = (q * weight[g] * (lse[:, None] - a)).sum(1)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero).detach()


def _leaf(t):
    return t.detach().requires_grad_(True)


def _grads(out, inputs, grad_out):
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True, create_graph=torch.is_grad_enabled())
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def parametric_ce_backward(grad_loss, logits, target, group, weight, scale, shift, lse, ignore_index, table_grads,
                           label_smoothing=0.0):
    """``(grad_logits, grad_weight, grad_scale, grad_shift)`` of ``<grad_loss, loss>``.

    Differentiable (built with ``create_graph``) when grad mode is on.
    ``lse`` is accepted for signature parity and recomputed.
    """
    rows, _, _ = check_inputs(logits, target, group, weight, scale, shift)
    check_label_smoothing(label_smoothing)
    acc = accumulate_dtype(logits.dtype)
    check_per_row(grad_loss, "grad_loss", rows, acc)
    check_per_row(lse, "lse", rows, acc)
    with torch.enable_grad():
        ins = [x if x.requires_grad else _leaf(x) for x in (logits, weight, scale, shift)]
        loss, _ = parametric_ce(ins[0], target, group, *ins[1:], ignore_index, label_smoothing)
        grads = _grads(loss, ins, grad_loss)
    if not table_grads:
        grads[1:] = [torch.zeros_like(weight) for _ in range(3)]
    return tuple(grads)


def parametric_ce_double_backward(grad_loss, logits, target, group, weight, scale, shift, lse,
                                  u_logits, u_weight, u_scale, u_shift, ignore_index, table_grads,
                                  label_smoothing=0.0):
    """Gradients of ``Q = <(Uz, UW, US, UL), backward(...)>`` w.r.t.
    ``(grad_loss, logits, weight, scale, shift)``; absent cotangents are zero."""
    rows, _, groups = check_inputs(logits, target, group, weight, scale, shift)
    check_label_smoothing(label_smoothing)
    check_cotangents(logits, groups, u_logits, u_weight, u_scale, u_shift)
    with torch.enable_grad():
        ins = [_leaf(x) for x in (grad_loss, logits, weight, scale, shift)]
        first = parametric_ce_backward(ins[0], ins[1], target, group, *ins[2:], lse, ignore_index, True,
                                       label_smoothing)
        q = sum((u.to(f.dtype) * f).sum() for u, f in zip((u_logits, u_weight, u_scale, u_shift), first)
                if u is not None)
        if isinstance(q, int):  # every cotangent absent
            grads = [torch.zeros_like(x) for x in ins]
        else:
            grads = _grads(q, ins, None)
    grads = [g.detach() for g in grads]
    if not table_grads:
        grads[2:] = [torch.zeros_like(weight) for _ in range(3)]
    return tuple(grads)
