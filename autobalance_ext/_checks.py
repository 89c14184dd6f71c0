"""Shape and dtype checks of the ops' arguments, for the fake kernels and the
reference path; the compiled kernels run the same checks in
``csrc/checks.h``. Value checks (label and group ranges) need the data and
live in the kernels and the reference path."""
import torch

_LOGIT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accumulate_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """float64 logits accumulate in float64, every other dtype in float32."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _check_table(t, name, groups, classes, acc, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"autobalance: `{name}` must be a Tensor, got {type(t).__name__}")
    if t.dtype != acc:
        raise TypeError(f"autobalance: `{name}` must have dtype {acc} for logits of this dtype, got {t.dtype}")
    if t.dim() != 2 or tuple(t.shape) != (groups, classes):
        raise ValueError(f"autobalance: `{name}` must have shape [G, K] = [{groups}, {classes}], got {list(t.shape)}")
    _check_device(t, name, device)


def _check_index(t, name, rows, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"autobalance: `{name}` must be a Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"autobalance: `{name}` must have dtype torch.int64, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != rows:
        raise ValueError(f"autobalance: `{name}` must have shape [N] = [{rows}] to match logits, got {list(t.shape)}")
    _check_device(t, name, device)


def _check_device(t, name, device):
    if t.device != device:
        raise ValueError(f"autobalance: `{name}` is on {t.device} but `logits` is on {device}; "
                         "move both to the same device")


def check_per_row(t, name, rows, acc):
    if t.dtype != acc:
        raise TypeError(f"autobalance: `{name}` must have dtype {acc}, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != rows:
        raise ValueError(f"autobalance: `{name}` must have shape [N] = [{rows}], got {list(t.shape)}")


def check_inputs(logits, target, group, weight, scale, shift, spatial=False):
    """Checks every argument's type, dtype, shape and device; returns (N, K, G).
    With ``spatial``, ``[B, K, D]`` logits with ``[B, D]`` indices are taken too
    (``N = B D`` rows; ``csrc/checks.h``: ``Sizes::spatial``)."""
    if spatial and isinstance(logits, torch.Tensor) and logits.dim() == 3:
        batch, classes, inner = logits.shape
        as_rows = logits.new_empty((batch * inner, classes))
        for name, t in (("target", target), ("group", group)):
            if isinstance(t, torch.Tensor) and not t.is_floating_point() and tuple(t.shape) != (batch, inner):
                raise ValueError(f"autobalance: `{name}` must have shape [B, D] = [{batch}, {inner}] to match "
                                 f"spatial logits [B, K, D], got {list(t.shape)}")
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(f"autobalance: a floating-point `target` is a probability target and must have "
                                 f"the shape of logits {list(logits.shape)}, got {list(target.shape)}")
            target = target.new_empty(as_rows.shape)
        elif isinstance(target, torch.Tensor):
            target = target.reshape(-1)
        group = group.reshape(-1) if isinstance(group, torch.Tensor) else group
        return check_inputs(as_rows, target, group, weight, scale, shift)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"autobalance: `logits` must be a Tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"autobalance: `logits` must be float32, float64, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"autobalance: `logits` must have shape [N, K], got {list(logits.shape)}")
    rows, classes = logits.shape
    if classes < 1:
        raise ValueError(f"autobalance: `logits` needs K >= 1 classes, got shape {list(logits.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"autobalance: `weight` must have shape [G, K], got {shape}")
    groups = weight.shape[0]
    if groups < 1:
        raise ValueError(f"autobalance: tables need G >= 1 rows, got `weight` of shape {list(weight.shape)}")
    acc = accumulate_dtype(logits.dtype)
    if isinstance(target, torch.Tensor) and target.is_floating_point():  # a probability target
        if target.dtype != logits.dtype:
            raise TypeError(f"autobalance: a probability `target` must have the dtype of logits ({logits.dtype}), "
                            f"got {target.dtype}")
        if target.shape != logits.shape:
            raise ValueError(f"autobalance: a floating-point `target` is a probability target and must have the "
                             f"shape of logits {list(logits.shape)}, got {list(target.shape)}; class-index targets "
                             "must have dtype torch.int64")
        _check_device(target, "target", logits.device)
    else:
        _check_index(target, "target", rows, logits.device)
    if group is not None:
        _check_index(group, "group", rows, logits.device)
    elif groups != 1:
        raise ValueError(f"autobalance: `group` is required when the tables have G = {groups} > 1 rows")
    for name, t in (("weight", weight), ("scale", scale), ("shift", shift)):
        _check_table(t, name, groups, classes, acc, logits.device)
    return rows, classes, groups


def check_label_smoothing(label_smoothing):
    """``label_smoothing`` must be a number in [0, 1] (NaN fails too)."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"autobalance: `label_smoothing` must be a float in [0, 1], got "
                        f"{type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"autobalance: `label_smoothing` must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing)


def check_cotangents(logits, groups, u_logits, u_weight, u_scale, u_shift):
    acc = accumulate_dtype(logits.dtype)
    if u_logits is not None:
        if u_logits.dtype != logits.dtype:
            raise TypeError(f"autobalance: `u_logits` must have the dtype of logits ({logits.dtype}), got {u_logits.dtype}")
        if u_logits.shape != logits.shape:
            raise ValueError(f"autobalance: `u_logits` must have the shape of logits {list(logits.shape)}, "
                             f"got {list(u_logits.shape)}")
        _check_device(u_logits, "u_logits", logits.device)
    for name, t in (("u_weight", u_weight), ("u_scale", u_scale), ("u_shift", u_shift)):
        if t is not None:
            _check_table(t, name, groups, logits.shape[1], acc, logits.device)
