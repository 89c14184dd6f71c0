"""Command line.

``autobalance run``: Algorithm 1 end to end against the paper's baselines on
real long-tailed (``--experiment classes``, Table 1, Figure 3) or
group-imbalanced (``--experiment groups``, Table 3, Figure 5) data; prints the
table and writes JSON, Markdown and plots to ``--out``.
``autobalance demo``: a small training demo of ParametricCE.
"""
import argparse
import json
import os
import sys
import time


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


QUICK = {"classes": dict(dataset="digits", seeds=1, epochs=4, hyper_every=2),
         "groups": dict(dataset="digits", seeds=1, epochs=4, pareto_lams="0.1,0.9", hyper_every=2)}
DEFAULTS = {"classes": dict(dataset="mnist", seeds=3, epochs=24, pareto_lams=""),
            "groups": dict(dataset="mnist", seeds=3, epochs=12, pareto_lams="0.1,0.5,0.9")}


def _load(args):
    from autobalance.experiments import data
    if args.experiment == "classes":
        return data.load_long_tailed(args.dataset, data_root=args.data_root, imbalance=args.imbalance,
                                     seed=args.seed)
    if args.dataset not in data.EMBEDDED:
        raise SystemExit(f"autobalance: --experiment groups needs an embedded --dataset {data.EMBEDDED}, "
                         f"got {args.dataset!r}")
    return data.load_waterbirds_like(args.dataset, seed=args.seed)


