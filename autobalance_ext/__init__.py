"""The compiled ops' Python face: loads ``_C`` (which registers the op schemas
and their CPU/CUDA kernels), then registers fake kernels and autograd.

Ops (docs/math.md sections 1, 3, 4), under ``torch.ops.autobalance``:

- ``parametric_ce(logits, target, group, weight, scale, shift, ignore_index)``
  -> ``(loss [N], lse [N])``
- ``parametric_ce_backward(grad_loss, logits, target, group, weight, scale,
  shift, lse, ignore_index, table_grads)``
  -> ``(grad_logits, grad_weight, grad_scale, grad_shift)``
- ``parametric_ce_double_backward(grad_loss, logits, target, group, weight,
  scale, shift, lse, u_logits, u_weight, u_scale, u_shift, ignore_index,
  table_grads)``
  -> ``(grad_grad_loss, grad_logits, grad_weight, grad_scale, grad_shift)``

When ``_C`` cannot be loaded (never built, or built for another torch or
Python: an ABI mismatch shows as an undefined symbol), importing this package
still works: it warns once, ``has_compiled_ops()`` is False and
``autobalance``'s ``backend="fused"`` runs the reference path instead.
"""
import warnings

import torch  # loads libc10/libtorch before _C

from ._checks import accumulate_dtype, check_inputs

__all__ = ["LOAD_ERROR", "accumulate_dtype", "check_inputs", "has_compiled_ops", "has_cuda_kernels"]

try:
    from . import _C  # noqa: F401  (registers the ops and their CPU/CUDA kernels)
except (ImportError, OSError) as error:
    _C = None
    LOAD_ERROR = error  # why the compiled ops are missing; None when they loaded
    warnings.warn(f"autobalance: the compiled ops (autobalance_ext._C) could not be loaded: {error}. Running the "
                  "plain-PyTorch reference path instead, which is several times slower. Rebuild them against "
                  f"the installed torch {torch.__version__}: `pip install -e . --no-build-isolation` (or `make "
                  "clean setup`) in the source tree.", RuntimeWarning, stacklevel=2)
else:
    LOAD_ERROR = None
    from . import _registrations  # noqa: F401  (fake kernels)


def has_compiled_ops() -> bool:
    """True when the compiled ops loaded (see ``LOAD_ERROR`` when not)."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when this build contains the CUDA kernels."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("autobalance::parametric_ce", "CUDA")
