"""The parametric cross-entropy as a function (docs/math.md section 1), on either
backend: ``"fused"`` (the compiled kernels of ``autobalance_ext``) or
``"reference"`` (plain PyTorch, ``autobalance.reference``). Where the compiled
ops could not be loaded (``autobalance_ext`` warned at import), ``"fused"``
runs the reference path."""
import math

import torch
from torch.nn import _reduction as _Reduction

import autobalance_ext
from autobalance import reference
from autobalance._validation import check_choice
from autobalance_ext._checks import check_label_smoothing

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


def parametric_cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                             reduction="mean", label_smoothing=0.0, *, scale=None, shift=None, group=None,
                             backend="fused"):
    """``F.cross_entropy`` of affine-adjusted logits with per-(group, class) tables:
    per row ``Σ_k q_k W[g,k] (lse(S[g] z + L[g]) - S[g,k] z_k - L[g,k])`` with ``q``
    the target distribution (docs/math.md sections 1 and 8).

    The positional arguments and their defaults are ``F.cross_entropy``'s, with the
    same meaning; with the default tables every case equals ``F.cross_entropy``.

    Args:
        input: logits, float32/float64/bfloat16/float16, any strides: ``[C]``
            (unbatched), ``[N, C]`` or ``[N, C, d1, ..., dk]`` (every position a row;
            class dimension 1).
        target: int64 class indices of the input's shape without the class dimension
            (``[]``, ``[N]``, ``[N, d1, ..., dk]``; rows equal to ``ignore_index``
            contribute nothing), or a probability target of the input's shape and
            dtype (no ignored rows; it gets a gradient when it requires one).
        weight: the table W: ``None`` (1), a ``[C]`` class weight as in
            ``F.cross_entropy``, or ``[G, C]``.
        size_average, reduce: PyTorch's deprecated spellings of ``reduction``.
        ignore_index: for class-index targets (a probability target with an
            ``ignore_index`` other than -100 is an error, as in ``F.cross_entropy``).
        reduction: ``"none"`` (the loss of each row, in the target's index shape),
            ``"sum"``, or ``"mean"``: for class indices ``sum_i loss_i / sum_i
            W[g_i, y_i]`` over the rows not ignored (NaN when all are), for a
            probability target the sum divided by the number of rows.
        label_smoothing: ε in [0, 1]: ``q = (1 - ε) target + ε / C``.
        scale, shift: the tables S (default 1) and L (default 0): ``[C]`` or ``[G, C]``.
        group: int64 group index in ``[0, G)`` of the target's index shape; required
            when a table has ``G > 1`` rows.
        backend: a testing aid: ``"fused"`` (the compiled kernels, the default) or
            ``"reference"`` (plain PyTorch, ``autobalance.reference``).

    The tables are cast to the accumulation dtype (float64 for float64 input, else
    float32), the loss is computed in it and returned in the input's dtype, as
    ``F.cross_entropy`` does. A NaN or infinite logit makes its own row's loss
    non-finite and its gradients NaN; other rows are unaffected.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    check_choice(reduction, "reduction", REDUCTIONS)
    label_smoothing = check_label_smoothing(label_smoothing)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"autobalance: `input` must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"autobalance: `target` must be a Tensor, got {type(target).__name__}")
    if target.is_floating_point() and ignore_index != -100:
        raise ValueError(f"autobalance: `ignore_index` is not supported for a probability target (a "
                         f"floating-point `target`), got ignore_index={ignore_index}; as in F.cross_entropy")
    op = _op(backend, input.is_cuda)
    logits, out_dtype = input, input.dtype
    shape = None if logits.dim() == 2 else _index_shape(logits, target, group)
    if shape is not None and op is _FUSED and reduction != "none" and logits.dim() > 2 and logits.is_contiguous():
        # NCHW-contiguous: the reduced op takes [B, K, D] in place (docs/math.md section 8)
        logits, target, group = _as_spatial(logits, target, group)
    elif shape is not None:
        logits, target, group = _as_rows(logits, target, group, shape)
    weight, scale, shift = _tables(weight, scale, shift, logits)
    if op is _FUSED and reduction != "none":  # one autograd node for loss and reduction
        out = _FUSED_REDUCED(logits, target, group, weight, scale, shift, ignore_index, reduction == "mean",
                             label_smoothing)
    else:
        loss, _ = op(logits, target, group, weight, scale, shift, ignore_index, label_smoothing)
        if reduction == "none":
            out = loss if shape is None else loss.reshape(shape)
        elif reduction == "sum":
            out = loss.sum()
        elif target.is_floating_point():
            out = loss.sum() / loss.shape[0]
        else:
            out = loss.sum() / _weight_sum(weight, target, group, ignore_index)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def _tables(weight, scale, shift, logits):
    """W, S, L as ``[G, K]`` tables in the accumulation dtype, from None, ``[K]`` or
    ``[G, K]`` (a ``[K]`` or ``[1, K]`` table broadcast over the others' G rows)."""
    acc = autobalance_ext.accumulate_dtype(logits.dtype)
    given = {"weight": weight, "scale": scale, "shift": shift}
    rows, source = 1, None  # G, and the table it comes from
    for name, t in given.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"autobalance: `{name}` must be None or a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"autobalance: `{name}` must be a floating-point tensor, got {t.dtype}")
        if t.dim() not in (1, 2):
            raise ValueError(f"autobalance: `{name}` must have shape [C] or [G, C], got {list(t.shape)}")
        if t.dim() == 2 and t.shape[0] != 1:
            if source is not None and t.shape[0] != rows:
                raise ValueError(f"autobalance: `{name}` must have shape [C], [1, C] or [G, C] with G = {rows} "
                                 f"(from `{source}`), got {list(t.shape)}")
            if source is None:
                rows, source = t.shape[0], name
    classes = logits.shape[1]  # [R, K] rows or [B, K, D] by now
    tables = []
    for t, fill in ((weight, 1.0), (scale, 1.0), (shift, 0.0)):
        if t is None:
            t = torch.full((rows, classes), fill, dtype=acc, device=logits.device)
        else:
            t = t.to(acc)
            if t.dim() == 1:
                t = t[None]
            if t.shape[0] != rows:
                t = t.expand(rows, -1)
        tables.append(t)
    return tables


def _index_shape(logits, target, group):
    """The target's index shape for ``[K]`` or ``[N, K, d1..dk]`` logits (checked,
    with the group's); the ``[N, K]`` case is checked by the ops."""
    if logits.dim() == 0:
        raise ValueError("autobalance: `input` must have shape [C], [N, C] or [N, C, d1, ..., dk], got a 0-d tensor")
    if group is not None and not isinstance(group, torch.Tensor):
        raise TypeError(f"autobalance: `group` must be a Tensor, got {type(group).__name__}")
    if logits.dim() == 1:
        expected, form = (), "be a 0-d (scalar) tensor for unbatched [C] logits"
    else:
        expected = (logits.shape[0], *logits.shape[2:])
        form = f"have shape [N, d1, ..., dk] = {list(expected)} for logits of shape {list(logits.shape)}"
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(f"autobalance: a floating-point `target` is a probability target and must have the "
                             f"input's shape {list(logits.shape)}, got {list(target.shape)}; class-index targets "
                             f"are int64 of shape {list(expected)}")
    elif tuple(target.shape) != expected:
        raise ValueError(f"autobalance: `target` must {form}, got shape {list(target.shape)}")
    if group is not None and tuple(group.shape) != expected:
        raise ValueError(f"autobalance: `group` must have the target's index shape {list(expected)}, "
                         f"got {list(group.shape)}")
    return torch.Size(expected)


def _as_rows(logits, target, group, shape):
    """``[K]`` / ``[N, K, d1..dk]`` logits (and a probability target) as ``[R, K]``
    rows (class dimension last), and the indices as ``[R]``. A view where the
    layout allows (``[K]``, and a class dimension of stride 1 such as
    channels-last); otherwise one copy (autograd takes the gradient back
    through it)."""
    rows = shape.numel()

    def as_rows(t):
        return t.reshape(1, -1) if t.dim() == 1 else t.movedim(1, -1).reshape(rows, t.shape[1])

    target = as_rows(target) if target.is_floating_point() else target.reshape(rows)
    return as_rows(logits), target, None if group is None else group.reshape(rows)


def _as_spatial(logits, target, group):
    """Contiguous ``[N, K, d1..dk]`` logits as ``[N, K, D]`` (a view; the fused
    reduced op reads row ``n D + j`` with class stride ``D``, and its CPU fast
    path writes the gradient in that layout), the indices as ``[N, D]``."""
    batch, classes = logits.shape[:2]
    inner = math.prod(logits.shape[2:])  # (not -1: N = 0 would leave it undefined)
    spatial = logits.reshape(batch, classes, inner)
    target = target.reshape(spatial.shape) if target.is_floating_point() else target.reshape(batch, inner)
    return spatial, target, None if group is None else group.reshape(batch, inner)


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
