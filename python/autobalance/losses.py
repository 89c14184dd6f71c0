"""``ParametricCE``: the learnable parametric cross-entropy of the paper
(eq. 2.1/2.2, and 4.2 for groups), its initialisations (docs/math.md section 1)
and its frequency-aware parameterisation (docs/math.md section 2)."""
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import _reduction as _Reduction

from autobalance._validation import check_choice, check_finite, check_int, check_labels, check_positive
from autobalance.functional import BACKENDS, REDUCTIONS, parametric_cross_entropy
from autobalance_ext._checks import check_label_smoothing

INITS = ("ce", "balanced", "la", "cdt", "vs", "group_la", "group_balanced")
LEARNABLE = ("weight", "scale", "shift")
# the inits that use each option of loss_tables, and the option's default
INIT_OPTIONS = {"tau": (("la", "vs", "group_la"), 1.0), "gamma": (("cdt", "vs"), 0.2)}


class LossTables(NamedTuple):
    """The effective ``[G, K]`` tables W, S, L of docs/math.md section 1."""
    weight: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


def _as_counts(counts, name="class_counts"):
    counts = torch.as_tensor(counts)
    if counts.dim() not in (1, 2) or counts.numel() == 0:
        raise ValueError(f"autobalance: `{name}` must be a non-empty [K] or [G, K] tensor of counts, "
                         f"got shape {list(counts.shape)}")
    if counts.is_floating_point() and not torch.isfinite(counts).all():
        raise ValueError(f"autobalance: `{name}` must be finite")
    if (counts < 0).any():
        raise ValueError(f"autobalance: `{name}` must be non-negative, got min {counts.min().item()}")
    return counts.to(torch.float64)


def frequency_clusters(class_counts, cluster_size: int = 1, *, min_count: Optional[float] = None) -> torch.Tensor:
    """The frequency-aware dictionary of docs/math.md section 2 as a cluster map.

    Sorts classes by count, descending (ties by class index), and cuts them
    into contiguous chunks of ``cluster_size``: returns ``cluster[k] in [0,
    ceil(K / cluster_size))``. ``class_counts`` may be ``[K]`` or ``[G, K]``
    (summed over groups).

    ``min_count``: chunks whose counts sum to less are merged with their more
    frequent neighbour, from the rarest up, so every cluster holds at least
    ``min_count`` examples (or all of them). Pass validation counts and the
    fewest validation examples a learned parameter should rest on: a tail class
    with one validation image then shares its parameters with its neighbours
    instead of following that image (docs/math.md section 2).
    """
    counts = _as_counts(class_counts)
    if counts.dim() == 2:
        counts = counts.sum(0)
    cluster_size = check_int(cluster_size, "cluster_size")
    order = torch.sort(-counts, stable=True).indices
    chunk = torch.arange(counts.numel()) // cluster_size  # cluster of the i-th most frequent class
    if min_count is not None:
        min_count = check_positive(min_count, "min_count")
        sums = torch.zeros(int(chunk[-1]) + 1, dtype=torch.float64).index_add_(0, chunk, counts[order])
        starts, total = [], 0.0  # the first chunk of each cluster, found from the rarest chunk up
        for c in range(len(sums) - 1, -1, -1):
            total += float(sums[c])
            if total >= min_count:
                starts.append(c)
                total = 0.0
        if not starts:
            starts = [0]
        starts[-1] = 0  # the most frequent chunks left short of min_count join the cluster after them
        starts = torch.tensor(starts[::-1])
        chunk = torch.searchsorted(starts, chunk, right=True) - 1
    clusters = torch.empty(counts.numel(), dtype=torch.long)
    clusters[order] = chunk
    return clusters


def _init_option(value, name, init):
    """``tau`` / ``gamma`` of ``loss_tables``: its default when None; given to an init
    that does not use it, an error (it would be silently ignored)."""
    users, default = INIT_OPTIONS[name]
    if value is None:
        return default
    if init not in users:
        raise ValueError(f"autobalance: `{name}` is used by init in {users} only, got {name}={value!r} with "
                         f"init={init!r}")
    return check_finite(value, name)


