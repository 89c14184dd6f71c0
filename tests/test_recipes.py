"""The search recipe of the main job: the paper's batching scaled to the data, and the
hyper-step's diagnostics in the trace."""
import math
import warnings

import pytest
import torch
from torch import nn

from autobalance import ParametricCE
from autobalance.bilevel import BilevelOptimizer
from autobalance.experiments import data, recipes
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


@pytest.mark.filterwarnings("ignore:autobalance. this search makes only")
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


def _splits(seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 4, generator=g) * 3

    def dataset(n):
        targets = torch.arange(n) % 3
        inputs = (centres[targets] + torch.randn(n, 4, generator=g)).view(n, 1, 2, 2)
        return ImageDataset(inputs, targets, None, num_classes=3)
    train, val, test = dataset(60), dataset(30), dataset(30)
    return recipes.data.DataSplits(train, val, train, test, None, "toy")


def test_knobs_are_picked_on_validation_never_a_degenerate_candidate(monkeypatch):
    """A grid's candidates are trained on the train split and scored on the validation
    split; the best non-degenerate one (a model predicting one class is degenerate,
    however good its metric) is retrained and reported; the test split is evaluated
    once, after the choice."""
    method = recipes.Method("LA", lambda counts, tau: ParametricCE.from_counts(counts, "la", tau=tau, learn=()),
                            grid={"tau": (0.5, 1.0, 2.0)})
    splits = _splits()
    # on validation: tau 0.5 predicts one class (balanced error 0, the best number), 2.0 is the best real one
    fake = {0.5: (1, 0.0), 1.0: (3, 0.4), 2.0: (3, 0.2)}
    evaluated, trained = [], []
    original_train, original_evaluate = recipes.train, recipes.evaluate

    def spy_train(model, dataset, criterion, config, **kw):
        trained.append((dataset, float(criterion.tables().shift[0, -1])))
        return original_train(model, dataset, criterion, config, **kw)

    tau_of_shift = {round(_la_shift(splits, tau), 6): tau for tau in fake}

    def spy_evaluate(model, dataset, **kw):
        evaluated.append(dataset)
        metrics = original_evaluate(model, dataset, **kw)
        if dataset is splits.val:  # the candidate trained last is the one scored
            classes, error = fake[tau_of_shift[round(trained[-1][1], 6)]]
            metrics.update(predicted_classes=classes, balanced_error=error)
        return metrics
    monkeypatch.setattr(recipes, "train", spy_train)
    monkeypatch.setattr(recipes, "evaluate", spy_evaluate)
    result = recipes.run_method(method, splits, _Net, recipes.TrainConfig(epochs=1, batch_size=16),
                                recipes.SearchConfig())
    assert [c["choice"] for c in result.selection] == [{"tau": 0.5}, {"tau": 1.0}, {"tau": 2.0}]
    assert [c["degenerate"] for c in result.selection] == [True, False, False]
    assert result.choice == {"tau": 2.0}
    assert [d for d, _ in trained] == [splits.train] * 3 + [splits.full_train]
    assert abs(trained[-1][1] - _la_shift(splits, 2.0)) < 1e-6  # the retrain uses the chosen tau
    assert evaluated == [splits.val] * 3 + [splits.test]


def _la_shift(splits, tau):
    """LA's shift of the last class, tau log(prior), from the retrain counts."""
    counts = splits.full_train.class_counts().double()
    return float(tau * torch.log(counts[-1] / counts.sum()))


def test_group_methods_pick_lam_and_the_dro_step_unless_fixed():
    methods = recipes.group_methods()
    assert methods["AutoBalance"].grid == {"lam": recipes.LAMS} and 0.9 in recipes.LAMS  # the paper's Table 3 blend
    assert methods["Group DRO"].grid == {"step_size": recipes.DRO_STEPS}
    fixed = recipes.group_methods(lam=0.9, dro_step=0.01)
    assert fixed["AutoBalance (lam=0.9)"].choices() == [{"lam": 0.9}]
    assert fixed["Group DRO"].choices() == [{"step_size": 0.01}]
    assert recipes.class_methods()["LA"].grid == {"tau": recipes.LA_TAUS}


@pytest.mark.parametrize("options", [dict(hyper_every=20), dict(hyper_steps=50), dict(hyper_steps=7)])
def test_schedule_counts_the_hyper_steps_as_the_optimizer_takes_them(options):
    search = recipes.SearchConfig(warmup_fraction=0.4, **options)
    for total in (0, 1, 10, 312, 1000, 20000):
        warmup, every, count = search.schedule(total)
        model = _Net()
        bopt = BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ParametricCE(3), BalancedCE(3),
                                warmup_steps=warmup, hyper_every=every)
        taken = 0
        for _ in range(total):
            bopt.steps += 1
            taken += bopt.hyper_step_due
            bopt._last_hyper_step_at = bopt.steps if bopt.hyper_step_due else bopt._last_hyper_step_at
        assert count == taken, (total, count, taken)
        if "hyper_steps" in options and total - warmup >= search.hyper_steps:
            # the count follows the setting, not the data size
            assert search.hyper_steps * 0.8 <= count <= search.hyper_steps + 1, (total, count)


