"""The search recipe of the main job: the paper's batching scaled to the data, and the
hyper-step's diagnostics in the trace."""
import pytest
import torch
from torch import nn

from autobalance import ParametricCE
from autobalance.bilevel import BilevelOptimizer
from autobalance.experiments import recipes
from autobalance.experiments.data import ImageDataset
from autobalance.objectives import BalancedCE


@pytest.mark.parametrize("sizes, set_values, expected", [
    ((790, 198, 64), {}, (10, 1, 198)),        # the embedded long-tailed MNIST: the validation split in one batch
    ((2604, 400, 64), {}, (10, 1, 400)),       # the group experiment
    ((100, 30, 64), {}, (1, 1, 30)),           # splits smaller than a batch
    ((100000, 100000, 128), {}, (10, 1, 1280)),  # the published 10 x 128 examples on each side
    ((790, 198, 64), {"val_batch_size": 64}, (10, 3, 64)),
    ((790, 198, 64), {"train_batches": 2, "val_batches": 2, "val_batch_size": 256}, (2, 2, 256)),
])
def test_hyper_batches_scale_the_papers_scheme_to_the_data(sizes, set_values, expected):
    assert recipes.SearchConfig(**set_values).hyper_batches(*sizes) == expected


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Flatten(), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def test_search_draws_the_configured_batches_and_traces_the_hyper_steps(monkeypatch):
    g = torch.Generator().manual_seed(0)
    targets = torch.arange(90) % 3
    train = ImageDataset(torch.randn(90, 1, 2, 2, generator=g), targets, None, num_classes=3)
    val = ImageDataset(torch.randn(40, 1, 2, 2, generator=g), torch.arange(40) % 3, None, num_classes=3)
    drawn = []
    original = BilevelOptimizer._arguments

    def spy(self, *args):
        model, train_batches, val_batches = original(self, *args)
        drawn.append(tuple((len(b), tuple(sorted({len(x) for x, *_ in b}))) for b in (train_batches, val_batches)))
        return model, train_batches, val_batches
    monkeypatch.setattr(BilevelOptimizer, "_arguments", spy)
    config = recipes.TrainConfig(epochs=2, batch_size=16)
    search = recipes.SearchConfig(warmup_fraction=0.0, hyper_every=3)
    trace = recipes.train(_Net(), train, ParametricCE(3), config, search=search, objective=BalancedCE(3), val=val)
    # 90 // 16 training batches of 16, the 40 validation examples in one batch
    assert drawn and set(drawn) == {((5, (16,)), (1, (40,)))}
    steps = trace[1:]
    assert len(steps) == len(drawn)
    for step in steps:
        assert {"val_objective", "train_loss", "hypergrad_norm", "step_size", "applied", "tables"} <= set(step)
        assert step["applied"] and step["train_loss"] > 0 and step["step_size"] > 0
