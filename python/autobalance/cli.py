"""Command line: ``autobalance demo`` (a small training demo of ParametricCE)."""
import argparse
import sys


def demo(args):
    """Trains a linear classifier on a synthetic long-tailed Gaussian mixture
    with plain CE and with a logit-adjusted ParametricCE, and prints the
    balanced accuracy of both on a balanced test set."""
    import torch

    from autobalance import ParametricCE

    gen = torch.Generator().manual_seed(args.seed)
    classes, dim = 10, 16
    means = torch.randn(classes, dim, generator=gen) * 1.2
    counts = (500 * (1 / args.imbalance) ** (torch.arange(classes) / (classes - 1))).round().long().clamp_min(2)

    def sample(per_class):
        y = torch.repeat_interleave(torch.arange(classes), per_class)
        return means[y] + torch.randn(len(y), dim, generator=gen), y

    x_train, y_train = sample(counts)
    x_test, y_test = sample(torch.full((classes,), 300))
    print(f"training counts per class: {counts.tolist()}")
    for name, criterion in (("CE", ParametricCE.from_counts(counts, "ce")),
                            ("LA (tau=1)", ParametricCE.from_counts(counts, "la"))):
        model = torch.nn.Linear(dim, classes)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(args.epochs):
            perm = torch.randperm(len(y_train), generator=gen)
            for i in range(0, len(perm), 128):
                idx = perm[i:i + 128]
                loss = criterion(model(x_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            pred = model(x_test).argmax(1)
        per_class = torch.stack([(pred[y_test == k] == k).float().mean() for k in range(classes)])
        print(f"{name:>12}: balanced test accuracy {per_class.mean().item():.3f}, "
              f"tail-class accuracy {per_class[-3:].mean().item():.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="autobalance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="small training demo of ParametricCE on synthetic long-tailed data")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--imbalance", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
