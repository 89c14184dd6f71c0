"""The compiled ops' Python face: loads ``_C`` (which registers the op schemas
and their CPU/CUDA kernels), then registers fake kernels and autograd.

Ops (MATH.md sections 1, 3, 4), under ``torch.ops.autobalance``:

- ``parametric_ce(logits, target, group, weight, scale, shift, ignore_index)``
  -> ``(loss [N], lse [N])``
- ``parametric_ce_backward(grad_loss, logits, target, group, weight, scale,
  shift, lse, ignore_index, table_grads)``
  -> ``(grad_logits, grad_weight, grad_scale, grad_shift)``
- ``parametric_ce_double_backward(grad_loss, logits, target, group, weight,
  scale, shift, lse, u_logits, u_weight, u_scale, u_shift, ignore_index,
  table_grads)``
  -> ``(grad_grad_loss, grad_logits, grad_weight, grad_scale, grad_shift)``
"""
import torch  # noqa: F401  (loads libc10/libtorch before _C)

from . import _C  # noqa: F401  (registers the ops)
from . import _registrations  # noqa: F401
from ._checks import accumulate_dtype, check_inputs

__all__ = ["accumulate_dtype", "check_inputs", "has_cuda_kernels"]


def has_cuda_kernels() -> bool:
    """True when this build contains the CUDA kernels."""
    import torch
    return torch._C._dispatch_has_kernel_for_dispatch_key("autobalance::parametric_ce", "CUDA")
