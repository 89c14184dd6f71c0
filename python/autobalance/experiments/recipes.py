"""Algorithm 1 end to end (search -> retrain -> evaluate) and the paper's
baselines, as a Python API; ``autobalance run`` is a thin layer over it.

    from autobalance.experiments import data, recipes
    splits = data.load_long_tailed("mnist", seed=0)
    result = recipes.autobalance(lambda: MyNet(), splits, criterion, BalancedCE(10))
    result.metrics["balanced_error"]

Every choice (the learned loss, when to stop searching) is made on the
training and validation splits; the test split is only scored at the end.
"""
import itertools
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from autobalance._validation import check_choice
from autobalance.augment import ImagePolicy
from autobalance.bilevel import HYPER_EVERY, BilevelOptimizer
from autobalance.bilevel.optimizer import hyperparameters
from autobalance.experiments import data
from autobalance.experiments.models import with_cosine_classifier
from autobalance.losses import GroupDRO, LATemperature, LDAMLoss, ParametricCE, frequency_clusters
from autobalance.metrics import ErrorCounts
from autobalance.objectives import BalancedCE, Blend, DeoCE

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency; keep the API usable without it
    tqdm = None


@dataclass
class TrainConfig:
    """One training run: SGD with momentum and a step decay of the learning rate."""
    epochs: int = 24
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay_at: Tuple[float, ...] = (0.75, 0.9)  # fractions of the run; lr x0.1 at each
    device: str = "cpu"


# The paper's CIFAR-LT recipe (section 3, "Implementation"): ResNet-32, SGD lr 0.1, momentum 0.9,
# weight decay 1e-4, batch 128 (as its code), 300 epochs with the lr x0.1 at epochs 220 and 260; the
# hyper-optimizer (SGD lr 0.05, momentum 0.9, weight decay 1e-4, SearchConfig's defaults) starts after
# 120 epochs (warm-up 0.4); clusters of 10 classes on CIFAR-100 (one per class on CIFAR-10).
PAPER_CIFAR_TRAIN = dict(epochs=300, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                         lr_decay_at=(220 / 300, 260 / 300))
PAPER_CIFAR_CLUSTER_SIZE = {"cifar10": None, "cifar100": 10}

PAPER_CIFAR_SEARCH = dict(hyper_every=HYPER_EVERY, hyper_optimizer="sgd")  # every 20 steps (about 700), SGD 0.05
# The group experiment keeps the paper's SGD, a hyper-step every 20 steps (15 on the embedded set): with the
# class experiment's Adam and 50 hyper-steps its tables moved far enough that a model retrained from scratch
# with them fell to chance on a group in 2 of 3 seeds (README, "Results").
GROUP_SEARCH = dict(hyper_every=HYPER_EVERY, hyper_optimizer="sgd")
SEARCH_HYPER_STEPS = 50  # hyper-steps per search by default (SearchConfig.hyper_steps)

PAPER_HYPER_BATCHES = 10  # the published code: 10 training and 10 validation batches per hyper-step


