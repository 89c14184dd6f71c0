"""Command line.

``autobalance run``: Algorithm 1 end to end against the paper's baselines on
real long-tailed (``--experiment classes``, Table 1, Figure 3) or
group-imbalanced (``--experiment groups``, Table 3, Figure 5) data; prints the
table and writes JSON, Markdown and plots to ``--out``.
``autobalance demo``: a small training demo of ParametricCE.
"""
import argparse
import json
import math
import os
import sys
import tempfile
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


QUICK = {"classes": dict(dataset="digits", seeds=1, epochs=4, hyper_steps=10),
         "groups": dict(dataset="digits", seeds=1, epochs=4, pareto_lams="0.1,0.9", hyper_steps=10)}
DEFAULTS = {"classes": dict(dataset="mnist", seeds=3, epochs=24, pareto_lams=""),
            "groups": dict(dataset="mnist", seeds=3, epochs=12, pareto_lams="0.1,0.5,0.9")}
RUN_FILE = "run.json"  # the resolved arguments of the run in an --out folder (read by --resume)
NOT_SAVED = ("command", "func", "parser", "resume", "no_progress")  # attributes of args that are not the run's
INTERRUPTED = 130  # exit status after Ctrl-C, as a shell gives


class UsageError(Exception):
    """A bad argument: the message names it, what it got and what was expected."""


def _load(args):
    from autobalance.experiments import data
    if args.experiment == "classes":
        return data.load_long_tailed(args.dataset, data_root=args.data_root, imbalance=args.imbalance,
                                     seed=args.seed)
    return data.load_waterbirds_like(args.dataset, seed=args.seed)


def _prepare_torch(threads):
    """The thread count, and the first optimizer's import of torch._dynamo (seconds) done
    now, so that no method's time includes it."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])


def _at_least(args, name, low):
    value = getattr(args, name)
    if value is not None and not value >= low:
        raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _fraction(text, name):
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name} must be in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} must be in [0, 1], got {value:g}")
    return value


def _check_out(out):
    """``out`` can be made and written: it is a folder or can be created in the nearest
    existing folder above it (nothing is created here)."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out must be a folder, got the file {out!r}")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:  # a file made and removed at once: the one sure test (os.access says yes to root everywhere)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as error:
        raise UsageError(f"--out {out!r} cannot be written: {parent!r} is not a writable folder "
                         f"({error.strerror})") from None


def _check_device(device):
    import torch
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device must be cpu or cuda[:N], got {device!r}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {device!r}: this machine has no usable CUDA GPU (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device!r}: this machine has {count} CUDA GPU(s)")
    elif parsed.type != "cpu":
        raise UsageError(f"--device must be cpu or cuda[:N], got {device!r}")


def resolve_run(args):
    """Fills the presets into ``args`` and checks every argument before any work or any
    folder is made; returns the methods to run and seed 0's data (loaded to check the
    data arguments). Raises ``UsageError``."""
    from autobalance.experiments import data, recipes

    preset = dict(DEFAULTS[args.experiment], **(QUICK[args.experiment] if args.quick else {}))
    cifar = str(args.dataset or preset["dataset"]).startswith("cifar")
    if cifar and not args.quick:
        preset["epochs"] = recipes.PAPER_CIFAR_TRAIN["epochs"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    known = data.LONG_TAILED if args.experiment == "classes" else data.EMBEDDED
    if args.dataset not in known:
        raise UsageError(f"--dataset for --experiment {args.experiment} must be one of {', '.join(known)}, "
                         f"got {args.dataset!r}")
    if cifar and args.data_root is None:
        raise UsageError(f"--dataset {args.dataset} reads the CIFAR python-pickle files from a local folder: "
                         "give it with --data-root DIR (nothing is downloaded)")
    if not cifar and args.data_root is not None:
        raise UsageError(f"--data-root is only for cifar10/cifar100, got it with --dataset {args.dataset}")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        raise UsageError(f"--data-root must be an existing folder, got {args.data_root!r}")
    for name, low in (("seeds", 1), ("epochs", 1), ("threads", 1), ("hyper_every", 1), ("hyper_steps", 1),
                      ("imbalance", 1.0)):
        _at_least(args, name, low)
    if args.hyper_batches is not None and min(args.hyper_batches) < 1:
        raise UsageError(f"--hyper-batches must be two ints >= 1, got {args.hyper_batches}")
    if args.experiment == "classes" and (args.lam is not None or args.pareto_lams):
        raise UsageError("--lam and --pareto-lams are for --experiment groups")
    if args.lam is not None:
        _fraction(str(args.lam), "--lam")
    args.pareto_lams = ",".join(f"{_fraction(x.strip(), '--pareto-lams'):g}"
                                for x in args.pareto_lams.split(",") if x.strip())
    _check_device(args.device)
    if args.hyper_lr is not None and not (math.isfinite(args.hyper_lr) and args.hyper_lr > 0):
        raise UsageError(f"--hyper-lr must be a positive number, got {args.hyper_lr}")
    _at_least(args, "cluster_min_val", 0)
    if args.experiment == "groups" and args.cluster_min_val is not None:
        raise UsageError("--cluster-min-val is for --experiment classes")
    min_val = recipes.MIN_VAL_CELL if args.cluster_min_val is None else (args.cluster_min_val or None)
    if args.pda and args.experiment != "classes":
        raise UsageError("--pda is for --experiment classes")
    methods = (recipes.class_methods(clusters=recipes.PAPER_CIFAR_CLUSTER_SIZE.get(args.dataset),
                                     cluster_min_val=min_val, pda=args.pda)
               if args.experiment == "classes" else recipes.group_methods(lam=args.lam))
    if args.methods != "all":
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in methods]
        if not chosen or unknown:
            raise UsageError(f"--methods must be 'all' or comma-separated names from {list(methods)}, got "
                             f"{args.methods!r}")
        methods = {m: methods[m] for m in dict.fromkeys(chosen)}
    args.out = args.out or os.path.join("results", f"{args.experiment}-{args.dataset}")
    _check_out(args.out)
    try:  # the data of the first seed, so a bad file fails now and not after a seed of training
        args.seed = 0
        first_splits = _load(args)
    except (OSError, ValueError) as error:
        raise UsageError(f"--dataset {args.dataset}" + (f" --data-root {args.data_root}" if args.data_root else "")
                         + f": {error}") from None
    return methods, first_splits


