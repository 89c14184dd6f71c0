"""Tests of autobalance.experiments.models: shapes, ResNet-32's size, gradients (including
the second-order ones the hypergradient takes through ``fc``), and a short
training run of the small CNN on long-tailed digits."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autobalance.experiments import data as D
from autobalance.experiments import models as M


@pytest.fixture(autouse=True)
def one_thread():
    """These batches are tiny: one thread is as fast, and stays fast when the
    two cores are shared (intra-op threads then spin against each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("in_channels, size, num_classes", [(1, 28, 10), (1, 8, 10), (3, 28, 2), (3, 32, 100)])
def test_small_cnn_shapes(in_channels, size, num_classes):
    model = M.SmallCNN(num_classes, in_channels)
    out = model(torch.randn(5, in_channels, size, size))
    assert out.shape == (5, num_classes)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == num_classes
    assert model.features(torch.randn(2, in_channels, size, size)).shape == (2, model.fc.in_features)


def test_resnet32_size_and_structure():
    model = M.resnet32(10)
    assert _count(model) == 464_154  # He et al.'s "0.46M", option-A shortcuts
    assert _count(M.resnet32(100)) == 464_154 + 90 * 65
    assert abs(_count(M.resnet32(10, shortcut="B")) - 0.46e6) < 0.01e6
    blocks = [m for m in model.modules() if isinstance(m, M.BasicBlock)]
    assert len(blocks) == 15
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 32  # 31 convs + fc
    assert [m.out_channels for m in convs[1::10]] == [16, 32, 64]
    assert isinstance(model.fc, nn.Linear) and (model.fc.in_features, model.fc.out_features) == (64, 10)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet32_forward_backward(shortcut):
    model = M.resnet32(7, in_channels=1, shortcut=shortcut)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.features(x).shape == (2, 64)


@pytest.mark.parametrize("model", [M.SmallCNN(4, 1, width=4), M.resnet32(4, in_channels=1)],
                         ids=["small_cnn", "resnet32"])
def test_second_order_through_fc(model):
    """A Hessian-vector product in the fc weights, as the hypergradient takes it."""
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6) % 4
    theta = list(model.fc.parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, theta, create_graph=True)
    vector = [torch.randn_like(g) for g in grads]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector)), theta, retain_graph=True)
    assert all(h.shape == p.shape and torch.isfinite(h).all() for h, p in zip(hvp, theta))
    # Symmetric in two directions: <u, H v> = <v, H u>.
    other = [torch.randn_like(g) for g in grads]
    hvp_other = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, other)), theta)
    uhv = sum((u * h).sum() for u, h in zip(other, hvp))
    vhu = sum((v * h).sum() for v, h in zip(vector, hvp_other))
    assert torch.allclose(uhv, vhu, rtol=1e-4, atol=1e-6)


def test_build_model_and_bad_arguments():
    assert isinstance(M.build_model("small_cnn", 10, 1), M.SmallCNN)
    resnet = M.build_model("resnet32", 100, 3)
    assert isinstance(resnet, M.CifarResNet) and resnet.fc.out_features == 100
    with pytest.raises(ValueError, match="unknown model.*'vgg'.*resnet32"):
        M.build_model("vgg", 10, 3)
    with pytest.raises(ValueError, match="depth.*6 n \\+ 2.*33"):
        M.CifarResNet(33)
    with pytest.raises(ValueError, match="shortcut.*'C'"):
        M.resnet32(shortcut="C")
    with pytest.raises(ValueError, match="num_classes.*>= 2"):
        M.SmallCNN(1)
    with pytest.raises(ValueError, match="in_channels.*>= 1"):
        M.resnet32(10, in_channels=0)


def test_small_cnn_learns_long_tailed_digits():
    torch.manual_seed(0)
    splits = D.load_long_tailed("digits", seed=0)
    model = M.SmallCNN(10, 1, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = D.BatchLoader(splits.full_train, 64, seed=0)
    for _ in range(15):
        for x, y, _ in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(splits.test.inputs).argmax(1)
    per_class = torch.stack([(pred[splits.test.targets == k] == k).float().mean() for k in range(10)])
    assert per_class.mean() > 0.8
    assert per_class[:3].mean() >= per_class[-3:].mean()  # the head is learnt at least as well as the tail
