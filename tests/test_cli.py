"""The `autobalance` command driven as a user would: bad arguments fail before any work
or folder, results are written atomically, and an interrupted run resumes to the same
results as one that never stopped."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from autobalance import BalancedCE, ParametricCE
from autobalance.experiments import cli, data, models, recipes

METHODS = "AutoBalance: Delta & l (LA init),LA"  # a search, then a validation grid of three candidates
SMALL = ["--quick", "--no-progress", "--epochs", "2", "--methods", METHODS]


def _fails(capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        cli.main(argv)
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    return err


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--hyper-every", "0"], "--hyper-every must be >= 1, got 0"),
    (["--imbalance", "0.5"], "--imbalance must be >= 1.0, got 0.5"),
    (["--hyper-batches", "0", "3"], "--hyper-batches must be two ints >= 1, got [0, 3]"),
    (["--methods", ""], "--methods must be 'all' or comma-separated names"),
    (["--methods", ","], "--methods must be 'all' or comma-separated names"),
    (["--methods", "CE,Nope"], "got 'CE,Nope'"),
    (["--experiment", "groups", "--pareto-lams", "abc"], "--pareto-lams must be in [0, 1], got 'abc'"),
    (["--experiment", "groups", "--pareto-lams", "0.1,2"], "--pareto-lams must be in [0, 1], got 2"),
    (["--experiment", "groups", "--lam", "5"], "--lam must be in [0, 1], got 5"),
    (["--lam", "0.5"], "--lam and --pareto-lams are for --experiment groups"),
    (["--dataset", "../../x"], "--dataset for --experiment classes must be one of mnist, digits"),
    (["--experiment", "groups", "--dataset", "cifar10"], "--dataset for --experiment groups must be one of"),
    (["--dataset", "cifar10"], "give it with --data-root DIR"),
    (["--dataset", "mnist", "--data-root", "."], "--data-root is only for cifar10/cifar100"),
    (["--hyper-lr", "0"], "--hyper-lr must be a positive number, got 0.0"),
    (["--hyper-lr", "nan"], "--hyper-lr must be a positive number, got nan"),
    (["--cluster-min-val", "-1"], "--cluster-min-val must be >= 0, got -1"),
    (["--experiment", "groups", "--cluster-min-val", "3"], "--cluster-min-val is for --experiment classes"),
    (["--hyper-steps", "0"], "--hyper-steps must be >= 1, got 0"),
    (["--device", "tpu"], "--device must be cpu or cuda[:N], got 'tpu'"),
    (["--device", "cuda:x"], "--device must be cpu or cuda[:N], got 'cuda:x'"),
])
def test_bad_arguments_fail_before_any_work_or_folder(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # the default --out would be results/... here
    calls = []
    monkeypatch.setattr(recipes, "run_method", lambda *a, **k: calls.append(a))
    _fails(capsys, ["run", "--quick"] + argv, message)
    assert calls == [] and os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_a_gpu(tmp_path, capsys):
    _fails(capsys, ["run", "--quick", "--device", "cuda", "--out", str(tmp_path / "o")],
           "--device 'cuda': this machine has no usable CUDA GPU")
    assert not (tmp_path / "o").exists()


def test_bad_data_root_and_cifar_files(tmp_path, capsys):
    _fails(capsys, ["run", "--dataset", "cifar10", "--data-root", str(tmp_path / "none"), "--out",
                    str(tmp_path / "o")], "--data-root must be an existing folder")
    _fails(capsys, ["run", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")],
           f"--dataset cifar10 --data-root {tmp_path}: ")  # the folder holds no CIFAR files
    assert not (tmp_path / "o").exists()


def test_unwritable_out(tmp_path, capsys):
    afile = tmp_path / "file"
    afile.write_text("x")
    _fails(capsys, ["run", "--quick", "--out", str(afile)], f"--out must be a folder, got the file {str(afile)!r}")
    _fails(capsys, ["run", "--quick", "--out", str(afile / "below")], "is not a writable folder")
    _fails(capsys, ["sweep", "--out", str(afile)], "--out must be a folder")
    _fails(capsys, ["sweep", "--seeds", "0"], "--seeds must be >= 1, got 0")
    _fails(capsys, ["sweep", "--dataset", "cifar10"], "--dataset must be an embedded data set")


def test_resume_needs_a_run_folder_and_no_other_options(tmp_path, capsys):
    _fails(capsys, ["run", "--resume", str(tmp_path)], "no run to continue there (no run.json)")
    (tmp_path / cli.RUN_FILE).write_text("{}")
    _fails(capsys, ["run", "--resume", str(tmp_path), "--epochs", "3"], "drop epochs")


def test_save_atomic_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    recipes.save_atomic(path, "old")

    def interrupt(_):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        recipes.save_atomic(path, "new" * 1000)
    with open(path) as f:
        assert f.read() == "old"
    monkeypatch.setattr(torch, "save", lambda obj, f: interrupt(f))
    with pytest.raises(KeyboardInterrupt):
        recipes.save_atomic(path, {"x": 1})
    with open(path) as f:
        assert f.read() == "old"


def test_batch_loader_resumes_in_the_middle_of_an_epoch():
    splits = data.load_long_tailed("digits", seed=0)
    augment = data.RandomCropFlip(padding=1)
    a = data.BatchLoader(splits.train, 32, seed=3, augment=augment, drop_last=True)
    whole = [b.inputs for _ in range(2) for b in a]
    b = data.BatchLoader(splits.train, 32, seed=3, augment=augment, drop_last=True)
    first = iter(b)
    drawn = [next(first).inputs for _ in range(5)]
    state = b.state_dict()
    c = data.BatchLoader(splits.train, 32, seed=99, augment=augment, drop_last=True)
    c.load_state_dict(state)  # a new process: the rest of the epoch, then the next ones
    drawn += [x.inputs for x in c] + [x.inputs for x in c]
    assert len(drawn) == len(whole) and all(torch.equal(x, y) for x, y in zip(drawn, whole))


@pytest.mark.filterwarnings("ignore:autobalance")
def test_train_resumes_a_search_bit_identically(tmp_path, monkeypatch):
    """Interrupted after its second epoch, a search continues from its checkpoint to the
    same weights, tables and trace as one that never stopped."""
    splits = data.load_long_tailed("digits", seed=0)
    config = recipes.TrainConfig(epochs=3)
    search = recipes.SearchConfig(hyper_every=2)

    def search_run(checkpoint=None):
        torch.manual_seed(0)
        model = models.build_model("small_cnn", 10, 1)
        criterion = ParametricCE.from_counts(splits.train.class_counts(), "la", learn=("scale", "shift"))
        trace = recipes.train(model, splits.train, criterion, config, seed=0, search=search,
                              objective=BalancedCE(10), val=splits.val, checkpoint=checkpoint)
        return model, criterion, trace

    model, criterion, trace = search_run()
    path = str(tmp_path / "train.pt")
    saves, save = [], recipes.save_atomic

    def save_then_stop(where, obj):
        save(where, obj)
        saves.append(obj["epoch"])
        if len(saves) == 2:  # in the middle of the search (warm-up: the first 40% of the steps)
            raise KeyboardInterrupt
    monkeypatch.setattr(recipes, "save_atomic", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        search_run(path)
    monkeypatch.setattr(recipes, "save_atomic", save)
    resumed, criterion2, trace2 = search_run(path)
    assert saves == [1, 2] and trace2 == trace and len(trace) > 3
    for a, b in zip(list(model.state_dict().values()) + list(criterion.state_dict().values()),
                    list(resumed.state_dict().values()) + list(criterion2.state_dict().values())):
        assert torch.equal(a, b)


def _table_without_times(out):
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    drop = ("seconds", "search_seconds")
    return ([{k: v for k, v in r.items() if k not in drop} for r in saved["results"]],
            [{k: v for k, v in row.items() if "second" not in k} for row in saved["summary"]], saved["paired"])


def _command(*args):
    return [sys.executable, "-m", "autobalance.experiments.cli", "run", *args]


@pytest.mark.filterwarnings("ignore:autobalance")
def test_ctrl_c_then_resume_gives_the_same_results(tmp_path):
    """A user's Ctrl-C while LA's second candidate trains: a clean message, exit status
    130, the finished runs, the finished candidate and the last epoch's checkpoint kept;
    `--resume OUT` then ends with the results of a run that never stopped."""
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    subprocess.run(_command(*SMALL, "--out", whole), check=True, capture_output=True, timeout=600)
    # SIGINT as a terminal delivers it: a background job's shell may have it ignored, which the child inherits
    proc = subprocess.Popen(_command(*SMALL, "--out", cut), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoint = os.path.join(cut, "runs", "seed0", "LA", "train-1.pt")
    deadline = time.time() + 300
    while not os.path.exists(checkpoint) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.INTERRUPTED, err
    assert "Traceback" not in err and f"continue with: autobalance run --resume {cut}" in err
    assert os.path.exists(os.path.join(cut, "runs", "seed0", "AutoBalance__Delta___l__LA_init", "result.json"))
    assert os.path.exists(os.path.join(cut, "runs", "seed0", "LA", "candidate-0.pt"))
    assert not os.path.exists(os.path.join(cut, "results.json"))
    done = subprocess.run(_command("--resume", cut, "--no-progress"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "continuing the run in" in done.stdout
    assert _table_without_times(cut) == _table_without_times(whole)
    leftovers = [f for _, _, files in os.walk(cut) for f in files if f.endswith((".pt", ".tmp"))]
    assert leftovers == []
    # resuming a finished run recomputes nothing and prints the same table
    again = subprocess.run(_command("--resume", cut, "--no-progress"), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and _table_without_times(cut) == _table_without_times(whole)
    # a fresh run into the folder replaces the earlier one
    fresh = subprocess.run(_command(*SMALL[:-2], "--methods", "CE", "--out", cut), capture_output=True, text=True,
                           timeout=600)
    assert fresh.returncode == 0 and f"replacing the earlier run in {cut}" in fresh.stdout
    assert os.listdir(os.path.join(cut, "runs", "seed0")) == ["CE"]