def run_folder(out, seed, method):
    """Where a run keeps the result and checkpoints of one (seed, method): ``OUT/runs/seedS/METHOD``
    (the method's name with every other character than letters and digits as ``_``)."""
    slug = "".join(c if c.isalnum() else "_" for c in method).strip("_")
    return os.path.join(out, "runs", f"seed{seed}", slug)


def _start_folder(args):
    """Makes the --out folder and saves the resolved arguments in it; a run folder of an
    earlier run is replaced (its finished runs too), anything else in it is kept."""
    import shutil

    from autobalance.experiments import recipes
    runs = os.path.join(args.out, "runs")
    if os.path.exists(os.path.join(args.out, RUN_FILE)) and os.path.isdir(runs):
        print(f"replacing the earlier run in {args.out} (continue one with --resume {args.out})", flush=True)
        shutil.rmtree(runs)
    os.makedirs(runs, exist_ok=True)
    saved = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}
    recipes.save_atomic(os.path.join(args.out, RUN_FILE), json.dumps(saved, indent=1))


def _resumed(args, parser):
    """The arguments of the run in ``args.resume``; no other run option may be given."""
    path = os.path.join(args.resume, RUN_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"--resume {args.resume!r}: no run to continue there (no {RUN_FILE}); give the --out "
                         "folder of an earlier autobalance run")
    given = [a for a in vars(args) if a not in NOT_SAVED + ("seed",)
             and getattr(args, a) != parser.get_default(a)]
    if given:
        raise UsageError(f"--resume continues a run with its own arguments; drop {', '.join(given)}")
    with open(path) as f:
        saved = json.load(f)
    return argparse.Namespace(**{**vars(args), **saved, "out": args.resume})