@dataclass
class SearchConfig:
    """The search phase of Algorithm 1 (on the train/validation split).

    ``warmup_fraction`` of the steps train with the initial loss; then about
    ``hyper_steps`` hyper-steps spread evenly over the rest (or one every
    ``hyper_every`` steps, if set; ``schedule``), each averaging ``train_batches``
    training batches and ``val_batches`` validation batches of ``val_batch_size``
    (all of equal size). The rest goes to :class:`BilevelOptimizer`.

    **A search that can travel** (docs/math.md section 5). The hyper-optimizer is
    Adam by default: the truncated Neumann series scales the hypergradient by an
    amount that depends on ``eta``, ``J`` and the curvature (along flat directions
    it is orders of magnitude below the exact one), so SGD's step length is an
    accident of that scale; with the paper's SGD(0.05) and 10 hyper-steps the
    shifts moved by about 0.1 against LA's spread of 4.6 on long-tailed MNIST.
    Adam moves each parameter by up to about ``hyper_lr`` per step whatever that
    scale: 50 steps of 0.05 reach 2.5, the distance from CE to LA's ``log pi`` at
    either end of that data's classes. ``hyper_optimizer="sgd"`` is the paper's.

    **The paper's batching, scaled to the data** (``None``, the default, for any of
    the three; ``hyper_batches``): the published code averages 10 training and 10
    validation batches of the training batch size (128) every 20 steps. Here:

    - training: 10 batches of the training batch size, or as many whole batches as
      the split holds if fewer;
    - validation: the same number of examples as the paper's, ``10 x`` the training
      batch size, or the whole split if it is smaller, in one batch. The validation
      objectives are not sums over examples (class-balanced means, worst cells), so a
      mean of per-batch gradients is a noisy ratio estimate: on the long-tailed MNIST
      below, with the training side fixed at 10 batches of 64, the estimate's cosine with
      the exact hypergradient falls from about 0.94 with the whole validation split in
      one batch to about 0.7 with 3 or 10 batches of 64 (``bench/hyper_batches.py``).

    On the embedded long-tailed MNIST (790 training, 198 validation examples, batch
    64) that is 10 training batches of 64 and the validation split in one batch of 198.

    By default ``theta`` is the last layer (``model.fc``), which makes a
    hyper-step cost about one forward pass per batch; ``last_layer_only=False``
    uses every weight (bench/bench_hyperstep.py measures that).
    """
    warmup_fraction: float = 0.4
    hyper_steps: int = SEARCH_HYPER_STEPS  # about this many hyper-steps per search, whatever the data size
    hyper_every: Optional[int] = None  # a fixed interval instead (the paper's code: 20 steps)
    train_batches: Optional[int] = None
    val_batches: Optional[int] = None
    val_batch_size: Optional[int] = None
    hyper_lr: float = 0.05
    hyper_optimizer: str = "adam"  # "adam": scale-free steps; "sgd": SGD(momentum 0.9, weight decay 1e-4), the paper's
    solver: str = "neumann"
    neumann_terms: int = 5
    last_layer_only: bool = True  # theta = model.fc: cheap hyper-steps on a CPU budget
    max_hypergrad_norm: Optional[float] = None

    def schedule(self, total_steps: int) -> Tuple[int, int, int]:
        """``(warmup_steps, hyper_every, hyper_steps)`` of a search of ``total_steps``
        training steps: the warm-up, the interval and how many hyper-steps it makes.
        The interval is ``hyper_every`` if set, else the one that spreads about
        ``self.hyper_steps`` hyper-steps (at most one more) over the steps after the
        warm-up, so the search's reach does not shrink with the data set."""
        warmup = int(self.warmup_fraction * total_steps)
        every = self.hyper_every or max(1, math.ceil((total_steps - warmup) / self.hyper_steps))
        first = warmup if warmup >= 1 else every  # BilevelOptimizer.hyper_step_due
        count = 0 if first > total_steps else 1 + (total_steps - first) // every
        return warmup, every, count

    def hyper_batches(self, train_size: int, val_size: int, batch_size: int) -> Tuple[int, int, int]:
        """``(train_batches, val_batches, val_batch_size)`` for splits of these sizes: the
        set values, and the paper's scheme scaled to the data for those left None (a
        set ``val_batch_size`` alone gives as many such batches as fit, at most 10)."""
        train = self.train_batches or max(1, min(PAPER_HYPER_BATCHES, train_size // batch_size))
        val_batch = self.val_batch_size or min(val_size, PAPER_HYPER_BATCHES * batch_size)
        val = self.val_batches or (1 if self.val_batch_size is None
                                   else max(1, min(PAPER_HYPER_BATCHES, val_size // val_batch)))
        return train, val, val_batch


@dataclass
class RunResult:
    """One trained and scored model."""
    method: str
    seed: int
    metrics: Dict[str, object]
    seconds: float
    search_seconds: float = 0.0
    trace: List[Dict[str, object]] = field(default_factory=list)  # hyper-steps: epoch, tables
    tables: Optional[Dict[str, list]] = None  # the learned (or fixed) loss tables
    choice: Dict[str, float] = field(default_factory=dict)  # the knobs picked on validation
    selection: List[Dict[str, object]] = field(default_factory=list)  # every candidate's validation score
    retrained_val: Optional[Dict[str, float]] = None  # the retrained model on a held-out validation split
    pda: Optional[Dict[str, list]] = None  # the learned augmentation policy (per cluster), for PDA methods

    def to_json(self):
        out = asdict(self)
        out["metrics"] = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in self.metrics.items()}
        return out


# --------------------------------------------------------------------------- methods

@dataclass
class Method:
    """A training loss for an experiment: ``make(counts, **choice)`` builds it from the
    training counts (``[K]`` or ``[G, K]``); with ``objective`` (called as
    ``objective(K, G, **choice)``) it is searched by Algorithm 1 first. ``grid``
    holds candidate values of the method's knobs (e.g. LA's ``tau``), picked per seed
    on the validation split (``run_method``)."""
    name: str
    make: Callable[..., nn.Module]
    objective: Optional[Callable[..., nn.Module]] = None
    model_transform: Optional[Callable[[nn.Module], nn.Module]] = None  # e.g. LDAM's cosine classifier
    grid: Dict[str, Sequence[float]] = field(default_factory=dict)
    cluster_size: Optional[int] = None  # frequency clusters of the searched parameters: classes per cluster
    cluster_min_val: Optional[int] = None  # ... merged until each holds this many validation examples
    # personalized augmentation: pda(K, num_groups=G, clusters=...) -> an augmentation
    # module whose strengths the search learns with the loss (BilevelOptimizer's `augment`)
    pda: Optional[Callable[..., nn.Module]] = None

    def clusters(self, val_counts: torch.Tensor) -> Optional[torch.Tensor]:
        """The cluster map passed to ``make`` as ``clusters=`` (None: one per class):
        :func:`frequency_clusters` of the validation class counts (in the order of the
        training counts, which they follow), so a searched parameter rests on at least
        ``cluster_min_val`` validation examples."""
        if self.cluster_size is None and self.cluster_min_val is None:
            return None
        return frequency_clusters(val_counts, self.cluster_size or 1, min_count=self.cluster_min_val)

    @property
    def searched(self) -> bool:
        return self.objective is not None

    def choices(self) -> List[Dict[str, float]]:
        """Every combination of the grid's values (``[{}]`` without a grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def _fixed(init, **kw):
    return lambda counts, **choice: ParametricCE.from_counts(counts, init, learn=(), **{**kw, **choice})


def _searched(init, learn):
    return lambda counts, clusters=None, **_: ParametricCE.from_counts(counts, init, learn=learn, clusters=clusters)


MIN_HYPER_STEPS = 20  # fewer, and a search can hardly move the tables: warn
MIN_VAL_CELL = 5  # validation (group, class) cells with fewer examples: warn (the hypergradient rests on them)
LA_TAUS = (0.5, 1.0, 2.0)  # LA's tau, picked per seed on validation
LAMS = (0.1, 0.5, 0.9)  # AutoBalance's validation blend (1 - lam) CE + lam CE_deo (Table 3: 0.9)
DRO_STEPS = (0.001, 0.01, 0.1)  # Group DRO's step size


def class_methods(cdt_gamma: float = 0.2, vs_gamma: float = 0.2, vs_tau: float = 1.0,
                  la_taus: Sequence[float] = LA_TAUS, clusters: Optional[int] = None,
                  cluster_min_val: Optional[int] = MIN_VAL_CELL, pda: bool = False) -> Dict[str, Method]:
    """Table 1: the baselines and the AutoBalance designs, validation objective
    the class-balanced CE. LA's ``tau`` is picked per seed from ``la_taus`` on
    validation; CDT and VS keep the values given. AutoBalance starts at the
    balanced CE except the last design, which starts at LA (tau = 1). Its
    parameters are shared by frequency clusters (``Method.clusters``): ``clusters``
    classes each (1 if None), merged from the rarest up until each cluster holds
    ``cluster_min_val`` validation examples (None: no merging), so no learned
    parameter follows one or two validation images.

    ``pda``: also Table 2's rows (docs/math.md section 9; image inputs): a single
    learned image policy shared by all classes (MADA-style), a policy per
    cluster (PDA) with the balanced CE fixed, and PDA with ``Delta & l``; each
    searched on the same validation objective ("AutoBalance: Delta & l" is the
    row without augmentation)."""
    balanced = lambda k, g, **_: BalancedCE(k)  # noqa: E731
    shared = dict(cluster_size=clusters, cluster_min_val=cluster_min_val)
    methods = [
        Method("CE", _fixed("ce")),
        Method("LDAM", lambda counts, **_: LDAMLoss(counts, max_margin=0.5, logit_multiplier=30.0),
               model_transform=with_cosine_classifier),
        Method("LA", _fixed("la"), grid={"tau": tuple(la_taus)}),
        Method("CDT", _fixed("cdt", gamma=cdt_gamma)),
        Method("VS", _fixed("vs", gamma=vs_gamma, tau=vs_tau)),
        Method("AutoBalance: tau (LA)", lambda counts, **_: LATemperature(counts, 1.0), balanced),
        Method("AutoBalance: l", _searched("balanced", ("shift",)), balanced, **shared),
        Method("AutoBalance: Delta", _searched("balanced", ("scale",)), balanced, **shared),
        Method("AutoBalance: Delta & l", _searched("balanced", ("scale", "shift")), balanced, **shared),
        Method("AutoBalance: Delta & l (LA init)", _searched("la", ("scale", "shift")), balanced, **shared),
    ]
    if pda:
        per_cluster = lambda k, num_groups=1, clusters=None: ImagePolicy(k, clusters, num_groups=num_groups)  # noqa
        one_policy = lambda k, num_groups=1, **_: ImagePolicy(k, torch.zeros(k, dtype=torch.long),  # noqa: E731
                                                              num_groups=num_groups, group_params=False)
        methods += [
            Method("MADA: one shared policy", _searched("balanced", ()), balanced, pda=one_policy),
            Method("PDA", _searched("balanced", ()), balanced, pda=per_cluster, **shared),
            Method("PDA + Delta & l", _searched("balanced", ("scale", "shift")), balanced, pda=per_cluster, **shared),
        ]
    return {m.name: m for m in methods}


def group_regularisers() -> Dict[str, Callable[[torch.Tensor], nn.Module]]:
    """The fairness terms ``L_reg`` of the blended baselines ``(1 - lam) CE + lam L_reg``."""
    return {"CE_bal^G": _fixed("group_balanced"),
            "CE_deo": lambda counts: DeoCE(counts.shape[1], counts.shape[0]),
            "Group-LA": _fixed("group_la")}


def group_methods(lam: Optional[float] = None, dro_step: Optional[float] = None) -> Dict[str, Method]:
    """Table 3: baselines and AutoBalance with validation loss ``(1 - lam) CE + lam
    CE_deo`` (searching per-group scales and shifts, from Group-LA). ``lam`` and Group
    DRO's step size are picked per seed on validation from ``LAMS`` / ``DRO_STEPS``
    unless given."""
    regs = group_regularisers()
    lams = LAMS if lam is None else (lam,)
    steps = DRO_STEPS if dro_step is None else (dro_step,)
    methods = [
        Method("CE", _fixed("ce")),
        Method("CE_bal^G", regs["CE_bal^G"]),
        Method("Group-LA", regs["Group-LA"]),
        Method("CE_deo", lambda counts, **_: Blend(regs["CE_deo"](counts), 1.0)),
        Method("0.1 CE + 0.9 CE_deo", lambda counts, **_: Blend(regs["CE_deo"](counts), 0.9)),
        Method("Group DRO", lambda counts, step_size: GroupDRO(counts.shape[1], counts.shape[0], step_size=step_size),
               grid={"step_size": steps}),
        Method("AutoBalance" if lam is None else f"AutoBalance (lam={lam})", _searched("group_la", ("scale", "shift")),
               lambda k, g, lam: Blend(DeoCE(k, g), lam), grid={"lam": lams}),
    ]
    return {m.name: m for m in methods}


# --------------------------------------------------------------------------- training

def _progress(total, label, enabled):
    if tqdm is None or not enabled:
        return None
    return tqdm(total=total, desc=label, unit="ep", leave=False, dynamic_ncols=True)


def _table_snapshot(criterion):
    if not hasattr(criterion, "tables"):
        return None
    with torch.no_grad():
        weight, scale, shift = criterion.tables()
    return {"weight": weight.tolist(), "scale": scale.tolist(), "shift": shift.tolist()}


def _pda_snapshot(pda):
    """An augmentation policy's per-cluster strengths (ImagePolicy: magnitudes and
    probabilities; SphericalAugment: radii) and its cluster map."""
    if pda is None:
        return None
    with torch.no_grad():
        out = {"clusters": pda.clusters.tolist()}
        for name in ("magnitudes", "probabilities", "radii"):
            if hasattr(pda, name):
                out[name] = getattr(pda, name)().tolist()
        if hasattr(pda, "ops"):
            out["ops"] = list(pda.ops)
    return out


_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def check_search(hyper_steps: int, total: int, warmup: int, hyper_every: int, val: data.ImageDataset,
                 criterion: Optional[nn.Module] = None) -> None:
    """Warns (once per message) when a search makes fewer than ``MIN_HYPER_STEPS``
    hyper-steps, or when a learned parameter rests on fewer than ``MIN_VAL_CELL``
    validation examples: a (group, class) cell, or with ``criterion``'s cluster map a
    (group, cluster) cell (summed over groups when the groups share parameters). Its
    value then follows a handful of validation images (validation overfitting);
    clusters (``frequency_clusters(..., min_count=)``) share parameters across classes."""
    if hyper_steps < MIN_HYPER_STEPS:
        _warn_once(f"autobalance: this search makes only {hyper_steps} hyper-steps ({total} training steps, warm-up "
                   f"{warmup}, one every {hyper_every}); the tables can hardly move from their start. Train longer, "
                   "or take more hyper-steps (SearchConfig.hyper_steps)")
    counts = val.group_class_counts()
    unit = "class"
    cluster_map = getattr(criterion, "clusters", None)
    if isinstance(cluster_map, torch.Tensor) and not torch.equal(cluster_map.cpu(), torch.arange(counts.shape[1])):
        counts = torch.zeros(counts.shape[0], int(cluster_map.max()) + 1, dtype=counts.dtype).index_add_(
            1, cluster_map.cpu(), counts)
        unit = "cluster"
    if not getattr(criterion, "group_params", True):
        counts = counts.sum(0, keepdim=True)
    small = [(g, k, int(counts[g, k])) for g in range(counts.shape[0]) for k in range(counts.shape[1])
             if counts[g, k] < MIN_VAL_CELL]
    if small:
        cells = ", ".join(f"{unit} {k}" + (f" group {g}" if counts.shape[0] > 1 else "") + f": {n}"
                          for g, k, n in small[:6]) + (", ..." if len(small) > 6 else "")
        _warn_once(f"autobalance: {len(small)} validation cells hold fewer than {MIN_VAL_CELL} examples ({cells}); "
                   "their learned parameters follow those few images (validation overfitting); share parameters "
                   "across classes with frequency_clusters(validation counts, min_count=...)")


def save_atomic(path: str, obj) -> None:
    """Writes ``obj`` (a string, or anything ``torch.save`` takes) to ``path`` through a
    temporary file and a rename: an interrupt leaves the old file or the new one, never
    a part of one."""
    tmp = f"{path}.tmp"
    if isinstance(obj, str):
        with open(tmp, "w") as f:
            f.write(obj)
            f.flush()
            os.fsync(f.fileno())
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def _saved_seconds(path: Optional[str]) -> float:
    """The training time recorded in a checkpoint (0 without one)."""
    if path is None or not os.path.exists(path):
        return 0.0
    return float(torch.load(path, weights_only=True)["seconds"])


def train(model: nn.Module, dataset: data.ImageDataset, criterion: nn.Module, config: TrainConfig, *,
          seed: int = 0, augment=None, search: Optional[SearchConfig] = None, objective: Optional[nn.Module] = None,
          val: Optional[data.ImageDataset] = None, progress: bool = False, label: str = "train",
          checkpoint: Optional[str] = None, pda: Optional[nn.Module] = None):
    """Trains ``model`` in place on ``dataset`` with ``criterion``.

    With ``search`` (and ``objective``, ``val``), runs the search phase of
    Algorithm 1: the criterion's learnable parameters are tuned by a
    :class:`BilevelOptimizer`; it is frozen at the end. Returns the hyper-step
    trace (epoch, validation objective, tables after the step).

    ``checkpoint``: a file path. Every epoch ends by saving the whole state there
    (weights, optimizers, schedule, loss, the loaders' positions, the random state,
    the trace; atomically), and a call that finds the file continues from it: the
    result is bit-identical to a run that never stopped.

    ``pda``: a personalized augmentation applied to every training batch
    (``pda(inputs, target, group)``). With ``search`` its learnable strengths are
    hyperparameters too (``BilevelOptimizer(augment=pda)``); without, it is applied
    as it is (a learned policy in the retrain).
    """
    device = torch.device(config.device)
    model.to(device)
    criterion.to(device)
    if pda is not None:
        pda.to(device).train()
    weights = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(weights, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    loader = data.BatchLoader(dataset, config.batch_size, shuffle=True, seed=seed, augment=augment)
    total = config.epochs * len(loader)
    decay = [int(f * total) for f in config.lr_decay_at]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=decay, gamma=0.1)
    step, trace, loaders = optimizer, [], [loader]
    if search is not None:
        hyper = hyperparameters(criterion, pda)[1]
        check_choice(search.hyper_optimizer, "SearchConfig.hyper_optimizer", ("sgd", "adam"))
        n_train, n_val, val_batch = search.hyper_batches(len(dataset), len(val), config.batch_size)
        warmup, hyper_every, count = search.schedule(total)
        learned = criterion if pda is None or any(p.requires_grad for p in criterion.parameters()) else pda
        check_search(count, total, warmup, hyper_every, val, learned)  # the clusters of what the search learns
        loaders += [data.BatchLoader(dataset, min(config.batch_size, len(dataset)), seed=seed + 1, augment=augment,
                                     drop_last=True),
                    data.BatchLoader(val, val_batch, seed=seed + 2, drop_last=True)]
        step = BilevelOptimizer(
            optimizer, criterion, objective,
            hyper_optimizer=(torch.optim.Adam(hyper, lr=search.hyper_lr) if search.hyper_optimizer == "adam" else
                             torch.optim.SGD(hyper, lr=search.hyper_lr, momentum=0.9, weight_decay=1e-4)),
            warmup_steps=warmup, hyper_every=hyper_every,
            solver=search.solver, neumann_terms=search.neumann_terms,
            inner_params=model.fc.parameters() if search.last_layer_only else None,
            max_hypergrad_norm=search.max_hypergrad_norm, model=model,
            train_loader=loaders[1], val_loader=loaders[2],
            batches_per_hyper_step=(n_train, n_val), augment=pda)
        trace.append({"epoch": 0.0, "tables": _table_snapshot(criterion), "pda": _pda_snapshot(pda)})
    first_epoch, seconds, start = 0, 0.0, time.perf_counter()
    if checkpoint is not None and os.path.exists(checkpoint):
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        criterion.load_state_dict(saved["criterion"])
        if pda is not None:
            pda.load_state_dict(saved["pda"])
        step.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        for each, state in zip(loaders, saved["loaders"]):
            each.load_state_dict(state)
        torch.set_rng_state(saved["rng"])
        first_epoch, seconds, trace = saved["epoch"], saved["seconds"], saved["trace"]
    bar = _progress(config.epochs, label, progress)
    if bar is not None:
        bar.update(first_epoch)
    for epoch in range(first_epoch, config.epochs):
        model.train()
        for i, batch in enumerate(loader):
            inputs, target, group = (t.to(device) if t is not None else None for t in batch)
            if pda is not None:  # no graph: the hyper-step augments its own batches to differentiate
                with torch.no_grad():
                    inputs = pda(inputs, target, group)
            loss = criterion(model(inputs), target, group)
            step.zero_grad()
            loss.backward()
            step.step()
            schedule.step()
            if search is not None and step.hyper_step_due:
                result = step.hyper_step()
                trace.append({"epoch": epoch + (i + 1) / len(loader), "val_objective": float(result.val_loss),
                              "train_loss": float(result.train_loss), "applied": bool(result.applied),
                              "hypergrad_norm": float(result.hypergrad_norm), "step_size": result.step_size,
                              "tables": _table_snapshot(criterion), "pda": _pda_snapshot(pda)})
        if checkpoint is not None:
            save_atomic(checkpoint, {
                "epoch": epoch + 1, "seconds": seconds + time.perf_counter() - start, "trace": trace,
                "model": model.state_dict(), "criterion": criterion.state_dict(), "optimizer": step.state_dict(),
                "pda": None if pda is None else pda.state_dict(),
                "schedule": schedule.state_dict(), "loaders": [each.state_dict() for each in loaders],
                "rng": torch.get_rng_state()})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if search is not None:
        step.freeze()
    return trace


def _to(batch, device):
    return tuple(t.to(device) if t is not None else None for t in batch)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: data.ImageDataset, *, device="cpu", cell_weights=None,
             batch_size: int = 512) -> Dict[str, object]:
    """Test metrics (``autobalance.metrics``) of ``model`` on ``dataset``, and
    ``predicted_classes``: how many classes it predicts at all (a model that
    predicts one class has a trivially zero DEO)."""
    model.eval()
    counts = ErrorCounts(num_classes=dataset.num_classes, num_groups=dataset.num_groups, cell_weights=cell_weights)
    predicted = torch.zeros(dataset.num_classes, dtype=torch.long)
    for batch in data.BatchLoader(dataset, batch_size, shuffle=False):
        inputs, target, group = _to(batch, device)
        prediction = model(inputs).argmax(1)
        counts.update(prediction, target, group)
        predicted += torch.bincount(prediction.cpu(), minlength=dataset.num_classes)
    return {**counts.compute(), "predicted_classes": int((predicted > 0).sum())}


def _train_cell_weights(dataset):
    """Training (group, class) frequencies ``[G, K]``: the test's standard
    error is reweighted by them (paper section 4)."""
    if dataset.num_groups == 1:
        return None
    counts = dataset.group_class_counts().double()
    return counts / counts.sum()


def validation_score(metrics: Dict[str, object], grouped: bool) -> Tuple[bool, float, float]:
    """How a candidate is ranked on the validation split (lower is better): a model that
    predicts a single class there is degenerate and ranks last (its DEO is trivially 0);
    then the headline metric (balanced error, or DEO with groups), then the standard
    error."""
    headline = metrics["deo_error"] if grouped else metrics["balanced_error"]
    return metrics["predicted_classes"] <= 1, headline, metrics["standard_error"]


def run_method(method: Method, splits: data.DataSplits, model_factory: Callable[[], nn.Module],
               config: TrainConfig, search: SearchConfig, *, seed: int = 0, progress: bool = False,
               checkpoint: Optional[str] = None) -> RunResult:
    """Trains and scores one method. A searched method runs Algorithm 1: search
    on ``splits.train`` with ``splits.val``, freeze, retrain a fresh model on
    ``splits.full_train`` with the learned loss, score on ``splits.test``.

    A method with a ``grid`` first trains every candidate on ``splits.train`` (for a
    searched method, its search) and scores it on ``splits.val`` (``validation_score``);
    the best one is retrained on ``splits.full_train`` and scored on the test split,
    which never enters a choice. ``RunResult.choice`` and ``selection`` report it;
    ``seconds`` includes the selection.

    ``checkpoint``: a folder for this run. Every training in it saves a checkpoint
    per epoch there (``train``), every finished candidate its loss and validation
    score, and the finished run ``result.json``; a call that finds them continues
    where the last one stopped, bit-identical to a run that never stopped, and one
    that finds ``result.json`` returns it. The other files go once it is written."""
    done = None if checkpoint is None else os.path.join(checkpoint, "result.json")
    if done is not None:
        if os.path.exists(done):
            with open(done) as f:
                return RunResult(**json.load(f))
        os.makedirs(checkpoint, exist_ok=True)
    stage = (lambda name: None) if checkpoint is None else (lambda name: os.path.join(checkpoint, name))
    if method.model_transform is not None:
        model_factory = (lambda make: lambda: method.model_transform(make()))(model_factory)
    grouped = splits.full_train.num_groups > 1
    counts = splits.full_train.group_class_counts() if grouped else splits.full_train.class_counts()
    k, g = splits.full_train.num_classes, splits.full_train.num_groups
    clusters = method.clusters(splits.val.class_counts())
    shared = {} if clusters is None else {"clusters": clusters}
    choices = method.choices()
    candidates, selection, search_seconds = [], [], 0.0
    for i, choice in enumerate(choices):
        torch.manual_seed(seed)
        criterion = method.make(counts, **shared, **choice)
        pda = None if method.pda is None else method.pda(k, num_groups=g, **shared)
        record = stage(f"candidate-{i}.pt")
        if record is not None and os.path.exists(record):
            saved = torch.load(record, weights_only=True)
            criterion.load_state_dict(saved["criterion"])
            if pda is not None:
                pda.load_state_dict(saved["pda"])
            if method.searched:  # as BilevelOptimizer.freeze() left them
                for p in hyperparameters(criterion, pda)[1]:
                    p.requires_grad_(False)
            trace, scored, spent = saved["trace"], saved["selection"], saved["seconds"]
        else:
            trace, scored, start = [], None, time.perf_counter()
            spent = _saved_seconds(stage(f"train-{i}.pt"))
            if method.searched or len(choices) > 1:
                torch.manual_seed(seed)
                model = model_factory()
                objective = method.objective(k, g, **choice) if method.searched else None
                trace = train(model, splits.train, criterion, config, seed=seed, augment=splits.augment,
                              search=search if method.searched else None, objective=objective, val=splits.val,
                              progress=progress, label=f"{method.name} {'search' if method.searched else choice}",
                              checkpoint=stage(f"train-{i}.pt"), pda=pda)
                if len(choices) > 1:
                    val = evaluate(model, splits.val, device=config.device,
                                   cell_weights=_train_cell_weights(splits.train))
                    scored = {"choice": choice, "score": list(validation_score(val, grouped)),
                              "degenerate": val["predicted_classes"] <= 1}
            spent += time.perf_counter() - start
            if record is not None:
                save_atomic(record, {"criterion": criterion.state_dict(), "trace": trace, "selection": scored,
                                     "seconds": spent, "pda": None if pda is None else pda.state_dict()})
        search_seconds += spent
        if scored is not None:
            selection.append(scored)
        candidates.append((choice, criterion, trace, pda))
    best = min(range(len(candidates)), key=lambda i: selection[i]["score"]) if selection else 0
    choice, criterion, trace, pda = candidates[best]
    start, retrain = time.perf_counter(), stage("retrain.pt")
    seconds = search_seconds + _saved_seconds(retrain)
    torch.manual_seed(seed + 1000)
    model = model_factory()
    train(model, splits.full_train, criterion, config, seed=seed + 1000, augment=splits.augment, progress=progress,
          label=method.name, checkpoint=retrain, pda=pda)
    seconds += time.perf_counter() - start
    metrics = evaluate(model, splits.test, device=config.device, cell_weights=_train_cell_weights(splits.full_train))
    retrained_val = None
    if method.searched and len(splits.full_train) == len(splits.train):  # validation held out of the retrain too
        retrained_val = _retrained_check(method.name, seed, evaluate(model, splits.val, device=config.device,
                                         cell_weights=_train_cell_weights(splits.train)), selection, best, grouped)
    result = RunResult(method.name, seed, metrics, seconds, search_seconds, trace, _table_snapshot(criterion), choice,
                       selection, retrained_val, _pda_snapshot(pda))
    if done is not None:
        save_atomic(done, json.dumps(result.to_json()))
        for name in os.listdir(checkpoint):
            if name.endswith(".pt"):
                os.remove(os.path.join(checkpoint, name))
    return result


RETRAIN_GAP = 0.1  # the retrained model's validation headline this much above the search model's: warn


def _retrained_check(name, seed, val, selection, best, grouped):
    """The retrained model's validation metrics, with a warning when it is degenerate or
    much worse there than the search model it replaces: the learned loss did not carry
    over to a model trained from scratch with it (the search model co-evolved with
    the tables)."""
    degenerate, headline, _ = validation_score(val, grouped)
    searched = selection[best]["score"][1] if selection else None
    if degenerate or (searched is not None and headline - searched > RETRAIN_GAP):
        _warn_once(f"autobalance: {name}, seed {seed}: the model retrained with the learned loss scores "
                   f"{headline:.3f} on validation" + (f" against the search model's {searched:.3f}" if searched
                                                       is not None else "") +
                   (" and predicts a single class" if degenerate else "") +
                   "; the learned tables did not carry over to a fresh model (try a shorter search or fewer "
                   "hyper-steps)")
    return {"headline": headline, "search_headline": searched, "degenerate": degenerate,
            "group_balanced_error": val["group_balanced_error"], "worst_cell_error": val["worst_cell_error"]}


def autobalance(model_factory: Callable[[], nn.Module], splits: data.DataSplits, criterion: nn.Module,
                objective: nn.Module, config: Optional[TrainConfig] = None, search: Optional[SearchConfig] = None,
                *, seed: int = 0, progress: bool = False) -> RunResult:
    """Algorithm 1 with your own model, data and loss: search ``criterion``'s
    learnable parameters against ``objective`` on ``splits.train`` /
    ``splits.val``, retrain ``model_factory()`` on ``splits.full_train`` with
    the learned loss, and score it on ``splits.test``."""
    method = Method("AutoBalance", lambda counts: criterion, lambda k, g: objective)
    return run_method(method, splits, model_factory, config or TrainConfig(), search or SearchConfig(),
                      seed=seed, progress=progress)


def lam_sweep(splits, model_factory, config, search, lams: Sequence[float], *, seed=0, progress=False,
              autobalance_lams: Optional[Sequence[float]] = None,
              checkpoint: Optional[str] = None) -> List[Dict[str, object]]:
    """Figure 5: the blended baselines ``(1 - lam) CE + lam L_reg`` for each
    regulariser and ``lam``, and AutoBalance with validation loss
    ``(1 - lam) CE + lam CE_deo`` for each of ``autobalance_lams``. ``checkpoint``: a
    folder, one ``run_method`` checkpoint folder per point in it."""
    methods = [(reg_name, lam, Method(f"{reg_name} lam={lam}", lambda counts, reg=reg, lam=lam: Blend(reg(counts), lam)))
               for reg_name, reg in group_regularisers().items() for lam in lams]
    methods += [("AutoBalance", lam, Method(f"AutoBalance lam={lam}", _searched("group_la", ("scale", "shift")),
                                            lambda k, g, lam=lam: Blend(DeoCE(k, g), lam)))
                for lam in (autobalance_lams if autobalance_lams is not None else lams)]
    points = []
    for i, (family, lam, method) in enumerate(methods):
        folder = None if checkpoint is None else os.path.join(checkpoint, f"{i}")
        result = run_method(method, splits, model_factory, config, search, seed=seed, progress=progress,
                            checkpoint=folder)
        points.append({"family": family, "lam": lam, "metrics": result.to_json()["metrics"]})
    return points

