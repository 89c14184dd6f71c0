"""Tables and plots of an ``autobalance run``: the paper's Tables 1, 2 and 3 and
Figures 3 and 5, from the results of :mod:`autobalance.recipes`."""
import math
import os
from typing import Dict, List, Sequence, Tuple

import torch

CLASS_COLUMNS = [("balanced_error", "balanced err"), ("standard_error", "standard err")]
GROUP_COLUMNS = [("group_balanced_error", "group-balanced err"), ("worst_cell_error", "worst (class, group) err"),
                 ("deo_error", "DEO"), ("standard_error", "standard err")]


HEADLINE = {"classes": "balanced_error", "groups": "deo_error"}  # the metric each experiment is judged by


TABLE2_REFERENCE = "AutoBalance: Delta & l"  # what Table 2's augmentation rows are paired against


def method_pairs(results: List[dict]) -> List[Tuple[str, str]]:
    """The ``(method, baseline)`` pairs of the report, in the results' order: every
    AutoBalance design against every baseline (Table 1 / 3), and every method with a
    learned augmentation (Table 2's rows: a result with ``pda``) against
    ``TABLE2_REFERENCE``, the same loss search without augmentation, when it ran."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    augmented = {r["method"] for r in results if r.get("pda")}
    designs = [m for m in methods if m.startswith("AutoBalance") and m not in augmented]
    baselines = [m for m in methods if not m.startswith("AutoBalance") and m not in augmented]
    pairs = [(m, b) for m in designs for b in baselines]
    if TABLE2_REFERENCE in methods:
        pairs += [(m, TABLE2_REFERENCE) for m in methods if m in augmented]
    return pairs


def paired_differences(results: List[dict], experiment: str, confidence: float = 0.95) -> List[Dict[str, object]]:
    """Each ``(method, baseline)`` pair of ``method_pairs``, paired by seed (every
    method of a seed runs on the same splits, from the same initial weights): the
    per-seed differences of the headline metric (``HEADLINE``; method minus baseline,
    so negative favours the method), their mean and a ``confidence`` t-interval over
    the seeds (``scipy.stats.t``; None with fewer than two seeds). ``beyond_noise`` is
    True when the interval excludes 0. A seed in which either model predicts a single
    class on the test set is left out of the pair (``seeds`` lists those kept)."""
    from scipy import stats

    key = HEADLINE[experiment]
    value = {(r["method"], r["seed"]): r["metrics"][key] for r in results
             if r["metrics"].get("predicted_classes", 2) > 1}  # a single-class predictor's DEO is trivially 0
    out = []
    for method, baseline in method_pairs(results):
        seeds = sorted(s for m, s in value if m == method and (baseline, s) in value
                       and not math.isnan(value[method, s]) and not math.isnan(value[baseline, s]))
        diffs = [value[method, s] - value[baseline, s] for s in seeds]
        row = {"method": method, "baseline": baseline, "metric": key, "seeds": seeds, "differences": diffs,
               "mean": sum(diffs) / len(diffs) if diffs else float("nan"), "low": None, "high": None,
               "beyond_noise": False, "confidence": confidence}
        if len(diffs) >= 2:
            t = torch.tensor(diffs, dtype=torch.float64)
            half = float(stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * t.std() / math.sqrt(len(diffs)))
            row.update(low=row["mean"] - half, high=row["mean"] + half)
            row["beyond_noise"] = row["low"] > 0 or row["high"] < 0
        out.append(row)
    return out


def paired_table(pairs: List[Dict[str, object]]) -> str:
    """The paired differences as a Markdown table (percentage points)."""
    if not pairs:
        return ""
    confidence = round(100 * pairs[0]["confidence"])
    lines = [f"| method | baseline | seeds | mean difference (pp) | {confidence}% interval (t, over seeds) |"
             " beyond noise |", "|---|---|---|---|---|---|"]
    for p in pairs:
        interval = "n/a (one seed)" if p["low"] is None else f"[{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]"
        verdict = ("yes, the method better" if p["beyond_noise"] and p["mean"] < 0 else
                   "yes, the method worse" if p["beyond_noise"] else "no")
        if not p["seeds"]:
            interval, verdict = "n/a (no seed without a single-class model)", "n/a"
        lines.append(f"| {p['method']} | {p['baseline']} | {len(p['seeds'])} | {100 * p['mean']:+.2f} | {interval} "
                     f"| {verdict} |")
    metric = pairs[0]["metric"].replace("_", " ")
    lines.append(f"\nPaired by seed: {metric} of the method minus that of the baseline, in percentage points "
                 "(negative: the method better); the interval is a t-interval over the per-seed differences. Seeds "
                 "in which either model predicts a single class on the test set are left out. Methods with a learned "
                 f"augmentation (Table 2) are paired with {TABLE2_REFERENCE!r}, the same search without it.")
    return "\n".join(lines)


def _mean_std(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def summarise(results: List[dict], experiment: str, tail: int = 3) -> List[Dict[str, object]]:
    """Mean and std over seeds of each metric, per method (in first-seen order).
    For classes, also the per-class errors of the ``tail`` rarest classes."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    columns = CLASS_COLUMNS if experiment == "classes" else GROUP_COLUMNS
    rows = []
    for m in methods:
        runs = [r for r in results if r["method"] == m]
        row = {"method": m, "seeds": len(runs), "seconds": _mean_std([r["seconds"] for r in runs])[0],
               "single_class_runs": sum(r["metrics"].get("predicted_classes", 2) == 1 for r in runs),
               "choices": [r.get("choice") or {} for r in runs]}
        for key, _ in columns:
            row[key] = _mean_std([r["metrics"][key] for r in runs])
        if experiment == "classes":
            per_class = torch.tensor([r["metrics"]["per_class_error"] for r in runs], dtype=torch.float64)
            row["per_class_error"] = per_class.mean(0).tolist()
        rows.append(row)
    return rows


