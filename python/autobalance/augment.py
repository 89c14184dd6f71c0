"""Personalized data augmentation (PDA; the paper's section 2 and Lemma 2):
augmentations whose strengths are per-cluster (and per-group) hyperparameters,
applied by label during training only, so that a
``BilevelOptimizer(..., augment=...)`` tunes them like the loss's ``l`` and
``Delta``.

Both take ``ParametricCE``'s layout: a cluster map ``[K] -> [0, C)`` (pass the
loss's ``clusters`` to share them) and, with ``num_groups = G > 1``, a row of
strengths per group (``group_params``, default ``G > 1``), so that sample ``i``
gets the strengths of cell ``(group_i, clusters[target_i])``.

``ImagePolicy`` is the image policy: per cell a magnitude and an application
probability per op (affine warps, brightness, contrast, noise), differentiable
in both. Its resampling and colour ops are kornia's (an optional dependency,
``autobalance[augment]``): a maintained library of differentiable image ops,
whose ``warp_affine`` is differentiable in the affine matrix.

``SphericalAugment`` is Lemma 2's augmentation: a uniformly random point of the
l2 ball of radius ``eps[g, c(y)]`` around each input, reparameterised as
``x + eps * u`` with ``u`` uniform in the unit ball (independent of ``eps``), so
the radii get a gradient. It works on any input (features or images: the ball
is in the space of the flattened sample).
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


def unit_ball(shape, dim: int, *, generator: Optional[torch.Generator] = None, dtype=torch.float32,
              device=None) -> torch.Tensor:
    """``shape[0]`` points uniform in the unit l2 ball of ``R^dim`` (a Gaussian
    direction, and a radius ``U^(1/dim)``), as ``[shape[0], dim]``."""
    n = shape[0]
    direction = torch.randn(n, dim, generator=generator, dtype=dtype, device=device)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    radius = torch.rand(n, 1, generator=generator, dtype=dtype, device=device) ** (1.0 / dim)
    return direction * radius


class _PerCell(nn.Module):
    """The layout both augmentations share with ``ParametricCE``: K classes in C
    clusters, G groups, and ``rows`` = G (``group_params``) or 1 rows of strengths;
    a strength tensor is ``[rows, C, ...]``."""

    def __init__(self, num_classes, clusters, num_groups, group_params):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes")
        self.num_groups = check_int(num_groups, "num_groups")
        self.group_params = self.num_groups > 1 if group_params is None else bool(group_params)
        self.rows = self.num_groups if self.group_params else 1
        self.register_buffer("clusters", _cluster_map(clusters, self.num_classes))
        self.num_clusters = int(self.clusters.max()) + 1

    def _strength(self, name, value, trailing, valid, requirement, learn, stored=None):
        """Registers ``{name}_param`` ``[rows, C, *trailing]`` from an initial value
        (a number, ``[C, *trailing]`` or ``[rows, C, *trailing]``) that ``valid``
        accepts everywhere, mapped by ``stored`` (e.g. to logits), as a parameter
        (``learn``) or a buffer."""
        shape = (self.rows, self.num_clusters, *trailing)
        given = torch.as_tensor(value, dtype=torch.float32).detach()
        t = given.expand(shape).clone() if given.dim() == 0 or tuple(given.shape) == shape[1:] else given.clone()
        bad = None if tuple(t.shape) != shape else (~valid(t)).nonzero()  # NaN fails `valid`
        if bad is None or len(bad):
            dims = ", ".join(["C", *(["ops"] if trailing else [])])
            got = (f"shape {list(given.shape)}" if bad is None else
                   f"{t[tuple(bad[0])].item()} at [row, {dims}] = {bad[0].tolist()}")
            raise ValueError(f"autobalance: `{name}` must be {requirement}: a number, [{dims}] = {list(shape[1:])} "
                             f"or [rows, {dims}] = {list(shape)} (rows = num_groups with group_params, else 1), "
                             f"got {got}")
        if stored is not None:
            t = stored(t)
        if learn:
            self.register_parameter(f"{name}_param", nn.Parameter(t))
        else:
            self.register_buffer(f"{name}_param", t)

    def _cells(self, x, target, group, images=False):
        """Checks ``(x, target, group)``; returns each sample's ``(row, cluster)`` (in
        training mode; None in eval mode, where nothing is applied). ``x`` is floating
        ``[N, ...]`` (``[N, channels, H, W]`` with ``images``), ``target`` and ``group``
        int64 ``[N]``; ``group`` is needed with more than one row of strengths."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or (images and x.dim() != 4):
            got = f"{x.dtype} of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            if images:
                raise ValueError(f"autobalance: ImagePolicy takes images: `x` must be a floating-point [N, "
                                 f"channels, H, W] tensor, got {got}; for other inputs use SphericalAugment")
            raise ValueError(f"autobalance: `x` must be a floating-point [N, ...] tensor, got {got}")
        training = self.training
        check_labels(target, "target", self.num_classes if training else None, like=x.flatten(1)[:, 0])
        if group is None and self.rows > 1:
            raise ValueError(f"autobalance: `group` is needed: this augmentation has strengths per group "
                             f"(num_groups = {self.num_groups}, group_params=True)")
        if group is not None:
            check_labels(group, "group", self.num_groups if training else None, "groups", like=target)
        if not training:
            return None
        return group if self.rows > 1 else 0, self.clusters[target]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_clusters={self.num_clusters}, num_groups={self.num_groups}, "
                f"group_params={self.group_params}")


