"""The main job's scoring and tables: ``recipes.evaluate`` and ``report``."""
import torch
from torch import nn

from autobalance.experiments import recipes, report
from autobalance.experiments.data import ImageDataset


class _Fixed(nn.Module):
    """Predicts from the first pixel: the class it encodes, or always ``constant``."""

    def __init__(self, classes, constant=None):
        super().__init__()
        self.classes, self.constant = classes, constant

    def forward(self, x):
        label = x[:, 0, 0, 0].long() if self.constant is None else torch.full((x.shape[0],), self.constant)
        return nn.functional.one_hot(label, self.classes).float()


def _grouped_set():
    targets = torch.tensor([0, 0, 1, 1, 0, 1])
    groups = torch.tensor([0, 1, 0, 1, 0, 1])
    inputs = targets.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    return ImageDataset(inputs, targets, groups, num_classes=2, num_groups=2)


def test_evaluate_counts_the_predicted_classes():
    test = _grouped_set()
    right = recipes.evaluate(_Fixed(2), test)
    assert right["predicted_classes"] == 2 and right["deo_error"] == 0 and right["group_balanced_error"] == 0
    constant = recipes.evaluate(_Fixed(2, constant=1), test)
    assert constant["predicted_classes"] == 1
    assert constant["deo_error"] == 0 and constant["worst_cell_error"] == 1  # trivially fair, always wrong on y=0


def _run(method, metrics):
    return {"method": method, "seconds": 1.0, "metrics": metrics}


def test_table_marks_single_class_predictors():
    metrics = {"group_balanced_error": 0.5, "worst_cell_error": 1.0, "deo_error": 0.0, "standard_error": 0.2}
    results = [_run("CE_deo", {**metrics, "predicted_classes": 1}),
               _run("CE_deo", {**metrics, "predicted_classes": 2}),
               _run("CE", {**metrics, "predicted_classes": 2})]
    rows = report.summarise(results, "groups")
    assert [r["single_class_runs"] for r in rows] == [1, 0]
    table = report.markdown_table(rows, "groups")
    assert "| CE_deo (†1) |" in table and "| CE |" in table
    assert "trivially 0" in table
    plain = report.markdown_table(report.summarise(results[2:], "groups"), "groups")
    assert "†" not in plain


