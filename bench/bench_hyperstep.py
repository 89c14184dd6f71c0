"""One hyper-step of ``BilevelOptimizer`` side by side with the paper's published
hypergradient code path (``paper_baseline.py``, a re-implementation used as the
baseline): wall time, peak memory and the hypergradients' agreement, for the small
CNN and the CIFAR ResNet-32 of ``autobalance.experiments.models``, with ``n``
training and ``n`` validation batches per hyper-step (the published code: ``n =
10`` batches of 128).

Variants, on the same batches, weights and solver settings (Neumann, ``J`` terms,
one fixed step ``eta``; no weight decay in the inner problem, as the baseline has
none):

- ``package``: the package's hyper-step with every training graph kept
  (``graph_memory=inf``; what the default ``"auto"`` does unless memory is short);
- ``package lean``: ``graph_memory=0``, one training graph alive at a time (only
  with ``n > 1``);
- ``baseline train``: the published path with the model in train mode, the mode
  the published code leaves it in (BatchNorm with batch statistics);
- ``baseline eval``: the same path in eval mode, the package's math;
- with ``--augment`` (PDA, docs/math.md section 9), ``package + spherical`` and
  ``package + image policy``: the package's hyper-step with a learned
  ``SphericalAugment`` / ``ImagePolicy`` (every op) as ``augment=``, whose
  strengths are hyperparameters too; their cost is printed against ``package``
  (no baseline computes them, so they have no agreement column).

Every repeat runs each variant once, in rotating order, so drifting load hits all
alike; times are medians of wall time. Before each call the model's state is
restored (train-mode BatchNorm updates its running statistics). Peak memory is the
largest rise of the process's resident memory during a call (Linux ``VmHWM`` after
resetting it, with large allocations returned to the system at free), or of
``torch.cuda.max_memory_allocated`` on a GPU; it includes the baseline's and the
package's transient tensors alike. Agreement is the relative difference of the
hypergradients (with the package's shift gauge applied to the baseline's), which
should be rounding against ``baseline eval`` (the same math); against ``baseline
train`` it differs by the BatchNorm mode.

``eta``: ``--step-size auto`` (default) uses ``1 / lambda_max`` of the first
model's Hessian, estimated by the package's power iteration, for both; the
published ``eta = 1`` (``--step-size 1``) makes the Neumann series diverge on these
networks (hypergradient norms of 1e12 and more), which leaves the times as they are
but the agreement meaningless. Targets printed with the results: ``package`` at
least 1.5x faster than ``baseline train`` at every model and ``n``; at ``n = 10``
``package lean`` at most half the baseline's peak memory and ``package`` no slower
than the baseline.

    python bench/bench_hyperstep.py                  # about an hour on 1 CPU thread at batch 128
    python bench/bench_hyperstep.py --quick          # small batches, one repeat
    python bench/bench_hyperstep.py --device cuda --threads 0
    python bench/bench_hyperstep.py --models small_cnn --n 1 --augment --no-memory   # PDA's cost
"""
import argparse
import ctypes
import gc
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_baseline  # noqa: E402

from autobalance import ParametricCE  # noqa: E402
from autobalance.augment import ImagePolicy, SphericalAugment  # noqa: E402
from autobalance.bilevel import BilevelOptimizer  # noqa: E402
from autobalance.bilevel.optimizer import fix_shift_gauge  # noqa: E402
from autobalance.bilevel.products import flat, split  # noqa: E402
from autobalance.bilevel.solvers import Neumann  # noqa: E402
from autobalance.experiments.models import SmallCNN, resnet32  # noqa: E402
from autobalance.objectives import BalancedCE  # noqa: E402

MODELS = {"small_cnn": lambda k: SmallCNN(k, in_channels=3), "resnet32": lambda k: resnet32(k)}
AUGMENTED = ("package + spherical", "package + image policy")  # --augment: the hyper-step with PDA


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def peak_memory(fn, device):
    """The rise of memory in use during ``fn()`` (bytes, None where it cannot be told):
    CUDA's allocator peak, or on the CPU the resident set's high-water mark after
    resetting it (Linux), with large allocations returned to the system at free (set
    by ``main`` before the memory pass) and freed heap memory trimmed before the call."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
    except OSError:
        return None
    fn()
    return _status("VmHWM") - base


def return_large_allocations():
    """Large allocations from ``mmap``, returned to the system at free (glibc), so the
    resident set tracks the live tensors; only for the memory pass (it slows allocation)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 17)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def wall_time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def gauge(criterion, flat_grad):
    """The package's shift gauge (``fix_shift_gauge``) on a flat hypergradient."""
    names, params = zip(*criterion.named_parameters())
    return flat(fix_shift_gauge(criterion, list(names), split(flat_grad, params)))