def test_a_search_whose_parameters_are_clustered_is_checked_per_cluster(monkeypatch):
    monkeypatch.setattr(recipes, "_warned", set())
    splits = _splits()
    val = ImageDataset(splits.val.inputs[:8], torch.tensor([0, 0, 0, 0, 0, 1, 1, 2]), None, num_classes=3)
    clustered = ParametricCE(3, torch.tensor([0, 1, 1]))
    with pytest.warns(UserWarning, match=r"1 validation cells hold fewer than 5 examples \(cluster 1: 3\)"):
        recipes.check_search(30, 600, 100, 20, val, clustered)
    monkeypatch.setattr(recipes, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recipes.check_search(30, 600, 100, 20, val, ParametricCE(3, torch.tensor([0, 0, 0])))


def test_class_designs_share_parameters_until_each_rests_on_five_validation_images():
    splits = data.load_long_tailed("mnist", seed=0)
    val_counts = splits.val.class_counts()
    for name, method in recipes.class_methods().items():
        clusters = method.clusters(val_counts)
        if not method.searched or name == "AutoBalance: tau (LA)":
            continue
        sums = torch.zeros(int(clusters.max()) + 1, dtype=torch.long).index_add_(0, clusters, val_counts)
        assert (sums >= recipes.MIN_VAL_CELL).all() and len(sums) == 7, (name, clusters)
        criterion = method.make(splits.full_train.class_counts(), clusters=clusters)
        assert torch.equal(criterion.clusters, clusters) and criterion.num_clusters == 7
    assert recipes.class_methods(cluster_min_val=None)["AutoBalance: l"].clusters(val_counts) is None


def test_a_search_with_few_hyper_steps_or_tiny_validation_cells_warns(monkeypatch):
    monkeypatch.setattr(recipes, "_warned", set())
    splits = _splits()
    tiny = ImageDataset(splits.val.inputs[:4], torch.tensor([0, 0, 1, 2]), None, num_classes=3)
    with pytest.warns(UserWarning) as record:
        recipes.check_search(3, 40, 16, 8, tiny)
    messages = [str(w.message) for w in record]
    assert any("only 3 hyper-steps (40 training steps, warm-up 16, one every 8)" in m for m in messages)
    assert any("3 validation cells hold fewer than 5 examples (class 0: 2, class 1: 1, class 2: 1)" in m
               for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recipes.check_search(25, 600, 100, 20, splits.val)  # 10 per class, enough hyper-steps: silent


@pytest.mark.filterwarnings("ignore:autobalance")
def test_sweep_command_pairs_every_setting_against_la(tmp_path):
    import json

    from autobalance.experiments import cli
    cli.main(["sweep", "--dataset", "digits", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path)])
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert [p["method"] for p in saved["paired"]] == [f"AutoBalance [{name}]" for name, _, _ in cli.SWEEP]
    assert all(p["baseline"] == "LA" and p["seeds"] == [0] for p in saved["paired"])
    assert (tmp_path / "table.md").stat().st_size > 0


@pytest.mark.filterwarnings("ignore:autobalance")
def test_cifar_recipe_end_to_end_on_a_tiny_cifar_folder(tmp_path):
    """`autobalance run --dataset cifar10 --data-root DIR` on a CIFAR-format folder the
    test writes: the paper's recipe (ResNet-32, its SGD settings and schedule, batch
    128), one epoch here, through search, retrain and the report."""
    import json
    import pickle

    import numpy as np

    from autobalance.experiments import cli
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 30)]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"labels": list(range(10)) * (n // 10),
                         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}, f)
    out = tmp_path / "out"
    cli.main(["run", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--imbalance", "5",
              "--epochs", "1", "--seeds", "1", "--hyper-every", "1", "--no-progress", "--out", str(out),
              "--methods", "CE,AutoBalance: Delta & l (LA init)"])
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved["model"] == "resnet32" and saved["dataset"] == "cifar10"
    config = saved["train_config"]
    paper = {**recipes.PAPER_CIFAR_TRAIN, "epochs": 1, "lr_decay_at": list(recipes.PAPER_CIFAR_TRAIN["lr_decay_at"])}
    assert {key: config[key] for key in paper} == paper
    searched = next(r for r in saved["results"] if r["method"].startswith("AutoBalance"))
    assert len(searched["trace"]) > 1 and all(math.isfinite(r["metrics"]["balanced_error"]) for r in saved["results"])


