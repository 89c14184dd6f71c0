"""Personalized data augmentation (PDA; the paper's section 2 and Lemma 2):
augmentations whose strengths are per-cluster hyperparameters, applied by label
during training only, so that a ``BilevelOptimizer`` can tune them like the
loss's ``l`` and ``Delta`` (issue 16; the bilevel integration is not done yet).

``SphericalAugment`` is Lemma 2's augmentation: a uniformly random point of the
l2 ball of radius ``eps[c(y)]`` around each input, reparameterised as
``x + eps[c(y)] * u`` with ``u`` uniform in the unit ball (independent of
``eps``), so the radii get a gradient. It works on any input (features or
images: the ball is in the space of the flattened sample).
"""
from typing import Optional, Union

import torch
from torch import nn

from autobalance._validation import check_int


def _cluster_map(clusters, num_classes):
    if clusters is None:
        return torch.arange(num_classes)
    if not isinstance(clusters, torch.Tensor) or clusters.dtype != torch.int64 \
            or tuple(clusters.shape) != (num_classes,):
        got = (f"{clusters.dtype} of shape {list(clusters.shape)}" if isinstance(clusters, torch.Tensor)
               else type(clusters).__name__)
        raise ValueError(f"autobalance: `clusters` must be None or an int64 map of shape [K] = [{num_classes}], "
                         f"got {got}")
    if (clusters < 0).any():
        raise ValueError(f"autobalance: `clusters` must be non-negative, got min {int(clusters.min())}")
    return clusters.detach().clone()


def unit_ball(shape, dim: int, *, generator: Optional[torch.Generator] = None, dtype=torch.float32,
              device=None) -> torch.Tensor:
    """``shape[0]`` points uniform in the unit l2 ball of ``R^dim`` (a Gaussian
    direction, and a radius ``U^(1/dim)``), as ``[shape[0], dim]``."""
    n = shape[0]
    direction = torch.randn(n, dim, generator=generator, dtype=dtype, device=device)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    radius = torch.rand(n, 1, generator=generator, dtype=dtype, device=device) ** (1.0 / dim)
    return direction * radius


class SphericalAugment(nn.Module):
    """Per-cluster spherical augmentation: in training mode, ``x_i + eps[c(y_i)] u_i``
    with ``u_i`` uniform in the unit l2 ball of the flattened sample's space; in
    eval mode, ``x`` unchanged.

    Args:
        num_classes: K.
        clusters: ``None`` (one radius per class) or an int64 map ``[K] -> [0, C)``;
            use the loss's map (``ParametricCE.clusters``) to share its clusters.
        radius: the initial radii: a number or ``[C]``, finite and ``>= 0``.
        learn: whether the radii are a learnable ``nn.Parameter`` (``radius_param``,
            a hyperparameter for a ``BilevelOptimizer``) or a fixed buffer.

    ``forward(x, target, generator=None)``: ``x`` of shape ``[N, ...]`` (floating),
    ``target`` int64 ``[N]`` in ``[0, K)``. The effective radius is the parameter
    clamped at 0 (a negative learned radius augments nothing); it gets a gradient
    wherever it is >= 0, so a search can move a radius away from 0.
    """

    def __init__(self, num_classes: int, clusters: Optional[torch.Tensor] = None, *,
                 radius: Union[float, torch.Tensor] = 0.0, learn: bool = True):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes")
        self.register_buffer("clusters", _cluster_map(clusters, self.num_classes))
        self.num_clusters = int(self.clusters.max()) + 1 if self.num_classes else 0
        init = torch.as_tensor(radius, dtype=torch.float32).detach().clone()
        if init.dim() == 0:
            init = init.expand(self.num_clusters).clone()
        if tuple(init.shape) != (self.num_clusters,) or not torch.isfinite(init).all() or (init < 0).any():
            raise ValueError(f"autobalance: `radius` must be a finite number >= 0 or a [C] = [{self.num_clusters}] "
                             f"tensor of them, got {init.tolist()}")
        if learn:
            self.radius_param = nn.Parameter(init)
        else:
            self.register_buffer("radius_param", init)

    def radii(self) -> torch.Tensor:
        """The effective per-class radii ``[K]`` (differentiable in the parameter)."""
        return self.radius_param.clamp(min=0)[self.clusters]

    def forward(self, x: torch.Tensor, target: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            got = f"{x.dtype} of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"autobalance: `x` must be a floating-point [N, ...] tensor, got {got}")
        if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or tuple(target.shape) != (len(x),):
            got = (f"{target.dtype} of shape {list(target.shape)}" if isinstance(target, torch.Tensor)
                   else type(target).__name__)
            raise ValueError(f"autobalance: `target` must be int64 of shape [N] = [{len(x)}], got {got}")
        if not self.training:
            return x
        if len(target) and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise IndexError(f"autobalance: `target` must hold classes in [0, {self.num_classes}), got values in "
                             f"[{int(target.min())}, {int(target.max())}]")
        u = unit_ball(x.shape, x[0].numel(), generator=generator, dtype=x.dtype, device=x.device)
        eps = self.radii().to(x.dtype)[target]
        return x + (eps[:, None] * u).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_clusters={self.num_clusters}"
