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
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from autobalance._validation import check_choice
from autobalance.bilevel import HYPER_EVERY, BilevelOptimizer
from autobalance.experiments import data
from autobalance.experiments.models import with_cosine_classifier
from autobalance.losses import GroupDRO, LATemperature, LDAMLoss, ParametricCE
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

PAPER_HYPER_BATCHES = 10  # the published code: 10 training and 10 validation batches per hyper-step


@dataclass
class SearchConfig:
    """The search phase of Algorithm 1 (on the train/validation split).

    ``warmup_fraction`` of the steps train with the initial loss; then a
    hyper-step every ``hyper_every`` steps, each averaging ``train_batches``
    training batches and ``val_batches`` validation batches of ``val_batch_size``
    (all of equal size). The rest goes to :class:`BilevelOptimizer`.

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
    hyper_every: int = HYPER_EVERY
    train_batches: Optional[int] = None
    val_batches: Optional[int] = None
    val_batch_size: Optional[int] = None
    hyper_lr: float = 0.05
    hyper_optimizer: str = "sgd"  # "sgd": SGD(momentum 0.9, weight decay 1e-4) as the paper; "adam": scale-free steps
    solver: str = "neumann"
    neumann_terms: int = 5
    last_layer_only: bool = True  # theta = model.fc: cheap hyper-steps on a CPU budget
    max_hypergrad_norm: Optional[float] = None

    def schedule(self, total_steps: int) -> Tuple[int, int, int]:
        """``(warmup_steps, hyper_every, hyper_steps)`` of a search of ``total_steps``
        training steps: the warm-up, the interval and how many hyper-steps it makes."""
        warmup = int(self.warmup_fraction * total_steps)
        first = warmup if warmup >= 1 else self.hyper_every  # BilevelOptimizer.hyper_step_due
        count = 0 if first > total_steps else 1 + (total_steps - first) // self.hyper_every
        return warmup, self.hyper_every, count

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

    @property
    def searched(self) -> bool:
        return self.objective is not None

    def choices(self) -> List[Dict[str, float]]:
        """Every combination of the grid's values (``[{}]`` without a grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]


def _fixed(init, **kw):
    return lambda counts, **choice: ParametricCE.from_counts(counts, init, learn=(), **{**kw, **choice})


def _searched(init, learn, **kw):
    return lambda counts, **_: ParametricCE.from_counts(counts, init, learn=learn, **kw)


LA_TAUS = (0.5, 1.0, 2.0)  # LA's tau, picked per seed on validation
LAMS = (0.1, 0.5, 0.9)  # AutoBalance's validation blend (1 - lam) CE + lam CE_deo (Table 3: 0.9)
DRO_STEPS = (0.001, 0.01, 0.1)  # Group DRO's step size