def loss_tables(counts, init: str = "ce", *, tau: Optional[float] = None,
                gamma: Optional[float] = None) -> LossTables:
    """The tables of a standard loss, from training counts (docs/math.md section 1).

    ``counts`` is ``[K]`` (class counts, ``G = 1``) or ``[G, K]`` (counts per
    (group, class) cell). ``init``:

    - ``"ce"``: W = 1, S = 1, L = 0.
    - ``"balanced"``: W_k = 1 / (K pi_k), so the mean weight over training
      samples is 1 and the weighted loss is the class-balanced CE.
    - ``"la"``: L_k = tau log pi_k (logit adjustment, Menon et al.).
    - ``"cdt"``: S_k = (n_k / n_max)^gamma (Ye et al.).
    - ``"vs"``: S_k = (n_k / n_max)^gamma and L_k = tau log pi_k (Kini et al.).
    - ``"group_la"``: W[g, k] = 1 / (G pi_g), L[g, k] = tau log pi(k | g); needs
      ``[G, K]`` counts.
    - ``"group_balanced"``: W[g, k] = 1 / (G K pi_{g,k}) with ``pi_{g,k}`` the
      cell frequency: the (group, class)-balanced CE ``CE_bal^G`` (the mean
      weight over training samples is 1).

    ``tau`` (default 1) is the temperature of ``"la"``, ``"vs"`` and ``"group_la"``,
    ``gamma`` (default 0.2) the exponent of ``"cdt"`` and ``"vs"``; both must be
    finite, and giving one to an init that does not use it raises. Class priors
    ``pi_k`` are the class marginals (summed over groups). Inits that take a log or
    a reciprocal need positive counts.
    """
    counts = _as_counts(counts, "counts")
    check_choice(init, "init", INITS)
    tau, gamma = _init_option(tau, "tau", init), _init_option(gamma, "gamma", init)
    groups = counts.shape[0] if counts.dim() == 2 else 1
    cells = counts if counts.dim() == 2 else counts[None]
    classes = cells.shape[1]
    per_class = cells.sum(0)
    needs_positive = {"balanced": per_class, "la": per_class, "cdt": per_class, "vs": per_class,
                      "group_la": cells, "group_balanced": cells}
    if init in needs_positive and (needs_positive[init] <= 0).any():
        raise ValueError(f"autobalance: init={init!r} needs every count to be positive, got "
                         f"{needs_positive[init].tolist()}")
    prior = per_class / per_class.sum()
    ones = torch.ones(groups, classes, dtype=torch.float64)
    weight, scale, shift = ones.clone(), ones.clone(), torch.zeros_like(ones)
    if init == "balanced":
        weight = ones / (classes * prior)
    if init in ("la", "vs"):
        shift = ones * tau * prior.log()
    if init in ("cdt", "vs"):
        scale = ones * (per_class / per_class.max()) ** gamma
    if init == "group_la":
        if counts.dim() != 2:
            raise ValueError("autobalance: init='group_la' needs [G, K] counts per (group, class) cell, "
                             f"got shape {list(counts.shape)}")
        group_size = cells.sum(1, keepdim=True)
        weight = ones / (groups * group_size / group_size.sum())
        shift = tau * (cells / group_size).log()
    if init == "group_balanced":
        weight = cells.sum() / (cells.numel() * cells)
    return LossTables(weight.float(), scale.float(), shift.float())