def markdown_table(rows, experiment: str, tail: int = 3) -> str:
    """The table of the paper (errors in %, mean ± std over seeds)."""
    columns = CLASS_COLUMNS if experiment == "classes" else GROUP_COLUMNS
    head = ["method"] + [name for _, name in columns]
    if experiment == "classes":
        classes = len(rows[0]["per_class_error"])
        tail_ids = list(range(classes - tail, classes))
        head += [f"class {k} err" for k in tail_ids]
    chosen = any(any(c for c in r.get("choices", [])) for r in rows)
    if chosen:
        head.append("chosen on validation (per seed)")
    head.append("time (s)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = r["method"] + (f" (†{r['single_class_runs']})" if r.get("single_class_runs") else "")
        cells = [name] + [f"{100 * r[k][0]:.2f} ± {100 * r[k][1]:.2f}" for k, _ in columns]
        if experiment == "classes":
            cells += [f"{100 * r['per_class_error'][k]:.1f}" for k in tail_ids]
        if chosen:
            names = list(dict.fromkeys(n for c in r.get("choices", []) for n in c))
            cells.append("; ".join(f"{n} " + ", ".join(f"{c[n]:g}" for c in r["choices"] if n in c) for n in names))
        cells.append(f"{r['seconds']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("single_class_runs") for r in rows):
        lines.append("\n(†n): in n seeds the model predicts a single class on the whole test set, which makes "
                     "the DEO trivially 0 (paper, Table 3).")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_parameter_evolution(results: List[dict], path: str, clusters: Sequence[int] = None) -> None:
    """Figure 3: the learned scale ``S`` (Δ) and shift ``l`` per class over the
    search, for each searched method's first seed (classes by training
    frequency, most frequent first). With groups, one line per (class, group)
    cell."""
    searched = {}
    for r in results:
        if r["trace"] and r["trace"][0].get("tables") and r["method"] not in searched:
            searched[r["method"]] = r["trace"]
    if not searched:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(len(searched), 2, figsize=(11, 3.2 * len(searched)), squeeze=False)
    for row, (method, trace) in zip(axes, searched.items()):
        epochs = [t["epoch"] for t in trace]
        for ax, key, label in ((row[0], "scale", "Δ (scale S)"), (row[1], "shift", "l (shift L)")):
            values = torch.tensor([t["tables"][key] for t in trace])  # [steps, G, K]
            groups, classes = values.shape[1:]
            colours = plt.cm.viridis(torch.linspace(0, 1, classes).tolist())
            for g in range(groups):
                for k in range(classes):
                    line = f"class {k}" if groups == 1 else f"class {k}, group {g}"
                    ax.plot(epochs, values[:, g, k].tolist(), color=colours[k], label=line,
                            linestyle=("-", "--", ":", "-.")[g % 4])
            ax.set_title(f"{method}: {label}", fontsize=9)
            ax.set_xlabel("epoch of the search phase")
        row[1].legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pda_policy(results: List[dict], path: str) -> None:
    """Table 2's learned augmentation: each PDA method's magnitude and application
    probability per class (its cluster's, averaged over the ops), mean over seeds,
    against the class (by training frequency, most frequent first)."""
    policies = {}
    for r in results:
        pda = r.get("pda")
        if pda and "magnitudes" in pda:
            clusters = torch.tensor(pda["clusters"])
            # [rows, C, ops] -> per class, averaged over ops (and group rows)
            per_class = [torch.tensor(pda[key]).mean((0, 2))[clusters] for key in ("magnitudes", "probabilities")]
            policies.setdefault(r["method"], []).append(torch.stack(per_class))
    if not policies:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for method, draws in policies.items():
        mean = torch.stack(draws).mean(0)  # [2, K]
        for ax, values in zip(axes, mean):
            ax.plot(range(len(values)), values.tolist(), marker="o", label=f"{method} ({len(draws)} seeds)")
    for ax, title in zip(axes, ("magnitude (mean over ops)", "application probability (mean over ops)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("class, by training frequency (most frequent first)")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TRAJECTORY = (("val_objective", "validation objective", False), ("train_loss", "training loss", False),
              ("hypergrad_norm", "hypergradient norm", True), ("step_size", "Neumann step size", True))


def plot_search_trajectory(results: List[dict], path: str) -> None:
    """The search's own diagnostics per hyper-step, beside Figure 3: validation
    objective, training loss, hypergradient norm and the Neumann step size, one row
    per searched method and one line per seed; skipped hyper-steps are crosses."""
    searched = {}
    for r in results:
        steps = [t for t in r["trace"] if "val_objective" in t]
        if steps:
            searched.setdefault(r["method"], []).append((r["seed"], steps))
    if not searched:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(len(searched), len(TRAJECTORY), figsize=(15, 2.8 * len(searched)), squeeze=False)
    for row, (method, runs) in zip(axes, searched.items()):
        for ax, (key, label, log) in zip(row, TRAJECTORY):
            for seed, steps in runs:
                points = [(t["epoch"], t.get(key)) for t in steps if t.get(key) is not None]
                if not points:
                    continue
                line, = ax.plot(*zip(*points), marker=".", markersize=3, label=f"seed {seed}")
                skipped = [(t["epoch"], t.get(key)) for t in steps if not t["applied"] and t.get(key) is not None
                           and math.isfinite(t[key])]
                if skipped:
                    ax.plot(*zip(*skipped), "x", color=line.get_color())
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{method}: {label}", fontsize=8)
            ax.set_xlabel("epoch of the search phase", fontsize=7)
            ax.tick_params(labelsize=7)
        row[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_per_class_accuracy(rows, path: str) -> None:
    """Per-class test accuracy by method (mean over seeds), classes from most
    to least frequent."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in rows:
        acc = [100 * (1 - e) for e in r["per_class_error"]]
        style = "-" if r["method"].startswith("AutoBalance") else "--"
        ax.plot(range(len(acc)), acc, style, marker="o", markersize=3, label=r["method"])
    ax.set_xlabel("class (most to least frequent in training)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(points: List[dict], path: str) -> None:
    """Figure 5: group-balanced error and DEO against the standard error, for
    the lam-swept blended baselines and AutoBalance."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    families = list(dict.fromkeys(p["family"] for p in points))
    for ax, key, label in ((axes[0], "group_balanced_error", "group-balanced error (%)"),
                           (axes[1], "deo_error", "DEO error (%)")):
        for family in families:
            pts = sorted((p for p in points if p["family"] == family), key=lambda p: p["lam"])
            x = [100 * p["metrics"]["standard_error"] for p in pts]
            y = [100 * p["metrics"][key] for p in pts]
            ax.plot(x, y, "-o" if family == "AutoBalance" else "--s", markersize=4, label=family)
            for p, xi, yi in zip(pts, x, y):
                ax.annotate(f"{p['lam']:g}", (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("standard error (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("accuracy-fairness trade-off (labels: lam)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out: str, experiment: str, results, rows, points=None) -> List[str]:
    paths = []
    if experiment == "classes":
        paths.append(os.path.join(out, "per_class_accuracy.png"))
        plot_per_class_accuracy(rows, paths[-1])
    evolution = os.path.join(out, "parameter_evolution.png")
    plot_parameter_evolution(results, evolution)
    if os.path.exists(evolution):
        paths.append(evolution)
    trajectory = os.path.join(out, "search_trajectory.png")
    plot_search_trajectory(results, trajectory)
    if os.path.exists(trajectory):
        paths.append(trajectory)
    policy = os.path.join(out, "pda_policy.png")
    plot_pda_policy(results, policy)
    if os.path.exists(policy):
        paths.append(policy)
    if points:
        paths.append(os.path.join(out, "pareto.png"))
        plot_pareto(points, paths[-1])
    return paths
