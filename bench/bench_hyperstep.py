"""The cost of one hyper-step of ``BilevelOptimizer`` (default solver: Neumann,
J terms, automatic step size) in units of one plain training step, for the
small CNN and the CIFAR ResNet-32 of ``autobalance.experiments.models``, fused vs reference
loss backend side by side (docs/math.md section 5).

A plain training step is forward + backward + ``SGD.step`` on one batch of
random CIFAR-shaped inputs; a hyper-step uses one training and one validation
batch of the same size. Times are medians of process CPU time (one thread by
default); every repeat runs each kind of step once, backends and kinds
interleaved, so that drifting machine load affects all alike. The first
hyper-step (cold power iteration) is not timed.

A steady-state hyper-step makes a validation gradient, a training gradient with
its graph, J Hessian-vector products and one forward-mode pass (the mixed
term); every ``power_refresh_every``-th hyper-step (``--refresh``, default 10)
adds one warm-started power-iteration step, i.e. one more Hessian-vector
product. Both are timed (the latter with ``power_refresh_every=1``); the
*amortized* cost, ``steady + (refresh - steady) / power_refresh_every``, is the
mean cost per hyper-step, and ``refresh - steady`` is the cost of one
Hessian-vector product. Target: amortized at most ``1.5 (J + 2)`` plain steps
with the fused backend, and fused faster than reference.

    python bench/bench_hyperstep.py                   # table + bench/results_hyperstep.json
    python bench/bench_hyperstep.py --models small_cnn --repeats 3 --batch 64
    python bench/bench_hyperstep.py --theta fc        # theta = the last layer only
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch

from autobalance import ParametricCE
from autobalance.bilevel import BilevelOptimizer
from autobalance.experiments.models import SmallCNN, resnet32
from autobalance.objectives import BalancedCE

BACKENDS = ("fused", "reference")
MODELS = {"small_cnn": lambda k: SmallCNN(k, in_channels=3), "resnet32": lambda k: resnet32(k)}


def _cpu_seconds(fn):
    """CPU time of the process: with one thread it is the compute time, and
    other load on a shared machine inflates it far less than wall time."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def setup(name, backend, args):
    """``(train_step, hyper_step, refresh_hyper_step)`` closures for one model and loss
    backend: a steady-state hyper-step and one that refreshes the power iteration."""
    torch.manual_seed(0)
    model = MODELS[name](args.classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = ParametricCE(args.classes, backend=backend)
    theta = list(model.fc.parameters()) if args.theta == "fc" else None
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, args.classes, (args.batch,))
    xv, yv = torch.randn_like(x), torch.randint(0, args.classes, (args.batch,))

    def train_step():
        loss = criterion(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def hyper_step_of(refresh_every):
        bopt = BilevelOptimizer(opt, criterion, BalancedCE(args.classes), hyper_every=1, neumann_terms=args.terms,
                                power_refresh_every=refresh_every, inner_params=theta)
        bopt.steps = 1  # the training steps are taken by ``train_step``

        def hyper_step():
            result = bopt.hyper_step(model, [(x, y)], [(xv, yv)])
            assert result.applied, result
        hyper_step()  # cold power iteration, not timed
        return hyper_step

    train_step()
    # the steady one takes repeats + 1 hyper-steps and never reaches its next refresh
    return train_step, hyper_step_of(args.repeats + 2), hyper_step_of(1)


KINDS = ("plain", "hyper", "refresh")


def measure(name, args):
    """Median times per backend and kind, interleaved in every repeat."""
    steps = {backend: setup(name, backend, args) for backend in BACKENDS}
    times = {(backend, kind): [] for backend in BACKENDS for kind in KINDS}
    for _ in range(args.repeats):
        for backend, closures in steps.items():
            for kind, fn in zip(KINDS, closures):
                times[backend, kind].append(_cpu_seconds(fn))
    return [{"model": name, "backend": backend,
             **{f"{kind}_s": statistics.median(times[backend, kind]) for kind in KINDS}} for backend in BACKENDS]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--terms", type=int, default=5, help="Neumann terms J")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--refresh", type=int, default=10, help="power_refresh_every of the amortized cost")
    parser.add_argument("--theta", choices=("all", "fc"), default="all",
                        help="the hypergradient's weights: all of them (default) or the last layer")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (CPU times add up over threads)")
    parser.add_argument("--json", default="bench/results_hyperstep.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = 1.5 * (args.terms + 2)
    load_before = os.getloadavg()
    rows = []
    for name in args.models:
        fused, reference = measure(name, args)
        unit = fused["plain_s"]
        for row in (fused, reference):
            row["amortized_s"] = row["hyper_s"] + (row["refresh_s"] - row["hyper_s"]) / args.refresh
            for kind in ("hyper", "refresh", "amortized"):
                row[f"{kind}_in_plain_steps"] = row[f"{kind}_s"] / unit
            row["hvp_in_plain_steps"] = (row["refresh_s"] - row["hyper_s"]) / unit
            rows.append(row)
        fused["fused_speedup_over_reference"] = reference["amortized_s"] / fused["amortized_s"]
        fused["meets_target"] = fused["amortized_in_plain_steps"] <= target

    print(f"hyper-step cost, default solver (Neumann J={args.terms}, step 'auto', power refresh every "
          f"{args.refresh}), theta={args.theta}; batch {args.batch}, K={args.classes}, {torch.get_num_threads()} "
          f"threads, median of {args.repeats}; target <= {target:g} plain steps (fused, amortized)")
    load = {"before": load_before, "after": os.getloadavg()}
    print(f"times: CPU ms; ratios: in plain fused training steps; load average (1, 5, 15 min) before "
          f"{load['before']}, after {load['after']}")
    print(f"{'model':<10} {'backend':<10} {'plain':>7} {'hyper':>8} {'+refresh':>9} {'hyper/plain':>12} "
          f"{'+refresh':>9} {'amortized':>10} {'one HVP':>8}")
    for row in rows:
        print(f"{row['model']:<10} {row['backend']:<10} {1e3 * row['plain_s']:7.1f} {1e3 * row['hyper_s']:8.1f} "
              f"{1e3 * row['refresh_s']:9.1f} {row['hyper_in_plain_steps']:12.2f} "
              f"{row['refresh_in_plain_steps']:9.2f} {row['amortized_in_plain_steps']:10.2f} "
              f"{row['hvp_in_plain_steps']:8.2f}")
    for row in rows:
        if row["backend"] == "fused":
            print(f"{row['model']}: fused hyper-step {row['fused_speedup_over_reference']:.2f}x faster than "
                  f"reference; target {'met' if row['meets_target'] else 'NOT met'}")
    with open(args.json, "w") as f:
        config = {**vars(args), "target_plain_steps": target, "torch": torch.__version__,
                  "machine": platform.processor() or platform.machine(), "load_average": load}
        json.dump({"config": config, "results": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
