"""CPU benchmark of the fused parametric cross-entropy (issue: fused CPU op).

Times, side by side in one run on 2 threads, float32:
  - forward+backward (loss, grad of logits and of the three tables): fused op,
    reference path eager, torch.compile of the reference, and F.cross_entropy
    forward+backward (which does less work);
  - the double backward with only Uz (the mixed derivative): fused op vs the
    reference's autograd;
  - one torch.exp pass over N x K, the compute floor;
  - segmentation shapes [N, C, H, W] (NCHW-contiguous and channels-last
    logits, [N, H, W] targets): fused forward+backward against
    F.cross_entropy on the same input (the fused sum/mean reads both layouts
    in place on the CPU; a copy of NCHW logits to rows is timed alone);
  - target distributions (issue 15): class indices with label smoothing 0.1,
    a mixup-like probability target and a dense (softmax) one, at 4096 x 100
    and 256 x 1000, and smoothing / dense targets at 16 x 19 x 128 x 128
    (NCHW and channels-last): fused and reference forward+backward against
    F.cross_entropy on the same input, and the forward alone.
Prints medians and ratios and writes them to JSON (one entry per thread count).

    python bench/bench_ops.py [--threads 2 [1 ...]] [--out bench/results_ops.json] [--quick]
                              [--segmentation-only | --targets-only]
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import autobalance  # noqa: F401  (loads the ops)
from autobalance import parametric_cross_entropy, reference

SHAPES = [(4096, 10), (4096, 100), (4096, 1000), (2048, 8142)]
SEGMENTATION = [(4, 19, 64, 64), (16, 19, 128, 128)]
TARGET_SHAPES = [(4096, 100), (256, 1000)]            # target distributions: [N, K] ...
TARGET_SEGMENTATION = [(16, 19, 128, 128)]          # ... and [N, C, H, W], both layouts


def interleaved_medians(fns, rounds, reps=3):
    """Median ms of each callable, timed round-robin (each round runs every
    callable ``reps`` times and keeps its fastest), so that load changes on a
    shared machine hit every variant alike."""
    for fn in fns.values():
        fn()
        fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            samples[name].append(best)
    return {name: 1e3 * statistics.median(v) for name, v in samples.items()}


def problem(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    tables = [torch.rand(1, k, generator=g) + 0.5, torch.rand(1, k, generator=g) + 0.5,
              torch.randn(1, k, generator=g)]
    return z, y, tables


def fwd_bwd(backend):
    def run(z, y, tables):
        z = z.detach().requires_grad_()
        ts = [t.detach().requires_grad_() for t in tables]
        loss = parametric_cross_entropy(z, y, ts[0], scale=ts[1], shift=ts[2], backend=backend)
        loss.backward()
    return run


def bench_shape(n, k, quick):
    z, y, tables = problem(n, k)
    compiled_loss = torch.compile(lambda z, y, w, s, l: reference.parametric_ce(z, y, None, w, s, l, -100)[0].sum()
                                  / w[0, y].sum(), fullgraph=True)

    def compiled(z, y, tables):
        z = z.detach().requires_grad_()
        ts = [t.detach().requires_grad_() for t in tables]
        compiled_loss(z, y, *ts).backward()

    def cross_entropy(z, y, tables):
        z = z.detach().requires_grad_()
        F.cross_entropy(z, y, weight=tables[0][0]).backward()

    _, lse = torch.ops.autobalance.parametric_ce(z, y, None, *tables, -100)
    gamma = torch.full((n,), 1.0 / n)
    uz = torch.randn_like(z)

    def dbl_fused():
        torch.ops.autobalance.parametric_ce_double_backward(gamma, z, y, None, *tables, lse, uz, None, None, None,
                                                            -100, True)

    def dbl_reference():
        reference.parametric_ce_double_backward(gamma, z, y, None, *tables, lse, uz, None, None, None, -100, True)

    t = interleaved_medians({
        "fused": lambda: fwd_bwd("fused")(z, y, tables),
        "reference": lambda: fwd_bwd("reference")(z, y, tables),
        "reference_compiled": lambda: compiled(z, y, tables),
        "cross_entropy": lambda: cross_entropy(z, y, tables),
        "exp": lambda: torch.exp(z),
        "double_fused": dbl_fused,
        "double_reference": dbl_reference,
    }, rounds=5 if quick else 15)
    ratios = {
        "cross_entropy/fused": t["cross_entropy"] / t["fused"],
        "compiled/fused": t["reference_compiled"] / t["fused"],
        "fused/exp": t["fused"] / t["exp"],
        "double_reference/double_fused": t["double_reference"] / t["double_fused"],
    }
    targets = {
        "fused no slower than F.cross_entropy (K >= 100)": None if k < 100 else ratios["cross_entropy/fused"] >= 1.0,
        "fused >= 2x faster than compiled reference": ratios["compiled/fused"] >= 2.0,
        "fused within 2x of exp floor (K >= 1000)": None if k < 1000 else ratios["fused/exp"] <= 2.0,
        "double backward >= 5x faster than reference": ratios["double_reference/double_fused"] >= 5.0,
    }
    return {"N": n, "K": k, "median_ms": t, "ratios": ratios, "targets": targets}


def bench_segmentation(shape, quick):
    """Fused forward+backward of [N, C, H, W] logits (identity scale and shift,
    random class weights) against F.cross_entropy, both memory layouts."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g) * 3
    y = torch.randint(0, c, (n, h, w), generator=g)
    weight = torch.rand(1, c, generator=g) + 0.5
    tables = [weight, torch.ones(1, c), torch.zeros(1, c)]
    layouts = {"nchw": z, "channels_last": z.contiguous(memory_format=torch.channels_last)}

    def fused(z):
        z = z.detach().requires_grad_()
        parametric_cross_entropy(z, y, tables[0], scale=tables[1], shift=tables[2]).backward()

    def cross_entropy(z):
        z = z.detach().requires_grad_()
        F.cross_entropy(z, y, weight=weight[0]).backward()

    # what a path that makes rows of NCHW logits adds ("none", reduced precision, CUDA)
    fns = {"copy_nchw_to_rows": lambda: z.movedim(1, -1).reshape(-1, c)}
    for name, zz in layouts.items():
        fns[f"fused_{name}"] = lambda zz=zz: fused(zz)
        fns[f"cross_entropy_{name}"] = lambda zz=zz: cross_entropy(zz)
    t = interleaved_medians(fns, rounds=5 if quick else 15, reps=1 if n * h * w > 100_000 else 3)
    ratios = {f"cross_entropy/fused {name}": t[f"cross_entropy_{name}"] / t[f"fused_{name}"] for name in layouts}
    return {"shape": list(shape), "median_ms": t, "ratios": ratios}