def _table(value, name, groups, classes, default):
    """An initial table from None, a scalar, [K] or [G, K] of finite values;
    float32, or float64 when given in float64 (a float64 class weight stays
    exact, as in ``nn.CrossEntropyLoss``)."""
    if value is None:
        return torch.full((groups, classes), float(default))
    given = torch.as_tensor(value)
    dtype = torch.float64 if given.dtype == torch.float64 else torch.float32
    t = given.to(dtype).detach().clone()
    if not (t.dim() == 0 or (t.dim() == 1 and t.shape[0] == classes) or
            (t.dim() == 2 and tuple(t.shape) == (groups, classes))):
        raise ValueError(f"autobalance: initial `{name}` must be a scalar, [K] = [{classes}] or "
                         f"[G, K] = [{groups}, {classes}], got shape {list(t.shape)}")
    t = t.expand(groups, classes).clone()
    bad = (~torch.isfinite(t.float())).nonzero()  # float32 logits compute in float32
    if len(bad):
        raise ValueError(f"autobalance: initial `{name}` must be finite (as float32), got "
                         f"{t[tuple(bad[0])].item()} at [g, k] = {bad[0].tolist()} ({len(bad)} non-finite values)")
    return t


class ParametricCE(nn.Module):
    """Parametric cross-entropy with learnable per-cluster (and per-group) parameters.

    The effective ``[G, K]`` tables (docs/math.md sections 1 and 2) are::

        S[g, k] = scale_max * sigmoid(logit(S0[g, k] / scale_max) + d[g', c(k)])
        L[g, k] = L0[g, k] + l[g', c(k)]
        W[g, k] = W0[g, k] + w[g', c(k)]           (w only when learned)

    where ``W0, S0, L0`` are the initial tables (see ``from_counts``), ``c`` is
    the cluster map, ``g' = g`` with per-group parameters and 0 otherwise, and
    ``d, l, w`` start at 0, so the module starts exactly at its initial loss.
    The learnable directions are the paper's ``D_pi`` dictionary; the sigmoid
    keeps every scale in the open interval ``(0, scale_max)`` (the paper's
    clamp is ``scale_max = 1``; the default 2 puts the common ``S = 1`` at the
    sigmoid's centre, where it learns fastest). Initial scales must lie
    strictly inside that interval.

    Args:
        num_classes: K.
        clusters: ``None`` (one cluster per class), a cluster size ``C``
            (frequency-aware clusters of ``C`` classes; needs ``class_counts``),
            or an explicit ``LongTensor[K]`` map to ``[0, K')``.
        num_groups: G, the number of groups (rows of the tables).
        group_params: learn separate parameters per group (default: ``num_groups > 1``).
        class_counts: ``[K]`` or ``[G, K]`` training counts, for ``clusters=C``.
        weight, scale, shift: initial tables W0, S0, L0: scalar, ``[K]`` or ``[G, K]``.
            With ``weight`` not learned, ``W = W0``: ``weight=w`` (``[K]``) is
            ``nn.CrossEntropyLoss``'s class weight.
        learn: which tables are learnable, a subset of ``("weight", "scale", "shift")``.
        scale_max: upper bound of the scales.
        size_average, ignore_index, reduce, reduction, label_smoothing: as in
            ``nn.CrossEntropyLoss`` (same defaults; see
            :func:`autobalance.functional.parametric_cross_entropy`).
        backend: a testing aid, ``"fused"`` or ``"reference"``.

    ``forward(input, target, group=None)`` takes every form ``nn.CrossEntropyLoss``
    takes: ``[N, K]`` with ``[N]`` class indices, ``[K]`` with a 0-d target,
    ``[N, K, d1, ..., dk]`` with ``[N, d1, ..., dk]`` class indices, and probability
    targets of the input's shape; ``group`` has the target's index shape.
    """

    def __init__(self, num_classes: int, clusters: Union[None, int, torch.Tensor] = None, *,
                 num_groups: int = 1, group_params: Optional[bool] = None, class_counts=None,
                 weight=None, scale=None, shift=None, learn: Sequence[str] = ("scale", "shift"),
                 scale_max: float = 2.0, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, backend: str = "fused"):
        super().__init__()
        num_classes, num_groups = check_int(num_classes, "num_classes"), check_int(num_groups, "num_groups")
        if size_average is not None or reduce is not None:
            reduction = _Reduction.legacy_get_string(size_average, reduce)
        check_choice(reduction, "reduction", REDUCTIONS)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        check_choice(backend, "backend", BACKENDS)
        if isinstance(learn, str):
            learn = (learn,)
        unknown = [x for x in learn if x not in LEARNABLE]
        if unknown:
            raise ValueError(f"autobalance: `learn` must be a subset of {LEARNABLE}, got {tuple(learn)}")
        scale_max = check_positive(scale_max, "scale_max")
        self.num_classes, self.num_groups = num_classes, num_groups
        self.group_params = num_groups > 1 if group_params is None else bool(group_params)
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend
        self.scale_max = float(scale_max)
        self.learn = tuple(x for x in LEARNABLE if x in learn)

        self.register_buffer("clusters", self._cluster_map(clusters, class_counts))
        self.num_clusters = int(self.clusters.max()) + 1
        groups, classes = num_groups, num_classes
        base_scale = _table(scale, "scale", groups, classes, 1.0)
        if not ((base_scale > 0) & (base_scale < self.scale_max)).all():
            raise ValueError(f"autobalance: initial `scale` must lie in the open interval (0, scale_max = "
                             f"{self.scale_max}), got values in [{base_scale.min().item()}, "
                             f"{base_scale.max().item()}]; raise scale_max")
        self.register_buffer("base_weight", _table(weight, "weight", groups, classes, 1.0))
        self.register_buffer("base_scale_logit", torch.logit(base_scale / self.scale_max).float())
        self.register_buffer("base_shift", _table(shift, "shift", groups, classes, 0.0))
        param_rows = groups if self.group_params else 1
        for name in self.learn:
            self.register_parameter(f"{name}_param", nn.Parameter(torch.zeros(param_rows, self.num_clusters)))

    def _cluster_map(self, clusters, class_counts):
        classes = self.num_classes
        if clusters is None:
            return torch.arange(classes)
        if isinstance(clusters, int) and not isinstance(clusters, bool):
            if class_counts is None:
                raise ValueError("autobalance: `clusters` given as a cluster size needs `class_counts` "
                                 "to sort classes by frequency")
            counts = _as_counts(class_counts)
            if counts.shape[-1] != classes:
                raise ValueError(f"autobalance: `class_counts` must have K = {classes} classes in its last "
                                 f"dimension, got shape {list(counts.shape)}")
            return frequency_clusters(counts, clusters)
        if not isinstance(clusters, torch.Tensor):
            raise TypeError("autobalance: `clusters` must be None, an int cluster size or a LongTensor[K] map, "
                            f"got {type(clusters).__name__}")
        if clusters.dtype != torch.int64 or tuple(clusters.shape) != (classes,):
            raise ValueError(f"autobalance: `clusters` map must be an int64 tensor of shape [K] = [{classes}], "
                             f"got {clusters.dtype} of shape {list(clusters.shape)}")
        if (clusters < 0).any():
            raise ValueError(f"autobalance: `clusters` map must be non-negative, got min {clusters.min().item()}")
        return clusters.detach().clone()

    @classmethod
    def from_counts(cls, counts, init: str = "ce", *, tau: Optional[float] = None, gamma: Optional[float] = None,
                    clusters=None, **kwargs) -> "ParametricCE":
        """A module starting at a standard loss (see :func:`loss_tables`).

        ``counts`` is ``[K]`` or ``[G, K]``; with ``[G, K]`` the module has G
        groups. ``tau`` and ``gamma`` are the options of the inits that use them
        (``loss_tables``). ``clusters`` may be a cluster size (frequency clusters
        from ``counts``) or a map. Other keyword arguments go to the constructor.
        """
        tables = loss_tables(counts, init, tau=tau, gamma=gamma)
        groups, classes = tables.weight.shape
        counts = torch.as_tensor(counts)
        return cls(classes, clusters, num_groups=groups, class_counts=counts, weight=tables.weight,
                   scale=tables.scale, shift=tables.shift, **kwargs)

    def _in_class_space(self, name):
        param = getattr(self, f"{name}_param", None)
        if param is None:
            return None
        return param[:, self.clusters]  # [1 or G, K], broadcasts over groups

    def tables(self) -> LossTables:
        """The effective ``[G, K]`` tables (differentiable w.r.t. the parameters)."""
        weight, scale_logit, shift = self.base_weight, self.base_scale_logit, self.base_shift
        d, l, w = (self._in_class_space(n) for n in ("scale", "shift", "weight"))
        if d is not None:
            scale_logit = scale_logit + d
        if l is not None:
            shift = shift + l
        if w is not None:
            weight = weight + w
        scale = self.scale_max * torch.sigmoid(scale_logit)
        groups = self.num_groups
        return LossTables(*(t.expand(groups, -1) for t in (weight, scale, shift)))

    def forward(self, input: torch.Tensor, target: torch.Tensor,
                group: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and input.dim() >= 1 \
                and input.shape[min(1, input.dim() - 1)] != self.num_classes:
            raise ValueError(f"autobalance: `input` must have K = num_classes = {self.num_classes} classes "
                             f"(dimension 1, or 0 for unbatched [K] logits), got shape {list(input.shape)}")
        weight, scale, shift = self.tables()
        return parametric_cross_entropy(input, target, weight, ignore_index=self.ignore_index,
                                        reduction=self.reduction, label_smoothing=self.label_smoothing,
                                        scale=scale, shift=shift, group=group, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_clusters={self.num_clusters}, "
                f"num_groups={self.num_groups}, group_params={self.group_params}, learn={self.learn}, "
                f"scale_max={self.scale_max}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, backend={self.backend!r}")


class LDAMLoss(nn.Module):
    """LDAM (Cao et al., 2019): CE of ``s · (z - m_y e_y)`` with class margins
    ``m_k ∝ n_k^{-1/4}`` scaled so the largest is ``max_margin``, and
    ``s = logit_multiplier`` (LDAM's "scale" of cosine logits; not the table
    ``S`` of the parametric CE). Not a table case of the parametric CE: the
    margin moves only the true-class logit.

    ``weight`` (per-class weights ``[K]``), ``reduction`` and ``ignore_index`` are those
    of ``nn.CrossEntropyLoss`` (``"mean"`` divides by the sum of the weights of the rows
    not ignored). The margins and weights are cast to the logits' dtype (float64 logits
    give a float64 loss). ``forward(logits, target, group=None)`` takes ``group`` like the
    other losses and does not use it: the margins are per class, the same in every group.
    """

    def __init__(self, class_counts, max_margin: float = 0.5, logit_multiplier: float = 30.0, weight=None, *,
                 reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        counts = _as_counts(class_counts)
        if counts.dim() != 1 or (counts <= 0).any():
            raise ValueError(f"autobalance: LDAM needs positive [K] `class_counts`, got {counts.tolist()}")
        margins = counts ** -0.25
        self.register_buffer("margins", (margins * (check_positive(max_margin, "max_margin") / margins.max())).float())
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
            if tuple(weight.shape) != tuple(counts.shape) or not (torch.isfinite(weight) & (weight >= 0)).all():
                raise ValueError(f"autobalance: `weight` must be a [K] = [{counts.numel()}] tensor of finite "
                                 f"non-negative class weights, got {weight.tolist()}")
        self.register_buffer("weight", weight)
        self.logit_multiplier = check_positive(logit_multiplier, "logit_multiplier")
        self.reduction, self.ignore_index = check_choice(reduction, "reduction", REDUCTIONS), ignore_index

    def forward(self, logits, target, group=None):
        classes = self.margins.numel()
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2 \
                or logits.shape[1] != classes:
            got = (f"{logits.dtype} of shape {list(logits.shape)}" if isinstance(logits, torch.Tensor)
                   else type(logits).__name__)
            raise ValueError(f"autobalance: `logits` must be a floating-point [N, K] = [N, {classes}] tensor, "
                             f"got {got}")
        check_labels(target, "target", like=logits[:, 0])
        kept = target != self.ignore_index
        if bool((kept & ((target < 0) | (target >= classes))).any()):  # one host sync; the message needs the range
            check_labels(target[kept], "target", classes)
        safe = torch.where(kept, target, 0)[:, None]
        margin = torch.where(kept, self.margins.to(logits)[safe[:, 0]], 0)[:, None]
        weight = None if self.weight is None else self.weight.to(logits)
        return nn.functional.cross_entropy(self.logit_multiplier * logits.scatter_add(1, safe, -margin), target,
                                           weight=weight, ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"num_classes={self.margins.numel()}, logit_multiplier={self.logit_multiplier}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}")


class GroupDRO(nn.Module):
    """Online group DRO (Sagawa et al., 2020): the loss is ``sum_{g,k} q[g, k] L[g, k]``
    over the (group, class) cells, with ``L[g, k]`` the batch's mean CE of the
    cell and the ``[G, K]`` weights ``q`` updated in training mode by
    ``q <- q exp(step_size L) / sum(...)`` over the cells present in the batch."""

    def __init__(self, num_classes: int, num_groups: int, step_size: float = 0.01):
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes")
        self.num_groups = check_int(num_groups, "num_groups")
        self.step_size = check_positive(step_size, "step_size")
        self.register_buffer("cell_weights", torch.full((num_groups, num_classes), 1.0 / (num_groups * num_classes)))

    def forward(self, logits, target, group=None):
        if group is None:
            raise ValueError("autobalance: GroupDRO needs `group`")
        groups, classes = self.num_groups, self.num_classes
        cell = group * classes + target
        per_sample = nn.functional.cross_entropy(logits, target, reduction="none")
        total = torch.zeros(groups * classes, dtype=per_sample.dtype, device=per_sample.device)
        count = torch.zeros_like(total)
        total.index_add_(0, cell, per_sample)
        count.index_add_(0, cell, torch.ones_like(per_sample))
        cell_loss = (total / count.clamp_min(1)).view(groups, classes)
        if self.training:
            with torch.no_grad():
                present = count.view(groups, classes) > 0
                q = self.cell_weights * torch.exp(self.step_size * cell_loss.detach() * present)
                self.cell_weights.copy_(q / q.sum())
        return (self.cell_weights * cell_loss).sum()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_groups={self.num_groups}, step_size={self.step_size}"


class LATemperature(nn.Module):
    """Logit adjustment with a learnable temperature: ``L_k = tau log pi_k``,
    ``W = S = 1`` (the paper's one-column dictionary ``d = log pi``, searched as
    "AutoBalance: tau (LA)"); ``tau`` starts at ``tau``. ``class_counts`` is
    ``[K]`` or ``[G, K]`` (the prior is the class marginal either way)."""

    def __init__(self, class_counts, tau: float = 1.0, *, reduction: str = "mean", ignore_index: int = -100,
                 backend: str = "fused"):
        super().__init__()
        check_choice(reduction, "reduction", REDUCTIONS)
        check_choice(backend, "backend", BACKENDS)
        tau = check_finite(tau, "tau")
        tables = loss_tables(class_counts, "la")
        self.register_buffer("log_prior", tables.shift)
        self.register_buffer("ones", tables.weight)
        self.tau = nn.Parameter(torch.tensor(tau))
        self.reduction, self.ignore_index, self.backend = reduction, ignore_index, backend

    @property
    def num_groups(self) -> int:
        return self.log_prior.shape[0]

    @property
    def num_classes(self) -> int:
        return self.log_prior.shape[1]

    def tables(self) -> LossTables:
        """The effective ``[G, K]`` tables (the shift differentiable w.r.t. ``tau``)."""
        return LossTables(self.ones, self.ones, self.tau * self.log_prior)

    def forward(self, logits, target, group=None):
        weight, scale, shift = self.tables()
        return parametric_cross_entropy(logits, target, weight, scale=scale, shift=shift, group=group,
                                        reduction=self.reduction, ignore_index=self.ignore_index,
                                        backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, reduction={self.reduction!r}, backend={self.backend!r}"