def setup(name, n, args, device):
    """The variants' closures (each returns the flat hypergradient) for one model and ``n``."""
    torch.manual_seed(0)
    k = args.classes
    model = MODELS[name](k).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = ParametricCE(k).to(device)
    with torch.no_grad():  # away from the identity, so every hyperparameter has a gradient
        criterion.scale_param.normal_(0, 0.1)
        criterion.shift_param.normal_(0, 0.1)
    objective = BalancedCE(k)

    def batch():
        return torch.randn(args.batch, 3, 32, 32, device=device), torch.randint(0, k, (args.batch,), device=device)
    train, val = [batch() for _ in range(n)], [batch() for _ in range(n)]
    for x, y in train[:2]:  # a few training steps: sensible running statistics
        loss = criterion(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad()
    eta = args.eta
    if eta == "auto":  # 1 / lambda_max by the package's power iteration, on a copy of the loss
        probe = BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), copy.deepcopy(criterion), objective,
                                 power_iterations=10)
        probe.steps = 1
        probe.hyper_step(model, train[:1], val[:1])
        eta = 1.0 / probe.solver_state.eigenvalue
    theta, alpha = list(model.parameters()), list(criterion.parameters())
    saved = {key: value.clone() for key, value in model.state_dict().items()}

    def package(graph_memory, augment=None):
        bopt = BilevelOptimizer(opt, criterion, objective, solver=Neumann(terms=args.terms, step_size=eta),
                                graph_memory=graph_memory, augment=augment)
        bopt.steps = 1
        return lambda: torch.cat([g.reshape(-1) for g in bopt.hypergradient(model, train, val)])

    def baseline(mode):
        def run():
            model.load_state_dict(saved)
            try:
                return gauge(criterion, paper_baseline.hypergradient(model, criterion, objective, train, val, theta,
                                                                     alpha, eta=eta, terms=args.terms,
                                                                     mode=mode))
            finally:
                model.load_state_dict(saved)
                model.train()
        return run

    variants = {"package": package(float("inf"))}
    if n > 1:
        variants["package lean"] = package(0)
    variants.update({"baseline train": baseline("train"), "baseline eval": baseline("eval")})
    if args.augment:
        variants[AUGMENTED[0]] = package(float("inf"), SphericalAugment(k, radius=0.5).to(device))
        variants[AUGMENTED[1]] = package(float("inf"), ImagePolicy(k).to(device))
    return variants, eta