def target_inputs(shape, seed=0):
    """Logits of ``shape`` (class dimension 1), a random class weight, and the
    targets ``{name: (target, label_smoothing)}``: class indices with label
    smoothing 0.1; a mixup-like probability target (a convex mix, per sample,
    of two one-hots: two nonzero entries per row); a dense probability target
    (a softmax, every entry nonzero)."""
    g = torch.Generator().manual_seed(seed)
    n, k, spatial = shape[0], shape[1], tuple(shape[2:])
    z = torch.randn(shape, generator=g) * 3
    weight = torch.rand(k, generator=g) + 0.5
    y = torch.randint(0, k, (n, *spatial), generator=g)
    y2 = torch.randint(0, k, (n, *spatial), generator=g)
    lam = torch.rand((n,) + (1,) * (len(shape) - 1), generator=g)
    onehot = [F.one_hot(t, k).movedim(-1, 1).to(z.dtype) for t in (y, y2)]
    targets = {"smooth_0.1": (y, 0.1),
               "mixup": ((lam * onehot[0] + (1 - lam) * onehot[1]).contiguous(), 0.0),
               "dense": ((torch.randn(shape, generator=g) * 2).softmax(1), 0.0)}
    return z, weight, targets


def bench_targets(shape, quick, layout="contiguous"):
    """Forward+backward (grad of the logits only, identity scale and shift, a
    random class weight, mean) with target distributions: fused and reference
    backends against F.cross_entropy on the same input; forward alone too, so
    the backward is the difference. ``layout="channels_last"`` makes the
    logits (and a probability target) channels-last."""
    z, weight, targets = target_inputs(shape)
    if layout == "channels_last":
        z = z.contiguous(memory_format=torch.channels_last)
    big = z.numel() > 1_000_000
    out = []
    for name, (t, eps) in targets.items():
        if big and name == "mixup":
            continue  # segmentation: smoothing and a dense probability target
        if layout == "channels_last" and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)

        def fwd(loss_fn, backward, t=t, eps=eps):
            def run():
                zz = z.detach().requires_grad_()
                loss = loss_fn(zz, t, eps)
                if backward:
                    loss.backward()
            return run

        def ours(backend):
            return lambda zz, t, eps: parametric_cross_entropy(zz, t, weight=weight, label_smoothing=eps,
                                                               backend=backend)

        def ce(zz, t, eps):
            return F.cross_entropy(zz, t, weight=weight, label_smoothing=eps)

        t_ms = interleaved_medians({
            "fused": fwd(ours("fused"), True),
            "reference": fwd(ours("reference"), True),
            "cross_entropy": fwd(ce, True),
            "fused_forward": fwd(ours("fused"), False),
            "cross_entropy_forward": fwd(ce, False),
        }, rounds=5 if quick else 15, reps=1 if big else 3)
        ratios = {"cross_entropy/fused": t_ms["cross_entropy"] / t_ms["fused"],
                  "reference/fused": t_ms["reference"] / t_ms["fused"]}
        targets_met = {"fused no slower than F.cross_entropy": ratios["cross_entropy/fused"] >= 1.0,
                       "fused >= 2x faster than reference": ratios["reference/fused"] >= 2.0}
        out.append({"shape": list(shape), "layout": layout, "target": name, "label_smoothing": eps,
                    "median_ms": t_ms, "ratios": ratios, "targets": targets_met})
    return out


