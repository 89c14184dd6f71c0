"""The parametric cross-entropy as a function (docs/math.md section 1), on either
backend: ``"fused"`` (the compiled kernels of ``autobalance_ext``) or
``"reference"`` (plain PyTorch, ``autobalance.reference``). Where the compiled
ops could not be loaded (``autobalance_ext`` warned at import), ``"fused"``
runs the reference path."""
import torch

import autobalance_ext
from autobalance import reference
from autobalance._validation import check_choice

BACKENDS = ("fused", "reference")
REDUCTIONS = ("none", "sum", "mean")


# A plain bool, read once, so torch.compile traces the check as a constant.
_FUSED_HAS_CUDA = autobalance_ext.has_cuda_kernels()
# The fused ops' overloads, looked up once (each lookup through torch.ops costs
# microseconds on every call); None without the compiled ops.
_FUSED = _FUSED_REDUCED = None
if autobalance_ext.has_compiled_ops():
    _FUSED = torch.ops.autobalance.parametric_ce.default
    _FUSED_REDUCED = torch.ops.autobalance.parametric_ce_reduced.default


def _op(backend, on_cuda):
    check_choice(backend, "backend", BACKENDS)
    if backend == "reference" or _FUSED is None:
        return reference.parametric_ce
    if on_cuda and not _FUSED_HAS_CUDA:
        raise RuntimeError("autobalance: this build has no CUDA kernels; rebuild with FORCE_CUDA=1 "
                           "(see README) or pass backend='reference'")
    return _FUSED


def parametric_cross_entropy(logits, target, weight, scale, shift, group=None, *,
                             reduction="mean", ignore_index=-100, backend="fused"):
    """Weighted CE of affine-adjusted logits, ``W[g,y] (lse(S[g] z + L[g]) - S[g,y] z_y - L[g,y])``.

    Args:
        logits: ``[N, K]`` float32/float64/bfloat16/float16, any strides; or, as
            ``F.cross_entropy`` takes them, ``[K]`` (unbatched, with a 0-d target) or
            ``[N, K, d1, ..., dk]`` (class dimension 1, with ``[N, d1, ..., dk]``
            targets): every position is a row (docs/math.md section 8).
        target: int64 class indices, ``[N]`` (or the shapes above); rows equal to
            ``ignore_index`` contribute nothing.
        weight, scale, shift: the ``[G, K]`` tables W, S, L; cast to the accumulation
            dtype (float64 for float64 logits, else float32).
        group: optional int64 group index in ``[0, G)`` of the target's shape; required
            when ``G > 1``.
        reduction: ``"none"`` (per-sample loss of the target's shape, 0 on ignored rows), ``"sum"``, or
            ``"mean"`` = ``sum_i loss_i / sum_i W[g_i, y_i]`` over non-ignored rows
            (PyTorch's weighted mean; NaN when every row is ignored, as in
            ``F.cross_entropy``).
        backend: ``"fused"`` or ``"reference"``.

    A NaN or infinite logit makes its own row's loss non-finite and its
    gradients NaN; other rows are unaffected.
    The loss is returned in the accumulation dtype.
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"autobalance: `logits` must be a Tensor, got {type(logits).__name__}")
    op = _op(backend, logits.is_cuda)
    shape = None if logits.dim() == 2 else _index_shape(logits, target, group)
    if shape is not None:
        logits, target, group = _as_rows(logits, target, group, shape)
    acc = autobalance_ext.accumulate_dtype(logits.dtype)
    if not (isinstance(weight, torch.Tensor) and weight.dtype == acc and isinstance(scale, torch.Tensor)
            and scale.dtype == acc and isinstance(shift, torch.Tensor) and shift.dtype == acc):
        weight, scale, shift = (t.to(acc) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                for t in (weight, scale, shift))
    if op is _FUSED and reduction != "none":  # one autograd node for loss and reduction
        return _FUSED_REDUCED(logits, target, group, weight, scale, shift, ignore_index, reduction == "mean")
    loss, _ = op(logits, target, group, weight, scale, shift, ignore_index)
    if reduction == "none":
        return loss if shape is None else loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _weight_sum(weight, target, group, ignore_index)


def _index_shape(logits, target, group):
    """The target's shape for ``[K]`` or ``[N, K, d1..dk]`` logits (checked, with
    the group's); the ``[N, K]`` case is checked by the ops."""
    if logits.dim() == 0:
        raise ValueError("autobalance: `logits` must have shape [K], [N, K] or [N, K, d1, ..., dk], got a 0-d tensor")
    for name, t in (("target", target), ("group", group)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"autobalance: `{name}` must be a Tensor, got {type(t).__name__}")
    if logits.dim() == 1:
        expected, form = (), "be a 0-d (scalar) tensor for unbatched [K] logits"
    else:
        expected = (logits.shape[0], *logits.shape[2:])
        form = f"have shape [N, d1, ..., dk] = {list(expected)} for logits of shape {list(logits.shape)}"
    if tuple(target.shape) != expected:
        raise ValueError(f"autobalance: `target` must {form}, got shape {list(target.shape)}")
    if group is not None and group.shape != target.shape:
        raise ValueError(f"autobalance: `group` must have the target's shape {list(target.shape)}, "
                         f"got {list(group.shape)}")
    return target.shape


def _as_rows(logits, target, group, shape):
    """``[K]`` / ``[N, K, d1..dk]`` logits as ``[R, K]`` rows (class dimension last),
    and the indices as ``[R]``. A view where the layout allows (``[K]``, and a
    class dimension of stride 1 such as channels-last); otherwise one copy of
    the logits (autograd takes the gradient back through it)."""
    rows = target.numel()
    z = logits.reshape(1, -1) if logits.dim() == 1 else logits.movedim(1, -1).reshape(rows, logits.shape[1])
    return z, target.reshape(rows), None if group is None else group.reshape(rows)


def _weight_sum(weight, target, group, ignore_index):
    """``sum_i W[g_i, y_i]`` over the rows that are not ignored: the ``mean``
    denominator, as ``<counts, W>`` with the per-cell row counts (so it is
    differentiable in ``weight``, with a cheap backward). The counts are
    whole numbers added in floating point, hence exact and deterministic.
    (The fused backend does the same in C++: ``cell_counts`` in
    ``csrc/autograd.cpp``.)"""
    valid = target != ignore_index
    cell = target if group is None else group * weight.shape[1] + target
    counts = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    counts.index_add_(0, cell.masked_fill(~valid, 0), valid.to(weight.dtype))
    return torch.dot(counts, weight.reshape(-1))