def run(name, n, args, device):
    """The timing pass: the variants' rows without their peak memory."""
    variants, eta = setup(name, n, args, device)
    grads = {label: fn() for label, fn in variants.items()}  # warm-up, and the hypergradients
    times = {label: [] for label in variants}
    labels = list(variants)
    for r in range(args.repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label].append(wall_time(variants[label], device))
    reference = grads["baseline eval"]
    rows = []
    for label in labels:
        difference = train_difference = None  # the augmented variants have more hyperparameters: no baseline
        if label not in AUGMENTED:
            difference = float((grads[label] - reference).norm() / reference.norm())
            train_difference = float((grads[label] - grads["baseline train"]).norm() / grads["baseline train"].norm())
        rows.append({"model": name, "n": n, "variant": label, "eta": eta, "wall_s": statistics.median(times[label]),
                     "peak_bytes": None,
                     "rel_diff_vs_baseline_eval": difference, "rel_diff_vs_baseline_train": train_difference,
                     "hypergrad_norm": float(grads[label].norm())})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--n", nargs="+", type=int, default=[1, 10], help="training and validation batches")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--terms", type=int, default=5, help="Neumann terms J")
    parser.add_argument("--step-size", default="auto", help="Neumann eta: 'auto' (1 / lambda_max) or a number")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (0: PyTorch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="batch 16, one repeat")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass (times only)")
    parser.add_argument("--augment", action="store_true", help="also the hyper-step with PDA (learned augmentations)")
    parser.add_argument("--json", default="bench/results_hyperstep.json")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.eta = "auto" if args.step_size == "auto" else float(args.step_size)
    load_before = os.getloadavg()
    rows = []
    for name in args.models:
        for n in args.n:
            rows += run(name, n, args, device)
            print(f"  timed {name} n={n}", flush=True)
    if device.type == "cpu" and not args.no_memory:
        return_large_allocations()
    for name in args.models if not args.no_memory else ():  # the memory pass: one call of each variant
        for n in args.n:
            variants, _ = setup(name, n, args, device)
            for row in rows:
                if row["model"] == name and row["n"] == n:
                    row["peak_bytes"] = peak_memory(variants[row["variant"]], device)
            print(f"  measured memory {name} n={n}", flush=True)
    load = {"before": load_before, "after": os.getloadavg()}

    etas = ", ".join(f"{name} {next(r['eta'] for r in rows if r['model'] == name):.3g}" for name in args.models)
    print(f"\nhyper-step vs the published code path (paper_baseline.py): Neumann J={args.terms}, eta: {etas}, "
          f"batch {args.batch}, K={args.classes}, {torch.get_num_threads()} threads on {device}, median of "
          f"{args.repeats}; load average before {load['before']}, after {load['after']}")
    print(f"{'model':<10} {'n':>3} {'variant':<22} {'wall s':>8} {'peak MiB':>9} {'train/this':>11} "
          f"{'eval/this':>10} {'mem/train':>10} {'rel diff (eval)':>16}")
    verdicts = []
    for name in args.models:
        for n in args.n:
            group = {r["variant"]: r for r in rows if r["model"] == name and r["n"] == n}
            train, evaluation = group["baseline train"], group["baseline eval"]
            for label, row in group.items():
                row["speedup_vs_baseline_train"] = train["wall_s"] / row["wall_s"]
                row["speedup_vs_baseline_eval"] = evaluation["wall_s"] / row["wall_s"]
                mem = (row["peak_bytes"] / train["peak_bytes"]) if row["peak_bytes"] and train["peak_bytes"] else None
                row["memory_vs_baseline_train"] = mem
                peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2 ** 20:.0f}"
                difference = row["rel_diff_vs_baseline_eval"]
                print(f"{name:<10} {n:>3} {label:<22} {row['wall_s']:8.2f} {peak:>9} "
                      f"{row['speedup_vs_baseline_train']:11.2f} {row['speedup_vs_baseline_eval']:10.2f} "
                      f"{'-' if mem is None else f'{mem:.2f}':>10} "
                      f"{'-' if difference is None else f'{difference:.1e}':>16}")
            package = group["package"]
            for label in AUGMENTED:
                if label in group:
                    ratio = group[label]["wall_s"] / package["wall_s"]
                    group[label]["cost_vs_package"] = ratio
                    print(f"{name} n={n}: {label} costs {ratio:.2f}x the hyper-step without augmentation")
            verdicts.append((f"{name} n={n}: package {package['speedup_vs_baseline_train']:.2f}x faster than "
                             "baseline train (target >= 1.5)", package["speedup_vs_baseline_train"] >= 1.5))
            if n >= 10 and "package lean" in group:
                lean = group["package lean"]["memory_vs_baseline_train"]
                if lean is not None:
                    verdicts.append((f"{name} n={n}: package lean peak memory {lean:.2f}x baseline train's "
                                     "(target <= 0.5)", lean <= 0.5))
                verdicts.append((f"{name} n={n}: package (graphs kept) {package['speedup_vs_baseline_train']:.2f}x "
                                 "baseline train's speed (target >= 1)", package["speedup_vs_baseline_train"] >= 1))
    for text, met in verdicts:
        print(f"{text}: {'met' if met else 'NOT met'}")
    with open(args.json, "w") as f:
        config = {**vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "machine": platform.processor() or platform.machine(), "load_average": load}
        json.dump({"config": config, "results": rows, "targets": verdicts}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