def print_targets(rows):
    print("\ntarget distributions, forward+backward (fwd: forward alone), median ms; "
          "ratios > 1: fused faster")
    cols = ["fused", "reference", "cross_entropy", "fused_forward", "cross_entropy_forward"]
    print(f"{'shape':>18} {'layout':>13} {'target':>10} " + " ".join(f"{c:>13}" for c in
          ["fused", "reference", "F.ce", "fused fwd", "F.ce fwd"])
          + f" {'F.ce/fused':>10} {'ref/fused':>9}")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{shape:>18} {r['layout']:>13} {r['target']:>10} "
              + " ".join(f"{r['median_ms'][c]:>13.3f}" for c in cols)
              + f" {r['ratios']['cross_entropy/fused']:>10.2f} {r['ratios']['reference/fused']:>9.2f}")
    missed = [(r, name) for r in rows for name, ok in r["targets"].items() if not ok]
    print("targets: " + ("all met" if not missed else "MISSED: " + "; ".join(
        f"{'x'.join(map(str, r['shape']))} {r['layout']} {r['target']}: {name}" for r, name in missed)))


def print_rows(rows):
    cols = ["fused", "reference", "reference_compiled", "cross_entropy", "exp", "double_fused", "double_reference"]
    print("median ms")
    print(f"{'N x K':>12} " + " ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(f"{r['N']:>5} x {r['K']:<5} " + " ".join(f"{r['median_ms'][c]:>18.3f}" for c in cols))
    print("\nratios (same run)")
    names = list(rows[0]["ratios"])
    print(f"{'N x K':>12} " + " ".join(f"{c:>30}" for c in names))
    for r in rows:
        print(f"{r['N']:>5} x {r['K']:<5} " + " ".join(f"{r['ratios'][c]:>30.2f}" for c in names))
    print("\ntargets")
    for r in rows:
        for name, ok in r["targets"].items():
            if ok is not None:
                print(f"  {r['N']} x {r['K']}: {name}: {'met' if ok else 'MISSED'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="thread counts, one run each (e.g. --threads 1 2)")
    parser.add_argument("--out", default="bench/results_ops.json")
    parser.add_argument("--quick", action="store_true", help="fewer timing rounds")
    parser.add_argument("--segmentation-only", action="store_true", help="only the [N, C, H, W] shapes")
    parser.add_argument("--targets-only", action="store_true",
                        help="only the target distributions (probability targets, label smoothing)")
    args = parser.parse_args()
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        seg = [] if args.targets_only else [bench_segmentation(shape, args.quick) for shape in SEGMENTATION]
        rows = [] if args.segmentation_only or args.targets_only else [bench_shape(n, k, args.quick)
                                                                       for n, k in SHAPES]
        dist = [] if args.segmentation_only else (
            [r for shape in TARGET_SHAPES for r in bench_targets(shape, args.quick)]
            + [r for shape in TARGET_SEGMENTATION for layout in ("contiguous", "channels_last")
               for r in bench_targets(shape, args.quick, layout)])
        print(f"\nfloat32, {threads} threads")
        if rows:
            print_rows(rows)
        if seg:
            print("\n[N, C, H, W] forward+backward, median ms (ratio > 1: fused faster)")
        for r in seg:
            cells = ", ".join(f"{k} {v:.2f}" for k, v in r["median_ms"].items())
            ratios = ", ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items())
            print(f"  {r['shape']}: {cells}\n    {ratios}")
        if dist:
            print_targets(dist)
        runs.append({"threads": threads, "rows": rows, "segmentation": seg, "targets": dist})
    with open(args.out, "w") as f:
        json.dump({"dtype": "float32", "torch": torch.__version__, "runs": runs}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
