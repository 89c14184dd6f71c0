"""The cost of one hyper-step of ``BilevelOptimizer`` (default solver: Neumann,
J terms, automatic step size) in units of one plain training step, for the
small CNN and the CIFAR ResNet-32 of ``autobalance.models``, fused vs reference
loss backend side by side (MATH.md section 5).

A plain training step is forward + backward + ``SGD.step`` on one batch of
random CIFAR-shaped inputs; a hyper-step uses one training and one validation
batch of the same size. Times are medians of process CPU time (one thread by
default). The first hyper-step (cold power iteration) is not
timed; timed ones warm-start it (one power step), so a timed hyper-step makes
J + 2 Hessian-vector-like products (one power step, J Neumann terms, the mixed
term) plus two gradients. Target: at most ``1.5 (J + 2)`` plain steps with the
fused backend, and fused faster than reference.

    python bench/bench_hyperstep.py                   # table + bench/bench_hyperstep.json
    python bench/bench_hyperstep.py --models small_cnn --repeats 3 --batch 64
"""
import argparse
import json
import platform
import statistics
import time

import torch

from autobalance import ParametricCE
from autobalance.bilevel import BilevelOptimizer
from autobalance.models import SmallCNN, resnet32
from autobalance.objectives import BalancedCE

MODELS = {"small_cnn": lambda k: SmallCNN(k, in_channels=3), "resnet32": lambda k: resnet32(k)}


def _median_seconds(fn, repeats):
    """Median CPU time of the process: with one thread it is the compute time,
    and other load on a shared machine inflates it far less than wall time."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def measure(name, backend, args):
    torch.manual_seed(0)
    model = MODELS[name](args.classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion = ParametricCE(args.classes, backend=backend)
    bopt = BilevelOptimizer(opt, criterion, BalancedCE(args.classes), hyper_every=1, neumann_terms=args.terms)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, args.classes, (args.batch,))
    xv, yv = torch.randn_like(x), torch.randint(0, args.classes, (args.batch,))

    def train_step():
        loss = criterion(model(x), y)
        bopt.zero_grad()
        loss.backward()
        bopt.step()

    def hyper_step():
        result = bopt.hyper_step(model, [(x, y)], [(xv, yv)])
        assert result.applied, result

    train_step()
    hyper_step()  # cold power iteration, not timed
    plain = _median_seconds(train_step, args.repeats)
    hyper = _median_seconds(hyper_step, args.repeats)
    return {"model": name, "backend": backend, "plain_step_s": plain, "hyper_step_s": hyper}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--terms", type=int, default=5, help="Neumann terms J")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (CPU times add up over threads)")
    parser.add_argument("--json", default="bench/bench_hyperstep.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = 1.5 * (args.terms + 2)
    rows = []
    for name in args.models:
        fused = measure(name, "fused", args)
        reference = measure(name, "reference", args)
        unit = fused["plain_step_s"]
        for row in (fused, reference):
            row["hyper_step_in_plain_steps"] = row["hyper_step_s"] / unit
            rows.append(row)
        fused["fused_speedup_over_reference"] = reference["hyper_step_s"] / fused["hyper_step_s"]
        fused["meets_target"] = fused["hyper_step_in_plain_steps"] <= target

    print(f"hyper-step cost, default solver (Neumann J={args.terms}, step 'auto'); batch {args.batch}, "
          f"K={args.classes}, {torch.get_num_threads()} threads; target <= {target:g} plain steps (fused)")
    print(f"{'model':<10} {'backend':<10} {'plain ms':>9} {'hyper ms':>9} {'hyper/plain':>12}")
    for row in rows:
        print(f"{row['model']:<10} {row['backend']:<10} {1e3 * row['plain_step_s']:9.1f} "
              f"{1e3 * row['hyper_step_s']:9.1f} {row['hyper_step_in_plain_steps']:12.2f}")
    for row in rows:
        if row["backend"] == "fused":
            print(f"{row['model']}: fused hyper-step {row['fused_speedup_over_reference']:.2f}x faster than "
                  f"reference; target {'met' if row['meets_target'] else 'NOT met'}")
    with open(args.json, "w") as f:
        json.dump({"config": {**vars(args), "target_plain_steps": target, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()},
                   "results": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