@pytest.mark.filterwarnings("ignore:autobalance")
def test_hyper_optimizer_choice():
    splits = _splits()
    for name, kind in (("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)):
        made = []
        original = BilevelOptimizer.__init__

        def spy(self, *args, **kwargs):
            made.append(type(kwargs["hyper_optimizer"]))
            original(self, *args, **kwargs)
        BilevelOptimizer.__init__ = spy
        try:
            recipes.train(_Net(), splits.train, ParametricCE(3), recipes.TrainConfig(epochs=1, batch_size=16),
                          search=recipes.SearchConfig(hyper_optimizer=name), objective=BalancedCE(3), val=splits.val)
        finally:
            BilevelOptimizer.__init__ = original
        assert made == [kind]
    with pytest.raises(ValueError, match="`SearchConfig.hyper_optimizer` must be one of"):
        recipes.train(_Net(), splits.train, ParametricCE(3), recipes.TrainConfig(epochs=1, batch_size=16),
                      search=recipes.SearchConfig(hyper_optimizer="rmsprop"), objective=BalancedCE(3), val=splits.val)


def test_a_retrained_model_that_lost_what_the_search_found_is_flagged(monkeypatch):
    monkeypatch.setattr(recipes, "_warned", set())
    val = {"deo_error": 0.47, "group_balanced_error": 0.46, "worst_cell_error": 0.97, "standard_error": 0.4,
           "predicted_classes": 2}
    selection = [{"score": [False, 0.11, 0.1]}, {"score": [False, 0.09, 0.1]}]
    with pytest.warns(UserWarning, match=r"AutoBalance, seed 1: the model retrained with the learned loss scores "
                                         r"0.470 on validation against the search model's 0.090"):
        out = recipes._retrained_check("AutoBalance", 1, val, selection, 1, grouped=True)
    assert out == {"headline": 0.47, "search_headline": 0.09, "degenerate": False, "group_balanced_error": 0.46,
                   "worst_cell_error": 0.97}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within RETRAIN_GAP of the search model: silent
        recipes._retrained_check("AutoBalance", 2, dict(val, deo_error=0.15), selection, 1, grouped=True)
    with pytest.warns(UserWarning, match="predicts a single class"):
        recipes._retrained_check("AutoBalance", 3, dict(val, deo_error=0.0, predicted_classes=1), [], 0, grouped=True)


@pytest.mark.filterwarnings("ignore:autobalance. this search makes only")
def test_search_learns_a_policy_per_group_with_grouped_data():
    """With groups, train() hands each batch's groups to the policy (per (group,
    cluster) strengths) in the training step and in the hyper-steps."""
    from autobalance.augment import ImagePolicy
    from autobalance.objectives import GroupBalancedCE
    g = torch.Generator().manual_seed(3)

    def dataset(n):
        targets, groups = torch.arange(n) % 3, (torch.arange(n) // 3) % 2
        return ImageDataset(torch.randn(n, 1, 2, 2, generator=g) + targets.view(n, 1, 1, 1), targets, groups,
                            num_classes=3)
    policy = ImagePolicy(3, num_groups=2, ops=("brightness", "noise"), magnitude=0.3)
    start = policy.magnitudes().detach().clone()
    config = recipes.TrainConfig(epochs=2, batch_size=16)
    recipes.train(_Net(), dataset(90), ParametricCE(3, num_groups=2), config,
                  search=recipes.SearchConfig(hyper_steps=4), objective=GroupBalancedCE(3, 2), val=dataset(42),
                  pda=policy)
    moved = (policy.magnitudes().detach() - start).abs().amax((1, 2))
    assert moved.shape == (2,) and bool((moved > 1e-4).all())  # both groups' rows learned


def test_pda_methods_learn_a_policy_and_retrain_with_it(tmp_path):
    """Table 2's rows: the search learns the image policy's magnitudes and
    probabilities (per cluster; one shared policy for MADA) with the loss, the
    retrain applies the learned policy, and a run with a checkpoint folder gives
    the same result."""
    methods = recipes.class_methods(pda=True, cluster_min_val=None)
    assert {"MADA: one shared policy", "PDA", "PDA + Delta & l"} <= set(methods)
    assert "PDA" not in recipes.class_methods()
    splits = _splits(1)
    config, search = recipes.TrainConfig(epochs=2, batch_size=16), recipes.SearchConfig(hyper_steps=4)
    results = {}
    for name in ("MADA: one shared policy", "PDA + Delta & l"):
        results[name] = recipes.run_method(methods[name], splits, _Net, config, search)
        policy = results[name].pda
        start = torch.sigmoid(torch.logit(torch.tensor(0.2)))
        magnitudes = torch.tensor(policy["magnitudes"])  # [rows, C, ops]
        assert magnitudes.shape[:2] == (1, 1 if name.startswith("MADA") else 3)
        assert float((magnitudes - start).abs().max()) > 1e-4
        assert results[name].trace[-1]["pda"] == policy
    again = recipes.run_method(methods["PDA + Delta & l"], splits, _Net, config, search,
                               checkpoint=str(tmp_path / "run"))
    first = results["PDA + Delta & l"]
    assert again.pda == first.pda and again.to_json()["metrics"] == first.to_json()["metrics"]
