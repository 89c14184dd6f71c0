"""Personalized data augmentation (PDA; the paper's section 2 and Lemma 2):
augmentations whose strengths are per-cluster hyperparameters, applied by label
during training only, so that a ``BilevelOptimizer(..., augment=...)`` tunes them
like the loss's ``l`` and ``Delta``.

``ImagePolicy`` is the image policy: per cluster a magnitude and an application
probability per op (affine warps, brightness, contrast, noise), differentiable
in both. Its resampling and colour ops are kornia's (an optional dependency,
``autobalance[augment]``): a maintained library of differentiable image ops,
whose ``warp_affine`` is differentiable in the affine matrix.

``SphericalAugment`` is Lemma 2's augmentation: a uniformly random point of the
l2 ball of radius ``eps[c(y)]`` around each input, reparameterised as
``x + eps[c(y)] * u`` with ``u`` uniform in the unit ball (independent of
``eps``), so the radii get a gradient. It works on any input (features or
images: the ball is in the space of the flattened sample).
"""
from typing import Optional, Union

import torch
from torch import nn

from autobalance._validation import check_int, check_labels, check_positive


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


def _check_batch(x, target, num_classes, training, images=False):
    """An augmentation's ``(x, target)``: ``x`` floating ``[N, ...]`` (``[N, channels,
    H, W]`` with ``images``), ``target`` int64 ``[N]``, in ``[0, num_classes)`` when it
    will be used (``training``)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or (images and x.dim() != 4):
        got = f"{x.dtype} of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        if images:
            raise ValueError(f"autobalance: ImagePolicy takes images: `x` must be a floating-point [N, channels, H, "
                             f"W] tensor, got {got}; for other inputs use SphericalAugment")
        raise ValueError(f"autobalance: `x` must be a floating-point [N, ...] tensor, got {got}")
    if not isinstance(target, torch.Tensor) or target.dtype != torch.int64 or tuple(target.shape) != (len(x),):
        got = (f"{target.dtype} of shape {list(target.shape)}" if isinstance(target, torch.Tensor)
               else type(target).__name__)
        raise ValueError(f"autobalance: `target` must be int64 of shape [N] = [{len(x)}], got {got}")
    if training:
        check_labels(target, "target", num_classes)


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
        self.num_clusters = int(self.clusters.max()) + 1
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
        _check_batch(x, target, self.num_classes, self.training)
        if not self.training:
            return x
        u = unit_ball(x.shape, x[0].numel(), generator=generator, dtype=x.dtype, device=x.device)
        eps = self.radii().to(x.dtype)[target]
        return x + (eps[:, None] * u).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_clusters={self.num_clusters}"


# The image policy's operations and the strength of each at magnitude 1: the
# geometric ones as fractions of the image size, radians and shear factors (one
# affine warp each, kornia.geometry.transform.warp_affine), the colour ones
# additive brightness, a multiplicative contrast 1 + s, and Gaussian noise of
# standard deviation s (kornia.enhance, unclipped: inputs may be normalised).
IMAGE_OPS = {"translate_x": 0.3, "translate_y": 0.3, "rotate": 0.5, "shear": 0.3, "brightness": 0.5,
             "contrast": 0.5, "noise": 0.3}


def _kornia():
    try:
        import kornia
    except ImportError as e:  # an optional dependency of the image policy only
        raise ImportError("autobalance: ImagePolicy needs kornia; pip install kornia (or autobalance[augment])") from e
    return kornia


def _logit(value, name, shape):
    """An initial value in (0, 1) (a number or ``shape``), as its logit."""
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if t.dim() == 0:
        t = t.expand(shape).clone()
    if tuple(t.shape) != shape or not bool(((t > 0) & (t < 1)).all()):  # NaN fails too
        raise ValueError(f"autobalance: `{name}` must be a number or a [C, ops] = {list(shape)} tensor in the open "
                         f"interval (0, 1), got {t.tolist()}")
    return torch.logit(t)


class ImagePolicy(nn.Module):
    """A per-cluster differentiable image augmentation policy in the AutoAugment /
    MADA spirit (the paper's PDA): for each cluster and each op, a magnitude
    ``m = sigmoid(magnitude_param)`` in (0, 1) and an application probability
    ``p = sigmoid(probability_param)`` in (0, 1), both hyperparameters.

    In training mode each op ``o`` (in ``ops`` order) gives, per sample with
    cluster ``c = clusters[y]``, ``x <- b o(x, s) + (1 - b) x`` with strength
    ``s = m[c, o] * u * IMAGE_OPS[o]`` (``u`` uniform in [-1, 1]) and ``b`` a
    relaxed Bernoulli(``p[c, o]``) gate of ``temperature`` (reparameterised, so
    both ``m`` and ``p`` get gradients; as ``temperature -> 0``, ``b`` is 0 or
    1). Eval mode returns ``x``. Inputs are ``[N, channels, H, W]`` images.

    Args:
        num_classes, clusters: as ``SphericalAugment``.
        ops: a subset of ``IMAGE_OPS``.
        magnitude, probability: initial values, numbers or ``[C, len(ops)]``, in (0, 1).
        temperature: the relaxed Bernoulli's temperature, > 0.
        learn: learnable parameters (hyperparameters) or fixed buffers.
    """

    def __init__(self, num_classes: int, clusters: Optional[torch.Tensor] = None, *,
                 ops=tuple(IMAGE_OPS), magnitude=0.2, probability=0.5, temperature: float = 0.5,
                 learn: bool = True):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes")
        self.register_buffer("clusters", _cluster_map(clusters, self.num_classes))
        self.num_clusters = int(self.clusters.max()) + 1
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        unknown = [o for o in ops if o not in IMAGE_OPS]
        if not ops or unknown or len(set(ops)) != len(ops):
            raise ValueError(f"autobalance: `ops` must be distinct names from {tuple(IMAGE_OPS)}, got {ops}")
        self.ops = ops
        self.temperature = check_positive(temperature, "temperature")
        shape = (self.num_clusters, len(ops))
        for name, value in (("magnitude", magnitude), ("probability", probability)):
            init = _logit(value, name, shape)
            if learn:
                self.register_parameter(f"{name}_param", nn.Parameter(init))
            else:
                self.register_buffer(f"{name}_param", init)

    def magnitudes(self) -> torch.Tensor:
        """``[C, ops]`` magnitudes in (0, 1)."""
        return torch.sigmoid(self.magnitude_param)

    def probabilities(self) -> torch.Tensor:
        """``[C, ops]`` application probabilities in (0, 1)."""
        return torch.sigmoid(self.probability_param)

    def forward(self, x: torch.Tensor, target: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_batch(x, target, self.num_classes, self.training, images=True)
        if not self.training or not len(x):
            return x
        kornia = _kornia()
        n, _, height, width = x.shape
        cluster = self.clusters[target]
        magnitude = self.magnitudes().to(x.dtype)[cluster]      # [N, ops]
        probability = self.probabilities().to(x.dtype)[cluster]  # [N, ops]

        def uniform(*shape):
            return torch.rand(*shape, generator=generator, dtype=x.dtype, device=x.device)
        for j, op in enumerate(self.ops):
            s = magnitude[:, j] * (2 * uniform(n) - 1) * IMAGE_OPS[op]
            if op == "brightness":
                moved = kornia.enhance.adjust_brightness(x, s, clip_output=False)
            elif op == "contrast":
                moved = kornia.enhance.adjust_contrast(x, 1 + s, clip_output=False)
            elif op == "noise":
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                moved = x + s[:, None, None, None] * noise
            else:
                moved = kornia.geometry.transform.warp_affine(x, self._affine(op, s, height, width), (height, width),
                                                              padding_mode="zeros", align_corners=True)
            # relaxed Bernoulli(p) gate: sigmoid((logit p + logistic noise) / temperature)
            u = uniform(n).clamp(1e-6, 1 - 1e-6)
            gate = torch.sigmoid((torch.logit(probability[:, j]) + torch.log(u) - torch.log1p(-u)) / self.temperature)
            gate = gate[:, None, None, None]
            x = gate * moved + (1 - gate) * x
        return x

    @staticmethod
    def _affine(op, s, height, width):
        """``[N, 2, 3]`` pixel-space affine maps about the image centre."""
        one, zero = torch.ones_like(s), torch.zeros_like(s)
        cx, cy = (width - 1) / 2, (height - 1) / 2
        if op == "translate_x":
            rows = [[one, zero, s * width], [zero, one, zero]]
        elif op == "translate_y":
            rows = [[one, zero, zero], [zero, one, s * height]]
        elif op == "rotate":
            c, si = torch.cos(s), torch.sin(s)
            rows = [[c, -si, cx - c * cx + si * cy], [si, c, cy - si * cx - c * cy]]
        else:  # shear along x
            rows = [[one, s, -s * cy], [zero, one, zero]]
        return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=1)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_clusters={self.num_clusters}, ops={self.ops}, "
                f"temperature={self.temperature}")