def test_parameter_evolution_plot_per_cell(tmp_path):
    tables = lambda t: {"scale": [[1.0, 1.0 + t], [1.0, 1.0 - t]], "shift": [[0.0, t], [-t, 0.0]]}  # noqa: E731
    trace = [{"epoch": t, "tables": tables(0.1 * t)} for t in range(4)]
    results = [{"method": "AutoBalance", "trace": trace}, {"method": "CE", "trace": []}]
    path = tmp_path / "evolution.png"
    report.plot_parameter_evolution(results, str(path))
    assert path.stat().st_size > 0
    report.plot_parameter_evolution([{"method": "CE", "trace": []}], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()  # nothing searched: no figure


def test_search_trajectory_plot(tmp_path, monkeypatch):
    """One row per searched method, one line per seed and panel; skipped steps (non-finite
    norms are left out) do not break it; nothing searched: no figure."""
    def steps(seed):
        return [{"epoch": 0.0, "tables": None}] + [
            {"epoch": t, "val_objective": 1.0 / (t + 1), "train_loss": 0.5, "applied": t != 2,
             "hypergrad_norm": float("nan") if t == 2 else 0.1 * (seed + 1), "step_size": 0.01} for t in range(1, 5)]
    results = [{"method": "AutoBalance", "seed": s, "trace": steps(s)} for s in range(2)]
    results.append({"method": "CE", "seed": 0, "trace": []})
    drawn = []
    original = report._pyplot

    def spy():
        plt = original()
        subplots = plt.subplots

        def counting(*args, **kwargs):
            fig, axes = subplots(*args, **kwargs)
            drawn.append(axes)
            return fig, axes
        monkeypatch.setattr(plt, "subplots", counting)
        return plt
    monkeypatch.setattr(report, "_pyplot", spy)
    path = tmp_path / "trajectory.png"
    report.plot_search_trajectory(results, str(path))
    assert path.stat().st_size > 0
    (axes,) = drawn
    assert axes.shape == (1, len(report.TRAJECTORY))
    assert all(len(ax.get_legend_handles_labels()[0]) == 2 for ax in axes[0])  # a line per seed
    report.plot_search_trajectory(results[-1:], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_paired_differences_pair_by_seed_with_a_t_interval():
    """AutoBalance minus each baseline per seed; the interval is the textbook t-interval."""
    values = {"LA": [0.12, 0.11, 0.13], "CE": [0.20, 0.30, 0.25], "AutoBalance: x": [0.10, 0.10, 0.11]}
    results = [{"method": m, "seed": s, "metrics": {"balanced_error": v}} for m, vs in values.items()
               for s, v in enumerate(vs)]
    pairs = {p["baseline"]: p for p in report.paired_differences(results, "classes")}
    assert set(pairs) == {"LA", "CE"}  # AutoBalance against the baselines only
    la = pairs["LA"]
    assert la["seeds"] == [0, 1, 2]
    torch.testing.assert_close(torch.tensor(la["differences"]), torch.tensor([-0.02, -0.01, -0.02]))
    assert abs(la["mean"] + 0.05 / 3) < 1e-12
    sd = float(torch.tensor(la["differences"], dtype=torch.float64).std())
    assert abs((la["high"] - la["low"]) / 2 - 4.302652729911275 * sd / 3 ** 0.5) < 1e-12  # t(0.975, 2) sd / sqrt(n)
    assert la["beyond_noise"] and la["high"] < 0
    table = report.paired_table(list(pairs.values()))
    assert "| AutoBalance: x | LA | 3 | -1.67 |" in table and "yes, the method better" in table


def test_table2_rows_are_paired_with_the_same_search_without_augmentation():
    """Methods with a learned augmentation (a result with ``pda``) are Table 2's rows:
    each is paired with "AutoBalance: Delta & l" (method minus it), and they are
    neither designs nor baselines of Table 1's pairs."""
    values = {"LA": [0.12, 0.11], "AutoBalance: Delta & l": [0.10, 0.12], "MADA: one shared policy": [0.11, 0.10],
              "PDA + Delta & l": [0.13, 0.12]}
    results = [{"method": m, "seed": s, "metrics": {"balanced_error": v}, "pda": {"clusters": [0]} if "PDA" in m
                or "MADA" in m else None} for m, vs in values.items() for s, v in enumerate(vs)]
    assert report.method_pairs(results) == [("AutoBalance: Delta & l", "LA"),
                                            ("MADA: one shared policy", "AutoBalance: Delta & l"),
                                            ("PDA + Delta & l", "AutoBalance: Delta & l")]
    pairs = report.paired_differences(results, "classes")
    torch.testing.assert_close(torch.tensor(pairs[1]["differences"]), torch.tensor([0.01, -0.02]))
    assert "| MADA: one shared policy | AutoBalance: Delta & l | 2 | -0.50 |" in report.paired_table(pairs)
    # without the reference row there is nothing to pair them with
    assert report.method_pairs([r for r in results if r["method"] != "AutoBalance: Delta & l"]) == []


def test_paired_differences_with_one_seed_have_no_interval():
    results = [{"method": m, "seed": 0, "metrics": {"deo_error": v}} for m, v in (("CE", 0.3), ("AutoBalance", 0.2))]
    (pair,) = report.paired_differences(results, "groups")
    assert pair["low"] is None and not pair["beyond_noise"] and abs(pair["mean"] + 0.1) < 1e-12
    assert "n/a (one seed)" in report.paired_table([pair])


def test_paired_differences_leave_out_single_class_predictors():
    runs = {("CE_deo", 0): (0.0, 1), ("CE_deo", 1): (0.1, 2), ("CE_deo", 2): (0.2, 2),
            ("AutoBalance", 0): (0.3, 2), ("AutoBalance", 1): (0.05, 2), ("AutoBalance", 2): (0.1, 2)}
    results = [{"method": m, "seed": s, "metrics": {"deo_error": v, "predicted_classes": c}}
               for (m, s), (v, c) in runs.items()]
    (pair,) = report.paired_differences(results, "groups")
    assert pair["seeds"] == [1, 2]  # seed 0: CE_deo predicts one class (DEO trivially 0)
    torch.testing.assert_close(torch.tensor(pair["differences"]), torch.tensor([-0.05, -0.1]))


def test_pda_policy_plot_per_class(tmp_path):
    """The learned policies are drawn per class (a cluster's values on each of its
    classes), and methods without one are left out."""
    from autobalance.experiments import report
    policy = {"clusters": [0, 0, 1], "ops": ["rotate", "noise"], "magnitudes": [[[0.1, 0.3], [0.5, 0.7]]],
              "probabilities": [[[0.4, 0.6], [0.2, 0.2]]]}  # [rows, C, ops]
    results = [{"method": "PDA", "seed": s, "pda": policy, "trace": []} for s in (0, 1)]
    results.append({"method": "CE", "seed": 0, "pda": None, "trace": []})
    path = tmp_path / "pda_policy.png"
    report.plot_pda_policy(results, str(path))
    assert path.stat().st_size > 0
    assert report.write_plots(str(tmp_path), "groups", results, []) == [str(path)]
    report.plot_pda_policy(results[2:], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()