def run(args):
    from autobalance.experiments import models, recipes, report

    if args.resume is not None:
        args = _resumed(args, args.parser)
        print(f"continuing the run in {args.out}", flush=True)
    methods, first_splits = resolve_run(args)
    if args.resume is None:
        _start_folder(args)
    out = args.out
    cifar = args.dataset.startswith("cifar")
    _prepare_torch(args.threads)
    config = recipes.TrainConfig(**dict(recipes.PAPER_CIFAR_TRAIN if cifar else {}, epochs=args.epochs,
                                        device=args.device))
    search = recipes.SearchConfig(last_layer_only=args.theta == "last",
                                  **(recipes.PAPER_CIFAR_SEARCH if cifar else
                                     recipes.GROUP_SEARCH if args.experiment == "groups" else {}))
    if args.hyper_batches is not None:
        search.train_batches, search.val_batches = args.hyper_batches
    if args.hyper_steps is not None:
        search.hyper_steps, search.hyper_every = args.hyper_steps, None
    if args.hyper_every is not None:
        search.hyper_every = args.hyper_every
    for name in ("hyper_optimizer", "hyper_lr"):
        if getattr(args, name) is not None:
            setattr(search, name, getattr(args, name))
    results, start = [], time.perf_counter()
    progress = not args.no_progress
    model_name = args.model or ("resnet32" if cifar else "small_cnn")
    for seed in range(args.seeds):
        args.seed = seed
        splits = first_splits if seed == 0 else _load(args)
        first_splits = None  # seed 0's data is not held through later seeds
        if args.device != "cpu":
            splits = splits._replace(**{k: getattr(splits, k).to(args.device)
                                        for k in ("train", "val", "full_train", "test")})
        factory = lambda: models.build_model(model_name, splits.full_train.num_classes,  # noqa: E731
                                             splits.full_train.in_channels)
        if seed == 0:
            print(f"{splits.name}: train {len(splits.train)}, val {len(splits.val)}, full train "
                  f"{len(splits.full_train)}, test {len(splits.test)}; model {model_name}; "
                  f"{len(methods)} methods x {args.seeds} seeds x {args.epochs} epochs", flush=True)
            n_train, n_val, val_batch = search.hyper_batches(len(splits.train), len(splits.val), config.batch_size)
            total = config.epochs * -(-len(splits.train) // config.batch_size)
            warmup, every, count = search.schedule(total)
            print(f"search: {count} hyper-steps ({search.hyper_optimizer} lr {search.hyper_lr:g}), one every {every} "
                  f"of {total} steps after a warm-up of {warmup}; each on {n_train} training batches of "
                  f"{config.batch_size}, {n_val} validation batch{'es' if n_val > 1 else ''} of {val_batch}", flush=True)
        for method in methods.values():
            result = recipes.run_method(method, splits, factory, config, search, seed=seed, progress=progress,
                                        checkpoint=run_folder(out, seed, method.name))
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
        points = recipes.lam_sweep(splits, factory, config, search, lams, progress=progress,
                                   checkpoint=os.path.join(out, "runs", "pareto"))
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
    recipes.save_atomic(os.path.join(out, "results.json"), json.dumps(summary, indent=1))
    title = "Table 1 (class imbalance)" if args.experiment == "classes" else "Table 3 (group imbalance)"
    recipes.save_atomic(os.path.join(out, "table.md"),
                        f"# {title}: {splits.name}, {args.seeds} seed{'s' if args.seeds > 1 else ''}, "
                        f"{args.epochs} epochs\n\nErrors in % on the balanced test set, mean ± std over seeds.\n\n"
                        f"{table}\n\n{paired}\n")
    print(f"\n{title}: {splits.name}, errors in % (mean ± std over {args.seeds} seed{'s' if args.seeds > 1 else ''})\n{table}\n\n{paired}")
    if multiple is not None:
        print(f"\nAutoBalance wall time (search + retrain) = {multiple:.2f} x one standard training run (CE)"
              + (f"; {single:.2f} x for one search + retrain (the rest picks lam on validation)"
                 if abs(single - multiple) > 1e-9 else ""))
    print(f"results: {out}/results.json, {out}/table.md" + "".join(f", {p}" for p in plots))
    print(f"total {time.perf_counter() - start:.0f} s")


SWEEP = (("default", {}, {}), ("hyper_lr x0.3", {"hyper_lr": 0.3}, {}), ("hyper_lr x3", {"hyper_lr": 3.0}, {}),
         ("warm-up 0.2", {"warmup_fraction": 0.2}, {}), ("warm-up 0.6", {"warmup_fraction": 0.6}, {}),
         ("25 hyper-steps", {"hyper_steps": 25}, {}), ("100 hyper-steps", {"hyper_steps": 100}, {}),
         ("a cluster per class", {}, {"cluster_min_val": None}), ("clusters of 2 classes", {}, {"clusters": 2}),
         ("SGD 0.05, every 20 (paper)", {"hyper_optimizer": "sgd", "hyper_every": 20}, {}))


def sweep(args):
    """The search's sensitivity on the class experiment: "AutoBalance: Delta & l (LA
    init)" with one search setting changed at a time (``SWEEP``: ``SearchConfig`` fields,
    ``hyper_lr`` as a multiple of the default, and ``class_methods`` options), each
    paired by seed against LA."""
    import dataclasses

    from autobalance.experiments import data, models, recipes, report

    args.experiment, args.imbalance, args.data_root = "classes", None, None
    if args.dataset not in data.EMBEDDED:
        raise UsageError(f"--dataset must be an embedded data set, one of {', '.join(data.EMBEDDED)}; got "
                         f"{args.dataset!r}")
    for name, low in (("seeds", 1), ("epochs", 1), ("threads", 1)):
        _at_least(args, name, low)
    out = args.out or os.path.join("results", f"sweep-{args.dataset}")
    _check_out(out)
    _prepare_torch(args.threads)
    config = recipes.TrainConfig(epochs=args.epochs)
    results = []
    for seed in range(args.seeds):
        args.seed = seed
        splits = _load(args)
        factory = lambda: models.build_model("small_cnn", splits.full_train.num_classes,  # noqa: E731
                                             splits.full_train.in_channels)
        result = recipes.run_method(recipes.class_methods()["LA"], splits, factory, config, recipes.SearchConfig(),
                                    seed=seed)
        results.append(result.to_json())
        for name, search_options, method_options in SWEEP:
            search = recipes.SearchConfig()
            for key, value in search_options.items():
                setattr(search, key, value * search.hyper_lr if key == "hyper_lr" else value)
            method = dataclasses.replace(recipes.class_methods(**method_options)["AutoBalance: Delta & l (LA init)"],
                                         name=f"AutoBalance [{name}]")
            result = recipes.run_method(method, splits, factory, config, search, seed=seed)
            results.append(result.to_json())
            print(f"  seed {seed} {name:<24} balanced_error {100 * result.metrics['balanced_error']:6.2f}%  "
                  f"({result.seconds:.1f} s, {len(result.trace) - 1} hyper-steps)", flush=True)
    pairs = report.paired_differences(results, "classes")
    table = report.paired_table(pairs)
    os.makedirs(out, exist_ok=True)
    recipes.save_atomic(os.path.join(out, "results.json"), json.dumps(
        {"dataset": args.dataset, "seeds": args.seeds, "epochs": args.epochs, "paired": pairs, "results": results},
        indent=1))
    recipes.save_atomic(os.path.join(out, "table.md"),
                        f"# Search sensitivity: {args.dataset}, {args.seeds} seeds, {args.epochs} epochs\n\n{table}\n")
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
    p.add_argument("--pda", action="store_true",
                   help="classes: add Table 2's learned-augmentation rows (MADA: one shared policy, PDA, "
                        "PDA + Delta & l; about 2x the search time of a loss-only search)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, choices=(None, "small_cnn", "resnet32"))
    p.add_argument("--lam", type=float, default=None, help="groups: fixes lam of AutoBalance's validation loss "
                   "(1 - lam) CE + lam CE_deo (default: picked per seed on validation from 0.1, 0.5, 0.9)")
    p.add_argument("--pareto-lams", default=None, help="groups: comma-separated lam values of the Pareto sweep")
    p.add_argument("--theta", choices=("last", "all"), default="last",
                   help="weights of the implicit-differentiation hypergradient: the last layer (default) or all")
    p.add_argument("--hyper-steps", type=int, default=None,
                   help="about this many hyper-steps per search (default 50, spread over the steps after the warm-up)")
    p.add_argument("--hyper-every", type=int, default=None,
                   help="a hyper-step every N training steps instead (CIFAR and groups: the paper's 20)")
    p.add_argument("--hyper-optimizer", choices=("adam", "sgd"), default=None,
                   help="the hyper-optimizer: adam (default; scale-free steps) or sgd (the paper's)")
    p.add_argument("--hyper-lr", type=float, default=None, help="its learning rate (default 0.05)")
    p.add_argument("--cluster-min-val", type=int, default=None,
                   help="classes: the searched parameters are shared by frequency clusters holding at least this "
                        "many validation examples (default 5; 0: one per class)")
    p.add_argument("--hyper-batches", type=int, nargs=2, default=None, metavar=("N_TRAIN", "N_VAL"),
                   help="training and validation batches per hyper-step (default: the paper's 10 and 10, each "
                        "capped at the batches its split holds; recipes.SearchConfig)")
    p.add_argument("--out", default=None, help="results folder (default results/EXPERIMENT-DATASET); finished "
                   "runs and per-epoch checkpoints are kept in OUT/runs")
    p.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the interrupted run in the folder OUT, with its own arguments")
    p.add_argument("--quick", action="store_true", help="a small preset for smoke tests (under 2 minutes)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, seed=0, parser=p)
    p = sub.add_parser("sweep", help="the search's sensitivity (hyper-lr, warm-up, interval, clusters) against LA")
    p.add_argument("--dataset", default="mnist", help="an embedded data set: mnist (default), digits")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--out", default=None, help="results folder (default results/sweep-DATASET)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=sweep, parser=p)
    p = sub.add_parser("demo", help="small training demo of ParametricCE on synthetic long-tailed data")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--imbalance", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo, parser=p)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as error:
        args.parser.error(str(error))  # usage, the message, exit status 2
    except KeyboardInterrupt:
        out = getattr(args, "resume", None) or getattr(args, "out", None)
        saved = out is not None and os.path.isfile(os.path.join(out, RUN_FILE))
        print(f"\nautobalance: interrupted" + (f"; finished runs and the last epoch's checkpoints are in {out}/runs; "
                                               f"continue with: autobalance run --resume {out}" if saved else ""),
              file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
