"""Checks the outputs of `autobalance run --quick`: the files exist and every
reported number is finite and in range."""
import json
import math
import os
import sys

from autobalance.experiments.cli import run_folder


def check(folder, experiment):
    expected = ["results.json", "table.md", "parameter_evolution.png", "search_trajectory.png"]
    expected.append("per_class_accuracy.png" if experiment == "classes" else "pareto.png")
    for name in expected:
        path = os.path.join(folder, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, f"missing or empty: {path}"
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    assert results["experiment"] == experiment
    keys = (["balanced_error", "standard_error"] if experiment == "classes"
            else ["group_balanced_error", "worst_cell_error", "deo_error", "standard_error"])
    upper = {"deo_error": 2.0}  # K = 2 classes, each a difference of two rates
    for run in results["results"]:
        for key in keys:
            value = run["metrics"][key]
            assert math.isfinite(value) and 0.0 <= value <= upper.get(key, 1.0), f"{run['method']}: {key} = {value}"
        assert run["seconds"] > 0
        assert run["metrics"]["predicted_classes"] >= 1, run["method"]
    methods = {r["method"] for r in results["results"]}
    assert any(m.startswith("AutoBalance") for m in methods), methods
    multiple = results["autobalance_time_multiple"]
    assert multiple is not None and math.isfinite(multiple) and multiple > 0
    searched = [r for r in results["results"] if r["method"].startswith("AutoBalance")]
    assert searched and all(len(r["trace"]) > 1 for r in searched), "no hyper-step was taken"
    for run in results["results"]:  # knobs picked on validation, with every candidate's score
        if len(run["selection"]) > 1:
            assert run["choice"] and run["choice"] in [c["choice"] for c in run["selection"]], run["method"]
    assert any(len(r["selection"]) > 1 for r in results["results"]), "no knob was picked on validation"
    assert results["paired"] and all(p["method"].startswith("AutoBalance") for p in results["paired"])
    if experiment == "groups":  # the retrained model is checked on the held-out validation split
        for run in searched:
            assert run["retrained_val"] is not None and math.isfinite(run["retrained_val"]["headline"]), run["method"]
    # every (method, seed) run kept for --resume, and no checkpoint or temporary file left
    assert os.path.isfile(os.path.join(folder, "run.json")), "missing run.json"
    for run in results["results"]:
        assert os.path.isfile(os.path.join(run_folder(folder, run["seed"], run["method"]), "result.json")), run["method"]
    left = [f for _, _, files in os.walk(folder) for f in files if f.endswith((".pt", ".tmp"))]
    assert not left, f"left behind: {left}"
    print(f"{folder}: {len(results['results'])} runs, outputs complete, AutoBalance time x{multiple:.2f}")


if __name__ == "__main__":
    check(sys.argv[1], sys.argv[2])