def class_methods(cdt_gamma: float = 0.2, vs_gamma: float = 0.2, vs_tau: float = 1.0,
                  la_taus: Sequence[float] = LA_TAUS, clusters: Optional[int] = None) -> Dict[str, Method]:
    """Table 1: the baselines and the AutoBalance designs, validation objective
    the class-balanced CE. LA's ``tau`` is picked per seed from ``la_taus`` on
    validation; CDT and VS keep the values given. AutoBalance starts at the
    balanced CE except the last design, which starts at LA (tau = 1); ``clusters``
    (a cluster size) shares its parameters across classes of similar frequency."""
    balanced = lambda k, g, **_: BalancedCE(k)  # noqa: E731
    methods = [
        Method("CE", _fixed("ce")),
        Method("LDAM", lambda counts, **_: LDAMLoss(counts, max_margin=0.5, logit_multiplier=30.0),
               model_transform=with_cosine_classifier),
        Method("LA", _fixed("la"), grid={"tau": tuple(la_taus)}),
        Method("CDT", _fixed("cdt", gamma=cdt_gamma)),
        Method("VS", _fixed("vs", gamma=vs_gamma, tau=vs_tau)),
        Method("AutoBalance: tau (LA)", lambda counts, **_: LATemperature(counts, 1.0), balanced),
        Method("AutoBalance: l", _searched("balanced", ("shift",), clusters=clusters), balanced),
        Method("AutoBalance: Delta", _searched("balanced", ("scale",), clusters=clusters), balanced),
        Method("AutoBalance: Delta & l", _searched("balanced", ("scale", "shift"), clusters=clusters), balanced),
        Method("AutoBalance: Delta & l (LA init)", _searched("la", ("scale", "shift"), clusters=clusters), balanced),
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


MIN_HYPER_STEPS = 20  # fewer, and a search can hardly move the tables: warn
MIN_VAL_CELL = 5  # validation (group, class) cells with fewer examples: warn (the hypergradient rests on them)
_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def check_search(hyper_steps: int, total: int, warmup: int, hyper_every: int, val: data.ImageDataset) -> None:
    """Warns (once per message) when a search makes fewer than ``MIN_HYPER_STEPS``
    hyper-steps, or when a validation (group, class) cell holds fewer than
    ``MIN_VAL_CELL`` examples: the learned parameters of that cell then follow a
    handful of validation images (overfitting the validation split; clusters,
    ``ParametricCE(clusters=...)``, share parameters across classes)."""
    if hyper_steps < MIN_HYPER_STEPS:
        _warn_once(f"autobalance: this search makes only {hyper_steps} hyper-steps ({total} training steps, warm-up "
                   f"{warmup}, one every {hyper_every}); the tables can hardly move from their start. Train longer, "
                   "or take hyper-steps more often (SearchConfig.hyper_every)")
    counts = val.group_class_counts()
    small = [(g, k, int(counts[g, k])) for g in range(counts.shape[0]) for k in range(counts.shape[1])
             if counts[g, k] < MIN_VAL_CELL]
    if small:
        cells = ", ".join(f"class {k}" + (f" group {g}" if counts.shape[0] > 1 else "") + f": {n}"
                          for g, k, n in small[:6]) + (", ..." if len(small) > 6 else "")
        _warn_once(f"autobalance: {len(small)} validation cells hold fewer than {MIN_VAL_CELL} examples ({cells}); "
                   "their learned parameters follow those few images (validation overfitting); share parameters "
                   "across classes with ParametricCE(clusters=...)")


def train(model: nn.Module, dataset: data.ImageDataset, criterion: nn.Module, config: TrainConfig, *,
          seed: int = 0, augment=None, search: Optional[SearchConfig] = None, objective: Optional[nn.Module] = None,
          val: Optional[data.ImageDataset] = None, progress: bool = False, label: str = "train"):
    """Trains ``model`` in place on ``dataset`` with ``criterion``.

    With ``search`` (and ``objective``, ``val``), runs the search phase of
    Algorithm 1: the criterion's learnable parameters are tuned by a
    :class:`BilevelOptimizer`; it is frozen at the end. Returns the hyper-step
    trace (epoch, validation objective, tables after the step).
    """
    device = torch.device(config.device)
    model.to(device)
    criterion.to(device)
    weights = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(weights, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    loader = data.BatchLoader(dataset, config.batch_size, shuffle=True, seed=seed, augment=augment)
    total = config.epochs * len(loader)
    decay = [int(f * total) for f in config.lr_decay_at]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=decay, gamma=0.1)
    step, trace = optimizer, []
    if search is not None:
        hyper = [p for p in criterion.parameters() if p.requires_grad]
        check_choice(search.hyper_optimizer, "SearchConfig.hyper_optimizer", ("sgd", "adam"))
        n_train, n_val, val_batch = search.hyper_batches(len(dataset), len(val), config.batch_size)
        warmup, hyper_every, count = search.schedule(total)
        check_search(count, total, warmup, hyper_every, val)
        step = BilevelOptimizer(
            optimizer, criterion, objective,
            hyper_optimizer=(torch.optim.Adam(hyper, lr=search.hyper_lr) if search.hyper_optimizer == "adam" else
                             torch.optim.SGD(hyper, lr=search.hyper_lr, momentum=0.9, weight_decay=1e-4)),
            warmup_steps=warmup, hyper_every=hyper_every,
            solver=search.solver, neumann_terms=search.neumann_terms,
            inner_params=model.fc.parameters() if search.last_layer_only else None,
            max_hypergrad_norm=search.max_hypergrad_norm, model=model,
            train_loader=data.BatchLoader(dataset, min(config.batch_size, len(dataset)), seed=seed + 1,
                                          augment=augment, drop_last=True),
            val_loader=data.BatchLoader(val, val_batch, seed=seed + 2, drop_last=True),
            batches_per_hyper_step=(n_train, n_val))
        trace.append({"epoch": 0.0, "tables": _table_snapshot(criterion)})
    bar = _progress(config.epochs, label, progress)
    for epoch in range(config.epochs):
        model.train()
        for i, batch in enumerate(loader):
            inputs, target, group = (t.to(device) if t is not None else None for t in batch)
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
                              "tables": _table_snapshot(criterion)})
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
               config: TrainConfig, search: SearchConfig, *, seed: int = 0, progress: bool = False) -> RunResult:
    """Trains and scores one method. A searched method runs Algorithm 1: search
    on ``splits.train`` with ``splits.val``, freeze, retrain a fresh model on
    ``splits.full_train`` with the learned loss, score on ``splits.test``.

    A method with a ``grid`` first trains every candidate on ``splits.train`` (for a
    searched method, its search) and scores it on ``splits.val`` (``validation_score``);
    the best one is retrained on ``splits.full_train`` and scored on the test split,
    which never enters a choice. ``RunResult.choice`` and ``selection`` report it;
    ``seconds`` includes the selection."""
    if method.model_transform is not None:
        model_factory = (lambda make: lambda: method.model_transform(make()))(model_factory)
    grouped = splits.full_train.num_groups > 1
    counts = splits.full_train.group_class_counts() if grouped else splits.full_train.class_counts()
    k, g = splits.full_train.num_classes, splits.full_train.num_groups
    start = time.perf_counter()
    choices = method.choices()
    candidates, selection = [], []
    for choice in choices:
        torch.manual_seed(seed)
        criterion = method.make(counts, **choice)
        trace = []
        if method.searched or len(choices) > 1:
            torch.manual_seed(seed)
            model = model_factory()
            objective = method.objective(k, g, **choice) if method.searched else None
            trace = train(model, splits.train, criterion, config, seed=seed, augment=splits.augment,
                          search=search if method.searched else None, objective=objective, val=splits.val,
                          progress=progress, label=f"{method.name} {'search' if method.searched else choice}")
            if len(choices) > 1:
                val = evaluate(model, splits.val, device=config.device, cell_weights=_train_cell_weights(splits.train))
                selection.append({"choice": choice, "score": list(validation_score(val, grouped)),
                                  "degenerate": val["predicted_classes"] <= 1})
        candidates.append((choice, criterion, trace))
    best = min(range(len(candidates)), key=lambda i: selection[i]["score"]) if selection else 0
    choice, criterion, trace = candidates[best]
    search_seconds = time.perf_counter() - start
    torch.manual_seed(seed + 1000)
    model = model_factory()
    train(model, splits.full_train, criterion, config, seed=seed + 1000, augment=splits.augment, progress=progress,
          label=method.name)
    seconds = time.perf_counter() - start
    metrics = evaluate(model, splits.test, device=config.device, cell_weights=_train_cell_weights(splits.full_train))
    return RunResult(method.name, seed, metrics, seconds, search_seconds, trace, _table_snapshot(criterion), choice,
                     selection)


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
              autobalance_lams: Optional[Sequence[float]] = None) -> List[Dict[str, object]]:
    """Figure 5: the blended baselines ``(1 - lam) CE + lam L_reg`` for each
    regulariser and ``lam``, and AutoBalance with validation loss
    ``(1 - lam) CE + lam CE_deo`` for each of ``autobalance_lams``."""
    points = []
    for reg_name, reg in group_regularisers().items():
        for lam in lams:
            method = Method(f"{reg_name} lam={lam}", lambda counts, reg=reg, lam=lam: Blend(reg(counts), lam))
            result = run_method(method, splits, model_factory, config, search, seed=seed, progress=progress)
            points.append({"family": reg_name, "lam": lam, "metrics": result.to_json()["metrics"]})
    for lam in (autobalance_lams if autobalance_lams is not None else lams):
        method = Method(f"AutoBalance lam={lam}", _searched("group_la", ("scale", "shift")),
                        lambda k, g, lam=lam: Blend(DeoCE(k, g), lam))
        result = run_method(method, splits, model_factory, config, search, seed=seed, progress=progress)
        points.append({"family": "AutoBalance", "lam": lam, "metrics": result.to_json()["metrics"]})
    return points

