"""Argument checks shared by the library and the experiments. Each raises
with a message that names the argument, what it got and what was expected.
(The ops' tensor checks are in ``autobalance_ext._checks`` and
``csrc/checks.h``.)"""
import math
import numbers
from typing import Optional

import torch


def check_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum`` (numpy integers accepted; bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"autobalance: `{name}` must be an int >= {minimum}, got {value!r}")
    return int(value)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_choice(value, name: str, choices: tuple):
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"autobalance: `{name}` must be one of {choices}, got {value!r}")
    return value


def check_positive(value, name: str, allow_none: bool = False) -> Optional[float]:
    """``value`` as a positive finite float (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not _is_real(value) or not 0 < value < math.inf:
        raise ValueError(f"autobalance: `{name}` must be a positive finite float, got {value!r}")
    return float(value)


def check_finite(value, name: str) -> float:
    """``value`` as a finite float."""
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"autobalance: `{name}` must be a finite float, got {value!r}")
    return float(value)


def check_non_negative(value, name: str) -> float:
    """``value`` as a finite float ``>= 0``."""
    if not _is_real(value) or not 0 <= value < math.inf:
        raise ValueError(f"autobalance: `{name}` must be a finite float >= 0, got {value!r}")
    return float(value)


def check_fraction(value, name: str, *, closed: bool = False) -> float:
    """``value`` in the open interval ``(0, 1)``, or in ``[0, 1]`` when ``closed``."""
    inside = _is_real(value) and (0 <= value <= 1 if closed else 0 < value < 1)
    if not inside:
        interval = "the interval [0, 1]" if closed else "the open interval (0, 1)"
        raise ValueError(f"autobalance: `{name}` must be a number in {interval}, got {value!r}")
    return float(value)


def check_labels(labels, name: str, count: Optional[int] = None, kind: str = "classes", *,
                 like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``labels`` as an int64 ``[N]`` tensor (of ``like``'s shape when given) with values in
    ``[0, count)`` (unchecked when ``count`` is None); ``kind`` names them ("classes",
    "groups"). A wrong type or shape raises ValueError, a value out of range IndexError
    (as the ops do)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1 \
            or (like is not None and labels.shape != like.shape):
        expected = "[N]" if like is None else f"[N] = {list(like.shape)}"
        got = (f"{labels.dtype} of shape {list(labels.shape)}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise ValueError(f"autobalance: `{name}` must be an int64 tensor of shape {expected}, got {got}")
    if count is not None and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= count:
            raise IndexError(f"autobalance: `{name}` must hold {kind} in [0, {count}), got values in [{low}, {high}]")
    return labels