def _prepare_torch(threads):
    """The thread count, and the first optimizer's import of torch._dynamo (seconds) done
    now, so that no method's time includes it."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])


def run(args):
    from autobalance.experiments import models, recipes, report

    preset = dict(DEFAULTS[args.experiment], **(QUICK[args.experiment] if args.quick else {}))
    cifar = (args.dataset or preset["dataset"]).startswith("cifar")
    if cifar and not args.quick:
        preset["epochs"] = recipes.PAPER_CIFAR_TRAIN["epochs"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    _prepare_torch(args.threads)
    methods = (recipes.class_methods(clusters=recipes.PAPER_CIFAR_CLUSTER_SIZE.get(args.dataset))
               if args.experiment == "classes" else recipes.group_methods(lam=args.lam))
    if args.methods != "all":
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in methods]
        if unknown:
            raise SystemExit(f"autobalance: unknown --methods {unknown}; choose from {list(methods)}")
        methods = {m: methods[m] for m in chosen}
    out = args.out or os.path.join("results", f"{args.experiment}-{args.dataset}")
    os.makedirs(out, exist_ok=True)
    config = recipes.TrainConfig(**dict(recipes.PAPER_CIFAR_TRAIN if cifar else {}, epochs=args.epochs,
                                        device=args.device))
    search = recipes.SearchConfig(last_layer_only=args.theta == "last")
    if args.hyper_batches is not None:
        if min(args.hyper_batches) < 1:
            raise SystemExit(f"autobalance: --hyper-batches must be two ints >= 1, got {args.hyper_batches}")
        search.train_batches, search.val_batches = args.hyper_batches
    if args.hyper_every is not None:
        search.hyper_every = args.hyper_every
    results, start = [], time.perf_counter()
    progress = not args.no_progress
    for seed in range(args.seeds):
        args.seed = seed
        splits = _load(args)
        if args.device != "cpu":
            splits = splits._replace(**{k: getattr(splits, k).to(args.device)
                                        for k in ("train", "val", "full_train", "test")})
        model_name = args.model or ("resnet32" if args.dataset.startswith("cifar") else "small_cnn")
        factory = lambda: models.build_model(model_name, splits.full_train.num_classes,  # noqa: E731
                                             splits.full_train.in_channels)
        if seed == 0:
            print(f"{splits.name}: train {len(splits.train)}, val {len(splits.val)}, full train "
                  f"{len(splits.full_train)}, test {len(splits.test)}; model {model_name}; "
                  f"{len(methods)} methods x {args.seeds} seeds x {args.epochs} epochs", flush=True)
            n_train, n_val, val_batch = search.hyper_batches(len(splits.train), len(splits.val), config.batch_size)
            print(f"hyper-step every {search.hyper_every} steps: {n_train} training batches of "
                  f"{config.batch_size}, {n_val} validation batch{'es' if n_val > 1 else ''} of {val_batch}", flush=True)
        for method in methods.values():
            result = recipes.run_method(method, splits, factory, config, search, seed=seed, progress=progress)
            results.append(result.to_json())
            key = "balanced_error" if args.experiment == "classes" else "deo_error"
            chosen = "".join(f", {name}={value:g}" for name, value in result.choice.items())
            print(f"  seed {seed} {method.name:<34} {key} {100 * result.metrics[key]:6.2f}%  "
                  f"({result.seconds:.1f} s{chosen})", flush=True)
    points = []
    lams = [float(x) for x in args.pareto_lams.split(",") if x.strip()] if args.experiment == "groups" else []
    if lams:
        print(f"Pareto sweep (seed 0): lam in {lams}", flush=True)
        args.seed = 0
        splits = _load(args)
        points = recipes.lam_sweep(splits, factory, config, search, lams, progress=progress)
    rows = report.summarise(results, args.experiment)
    table = report.markdown_table(rows, args.experiment)
    pairs = report.paired_differences(results, args.experiment)
    paired = report.paired_table(pairs)
    baseline = [r["seconds"] for r in results if r["method"] == "CE"]
    searched = [r for r in results if r["method"].startswith("AutoBalance")]
    multiple = single = None
    if baseline and searched:  # with a lam grid, single: one search (the mean of the candidates') + the retrain
        unit = sum(baseline) / len(baseline)
        multiple = sum(r["seconds"] for r in searched) / len(searched) / unit
        single = sum(r["seconds"] - r["search_seconds"] * (1 - 1 / max(len(r["selection"]), 1))
                     for r in searched) / len(searched) / unit
    plots = report.write_plots(out, args.experiment, results, rows, points)
    summary = {"experiment": args.experiment, "dataset": args.dataset, "model": model_name, "seeds": args.seeds,
               "epochs": args.epochs,
               "imbalance": args.imbalance, "train_config": vars(config), "search_config": vars(search),
               "autobalance_time_multiple": multiple, "autobalance_time_multiple_one_candidate": single,
               "wall_seconds": time.perf_counter() - start,
               "summary": rows, "paired": pairs, "results": results, "pareto": points}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    title = "Table 1 (class imbalance)" if args.experiment == "classes" else "Table 3 (group imbalance)"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"# {title}: {splits.name}, {args.seeds} seed{'s' if args.seeds > 1 else ''}, {args.epochs} epochs\n\n"
                f"Errors in % on the balanced test set, mean ± std over seeds.\n\n{table}\n\n{paired}\n")
    print(f"\n{title}: {splits.name}, errors in % (mean ± std over {args.seeds} seed{'s' if args.seeds > 1 else ''})\n{table}\n\n{paired}")
    if multiple is not None:
        print(f"\nAutoBalance wall time (search + retrain) = {multiple:.2f} x one standard training run (CE)"
              + (f"; {single:.2f} x for one search + retrain (the rest picks lam on validation)"
                 if abs(single - multiple) > 1e-9 else ""))
    print(f"results: {out}/results.json, {out}/table.md" + "".join(f", {p}" for p in plots))
    print(f"total {time.perf_counter() - start:.0f} s")


SWEEP = (("default", {}, {}), ("hyper_lr x0.3", {"hyper_lr": 0.3}, {}), ("hyper_lr x3", {"hyper_lr": 3.0}, {}),
         ("warm-up 0.2", {"warmup_fraction": 0.2}, {}), ("warm-up 0.6", {"warmup_fraction": 0.6}, {}),
         ("hyper_every 10", {"hyper_every": 10}, {}), ("hyper_every 40", {"hyper_every": 40}, {}),
         ("clusters of 2 classes", {}, {"clusters": 2}),
         ("Adam 0.1, every 10", {"hyper_optimizer": "adam", "hyper_lr": 2.0, "hyper_every": 10}, {}))


def sweep(args):
    """The search's sensitivity on the class experiment: "AutoBalance: Delta & l (LA
    init)" with one search setting changed at a time (``SWEEP``; ``hyper_lr`` as a
    multiple of the default), each paired by seed against LA."""
    from autobalance import BalancedCE, ParametricCE
    from autobalance.experiments import models, recipes, report

    args.experiment, args.imbalance, args.data_root = "classes", None, None
    _prepare_torch(args.threads)
    config = recipes.TrainConfig(epochs=args.epochs)
    base = recipes.class_methods()
    results = []
    for seed in range(args.seeds):
        args.seed = seed
        splits = _load(args)
        factory = lambda: models.build_model("small_cnn", splits.full_train.num_classes,  # noqa: E731
                                             splits.full_train.in_channels)
        result = recipes.run_method(base["LA"], splits, factory, config, recipes.SearchConfig(), seed=seed)
        results.append(result.to_json())
        for name, search_options, loss_options in SWEEP:
            search = recipes.SearchConfig()
            for key, value in search_options.items():
                setattr(search, key, value * search.hyper_lr if key == "hyper_lr" else value)
            method = recipes.Method(
                f"AutoBalance [{name}]",
                lambda counts, **_: ParametricCE.from_counts(counts, "la", learn=("scale", "shift"), **loss_options),
                lambda k, g, **_: BalancedCE(k))
            result = recipes.run_method(method, splits, factory, config, search, seed=seed)
            results.append(result.to_json())
            print(f"  seed {seed} {name:<24} balanced_error {100 * result.metrics['balanced_error']:6.2f}%  "
                  f"({result.seconds:.1f} s, {len(result.trace) - 1} hyper-steps)", flush=True)
    pairs = report.paired_differences(results, "classes")
    table = report.paired_table(pairs)
    out = args.out or os.path.join("results", f"sweep-{args.dataset}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"dataset": args.dataset, "seeds": args.seeds, "epochs": args.epochs, "paired": pairs,
                   "results": results}, f, indent=1)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"# Search sensitivity: {args.dataset}, {args.seeds} seeds, {args.epochs} epochs\n\n{table}\n")
    print(f"\n{table}\nresults: {out}/results.json, {out}/table.md")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="autobalance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="Algorithm 1 against the paper's baselines, with tables and plots")
    p.add_argument("--experiment", choices=("classes", "groups"), default="classes")
    p.add_argument("--dataset", default=None, help="mnist (default), digits, animal_mnist, cifar10, cifar100")
    p.add_argument("--data-root", default=None, help="folder with the CIFAR python-pickle files")
    p.add_argument("--imbalance", type=float, default=None, help="imbalance factor rho (default 100)")
    p.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, choices=(None, "small_cnn", "resnet32"))
    p.add_argument("--lam", type=float, default=None, help="groups: fixes lam of AutoBalance's validation loss "
                   "(1 - lam) CE + lam CE_deo (default: picked per seed on validation from 0.1, 0.5, 0.9)")
    p.add_argument("--pareto-lams", default=None, help="groups: comma-separated lam values of the Pareto sweep")
    p.add_argument("--theta", choices=("last", "all"), default="last",
                   help="weights of the implicit-differentiation hypergradient: the last layer (default) or all")
    p.add_argument("--hyper-every", type=int, default=None, help="training steps between hyper-steps (default: SearchConfig's, the paper's 20; 2 with --quick)")
    p.add_argument("--hyper-batches", type=int, nargs=2, default=None, metavar=("N_TRAIN", "N_VAL"),
                   help="training and validation batches per hyper-step (default: the paper's 10 and 10, each "
                        "capped at the batches its split holds; recipes.SearchConfig)")
    p.add_argument("--out", default=None, help="results folder (default results/EXPERIMENT-DATASET)")
    p.add_argument("--quick", action="store_true", help="a small preset for smoke tests (under 2 minutes)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, seed=0)
    p = sub.add_parser("sweep", help="the search's sensitivity (hyper-lr, warm-up, interval, clusters) against LA")
    p.add_argument("--dataset", default="mnist", help="an embedded data set: mnist (default), digits")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--out", default=None, help="results folder (default results/sweep-DATASET)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=sweep)
    p = sub.add_parser("demo", help="small training demo of ParametricCE on synthetic long-tailed data")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--imbalance", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
