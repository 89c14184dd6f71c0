"""How many batches a hyper-step should average: the hypergradient's agreement
with the exact one (``autobalance.testing.check_hypergrad``) as the number of
training and validation mini-batches per hyper-step grows, on the main job's data.

The problem is ``check_hypergrad``'s: L2-regularised multinomial logistic regression,
solved to optimality, here on the embedded long-tailed MNIST of the class experiment
(790 training and 198 validation examples, 7x7 average-pooled and standardised
pixels, so the exact Hessian stays small), with ``ParametricCE`` from the LA loss,
``Delta`` and ``l`` learnable and moved off their start at random, and the
class-balanced validation CE. The exact hypergradient uses every example; each
estimate averages ``n`` training batches of 64 and validation batches drawn at
random, as a hyper-step of the main job does: the whole validation split in one
batch (the main job's default), or 3 or 10 batches of 64 (the published code's
scheme taken literally). For each configuration: the cosine of the estimate with the
exact hypergradient (mean, standard deviation and minimum over ``--draws`` draws),
with conjugate gradient run to convergence (what the batches alone cost) and with the
default solver (Neumann, 5 terms, automatic step size) as in the main job.

    python bench/hyper_batches.py [--draws 20] [--json bench/results_hyper_batches.json]
"""
import argparse
import json

import torch
import torch.nn.functional as F

from autobalance import ParametricCE
from autobalance.experiments import data
from autobalance.objectives import BalancedCE
from autobalance.testing import check_hypergrad

TRAIN_COUNTS = (1, 2, 5, 10)
SOLVERS = {"cg (converged)": dict(solver="cg", cg_iterations=100, cg_tol=1e-10), "neumann (default)": {}}


def features(dataset, mean=None, std=None):
    x = F.avg_pool2d(dataset.inputs.float(), 4).flatten(1)
    mean = x.mean(0) if mean is None else mean
    std = x.std(0).clamp_min(1e-3) if std is None else std
    return (x - mean) / std, mean, std


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--l2", type=float, default=0.1)
    parser.add_argument("--json", default="bench/results_hyper_batches.json")
    args = parser.parse_args()
    splits = data.load_long_tailed("mnist", seed=0)
    x, mean, std = features(splits.train)
    xv, _, _ = features(splits.val, mean, std)
    train, val = (x, splits.train.targets), (xv, splits.val.targets)
    k = splits.train.num_classes
    torch.manual_seed(0)
    criterion = ParametricCE.from_counts(splits.train.class_counts(), "la", learn=("scale", "shift"))
    with torch.no_grad():
        criterion.scale_param.add_(0.1 * torch.randn_like(criterion.scale_param))
        criterion.shift_param.add_(0.1 * torch.randn_like(criterion.shift_param))
    rows = []
    print(f"long-tailed MNIST, {x.shape[1]} features, train {len(x)}, val {len(xv)}; batches of {args.batch}; "
          f"cosine with the exact hypergradient over {args.draws} draws")
    whole = len(xv)
    configs = [(n, 1, whole) for n in TRAIN_COUNTS] + [(10, 3, args.batch), (10, 10, args.batch)]
    print(f"{'solver':<18} {'train':>9} {'validation':>11} {'mean':>7} {'std':>7} {'min':>7}")
    for label, options in SOLVERS.items():
        for seed, (n_train, n_val, val_batch) in enumerate(configs):
            check = check_hypergrad(criterion, BalancedCE(k), train, val, l2=args.l2,
                                    batch_size=(args.batch, val_batch), batches=(n_train, n_val), draws=args.draws,
                                    seed=seed, **options)
            cos = check.draw_cosines
            row = {"solver": label, "train_batches": n_train, "train_batch": args.batch, "val_batches": n_val,
                   "val_batch": val_batch, "mean": float(cos.mean()), "std": float(cos.std()),
                   "min": float(cos.min())}
            rows.append(row)
            print(f"{label:<18} {f'{n_train} x {args.batch}':>9} {f'{n_val} x {val_batch}':>11} {row['mean']:7.3f} "
                  f"{row['std']:7.3f} {row['min']:7.3f}", flush=True)
    with open(args.json, "w") as f:
        json.dump({"config": vars(args), "results": rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