class SphericalAugment(_PerCell):
    """Per-cell spherical augmentation: in training mode, ``x_i + eps[r_i, c(y_i)] u_i``
    with ``u_i`` uniform in the unit l2 ball of the flattened sample's space (``r_i``
    the sample's group with per-group radii, else 0); in eval mode, ``x`` unchanged.

    Args:
        num_classes: K.
        clusters: ``None`` (one radius per class) or an int64 map ``[K] -> [0, C)``;
            use the loss's map (``ParametricCE.clusters``) to share its clusters.
        num_groups, group_params: as ``ParametricCE``: with ``group_params`` (default
            ``num_groups > 1``) a row of radii per group.
        radius: the initial radii: a number, ``[C]`` or ``[rows, C]``, finite and ``>= 0``.
        learn: whether the radii are a learnable ``nn.Parameter`` (``radius_param``,
            a hyperparameter for a ``BilevelOptimizer``) or a fixed buffer.

    ``forward(x, target, group=None, generator=None)``: ``x`` of shape ``[N, ...]``
    (floating), ``target`` int64 ``[N]`` in ``[0, K)``, ``group`` int64 ``[N]`` in
    ``[0, G)`` (needed with per-group radii). The effective radius is the parameter
    clamped at 0 (a negative learned radius augments nothing); it gets a gradient
    wherever it is >= 0, so a search can move a radius away from 0.
    """

    def __init__(self, num_classes: int, clusters: Optional[torch.Tensor] = None, *, num_groups: int = 1,
                 group_params: Optional[bool] = None, radius: Union[float, torch.Tensor] = 0.0, learn: bool = True):
        super().__init__(num_classes, clusters, num_groups, group_params)
        self._strength("radius", radius, (), lambda t: torch.isfinite(t) & (t >= 0), "finite and >= 0", learn)

    def radii(self) -> torch.Tensor:
        """The effective radii ``[rows, C]`` (differentiable in the parameter)."""
        return self.radius_param.clamp(min=0)

    def forward(self, x: torch.Tensor, target: torch.Tensor, group: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        cells = self._cells(x, target, group)
        if cells is None:
            return x
        u = unit_ball(x.shape, x[0].numel(), generator=generator, dtype=x.dtype, device=x.device)
        eps = self.radii().to(x.dtype)[cells]
        return x + (eps[:, None] * u).reshape(x.shape)


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


class ImagePolicy(_PerCell):
    """A per-cell differentiable image augmentation policy in the AutoAugment /
    MADA spirit (the paper's PDA): for each cell (group row, cluster) and each op,
    a magnitude ``m = sigmoid(magnitude_param)`` in (0, 1) and an application
    probability ``p = sigmoid(probability_param)`` in (0, 1), both hyperparameters.

    In training mode each op ``o`` (in ``ops`` order) gives, per sample of cell
    ``(r, c)``, ``x <- b o(x, s) + (1 - b) x`` with strength ``s = m[r, c, o] * u *
    IMAGE_OPS[o]`` (``u`` uniform in [-1, 1]) and ``b`` a relaxed
    Bernoulli(``p[r, c, o]``) gate of ``temperature`` (reparameterised, so both ``m``
    and ``p`` get gradients; as ``temperature -> 0``, ``b`` is 0 or 1). Eval mode
    returns ``x``. Inputs are ``[N, channels, H, W]`` images.

    Args:
        num_classes, clusters, num_groups, group_params: as ``SphericalAugment``.
        ops: a subset of ``IMAGE_OPS``.
        magnitude, probability: initial values in (0, 1): numbers, ``[C, len(ops)]``
            or ``[rows, C, len(ops)]``.
        temperature: the relaxed Bernoulli's temperature, > 0.
        learn: learnable parameters (hyperparameters) or fixed buffers.

    ``forward(x, target, group=None, generator=None)`` as ``SphericalAugment``'s.
    """

    def __init__(self, num_classes: int, clusters: Optional[torch.Tensor] = None, *, num_groups: int = 1,
                 group_params: Optional[bool] = None, ops=tuple(IMAGE_OPS), magnitude=0.2, probability=0.5,
                 temperature: float = 0.5, learn: bool = True):
        super().__init__(num_classes, clusters, num_groups, group_params)
        ops = (ops,) if isinstance(ops, str) else tuple(ops)
        unknown = [o for o in ops if o not in IMAGE_OPS]
        if not ops or unknown or len(set(ops)) != len(ops):
            raise ValueError(f"autobalance: `ops` must be distinct names from {tuple(IMAGE_OPS)}, got {ops}")
        self.ops = ops
        self.temperature = check_positive(temperature, "temperature")
        for name, value in (("magnitude", magnitude), ("probability", probability)):
            self._strength(name, value, (len(ops),), lambda t: (t > 0) & (t < 1), "in the open interval (0, 1)",
                           learn, stored=torch.logit)

    def magnitudes(self) -> torch.Tensor:
        """``[rows, C, ops]`` magnitudes in (0, 1)."""
        return torch.sigmoid(self.magnitude_param)

    def probabilities(self) -> torch.Tensor:
        """``[rows, C, ops]`` application probabilities in (0, 1)."""
        return torch.sigmoid(self.probability_param)

    def forward(self, x: torch.Tensor, target: torch.Tensor, group: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        cells = self._cells(x, target, group, images=True)
        if cells is None or not len(x):
            return x
        kornia = _kornia()
        n, _, height, width = x.shape
        magnitude = self.magnitudes().to(x.dtype)[cells]      # [N, ops]
        probability = self.probabilities().to(x.dtype)[cells]  # [N, ops]

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
        return f"{super().extra_repr()}, ops={self.ops}, temperature={self.temperature}"
