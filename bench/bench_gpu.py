"""GPU benchmark of the fused parametric cross-entropy kernels.

For float32 and bfloat16 logits and each N x K shape, medians (CUDA events,
after warm-up, with the L2 cache flushed before every timed run) of:

- copy:        logits-sized device-to-device copy (tensor.copy_), the
               bandwidth yardstick, measured in the same run;
- fused:       forward + backward through torch.ops.autobalance, with the
               scale and shift tables requiring grad (table gradients on);
- fused_dd:    the fused double backward with Uz only (the mixed derivative
               the hypergradient needs; table gradients on);
- cross_entropy: F.cross_entropy forward + backward;
- reference:   autobalance.reference (plain PyTorch) forward + backward;
- compiled:    torch.compile of the reference forward, + backward.

Achieved bandwidth uses the minimal byte counts 2 N K b (forward+backward)
and 3 N K b (double backward: read logits and Uz, write grad_logits), as a
fraction of the copy's 2 N K b / t. Note that the forward and the backward
are separate ops (the backward needs grad_loss), so forward+backward reads
the logits twice: 3 N K b of real traffic, i.e. at most ~67% of copy
bandwidth by the 2 N K b count unless the logits stay in L2.

    python bench/bench_gpu.py [--out bench/gpu_results.json] [--quick]

Exits 0 with a message when there is no GPU.
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = [(65536, 10), (65536, 100), (65536, 1000), (16384, 8142), (8192, 32000)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IGNORE = -100
DEVICE = "cuda"
# (what, K range, target) printed next to the results.
TARGETS = {
    "fused_frac": "fwd+bwd >= 80% of copy BW for K >= 1000, >= 50% at K = 10",
    "speedup": ">= 2.5x faster than F.cross_entropy fwd+bwd for K >= 1000",
    "dd_frac": "double backward >= 70% of copy BW for K >= 1000",
}


def target_for(metric, classes):
    if metric == "fused_frac":
        return 0.8 if classes >= 1000 else (0.5 if classes == 10 else None)
    if metric == "speedup":
        return 2.5 if classes >= 1000 else None
    if metric == "dd_frac":
        return 0.7 if classes >= 1000 else None
    return None


class Timer:
    def __init__(self, warmup, iters):
        self.warmup, self.iters = warmup, iters
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
        self.flush = torch.empty(max(2 * l2, 128 * 2**20), dtype=torch.uint8, device=DEVICE)

    def median_ms(self, fn):
        for _ in range(self.warmup):
            fn()
        events = []
        for _ in range(self.iters):
            self.flush.zero_()  # evict the inputs from L2
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def bench_shape(timer, rows, classes, dtype, compiled_reference):
    import autobalance.reference as reference

    torch.manual_seed(0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = torch.randn(rows, classes, device=DEVICE, dtype=dtype) * 3
    target = torch.randint(0, classes, (rows,), device=DEVICE)
    weight = torch.ones(1, classes, device=DEVICE, dtype=acc)
    scale = (torch.rand(1, classes, device=DEVICE, dtype=acc) + 0.5).requires_grad_(True)
    shift = torch.randn(1, classes, device=DEVICE, dtype=acc).requires_grad_(True)
    z = logits.clone().requires_grad_(True)
    ones = torch.ones(rows, device=DEVICE, dtype=acc)
    uz = torch.randn_like(logits)
    ops = torch.ops.autobalance
    nbytes = rows * classes * logits.element_size()
    out = {"rows": rows, "classes": classes, "dtype": str(dtype).replace("torch.", "")}

    copy_dst = torch.empty_like(logits)
    out["copy_ms"] = timer.median_ms(lambda: copy_dst.copy_(logits))
    del copy_dst

    def fused():
        loss, _ = ops.parametric_ce(z, target, None, weight, scale, shift, IGNORE)
        torch.autograd.grad(loss, (z, scale, shift), ones)

    out["fused_ms"] = timer.median_ms(fused)

    with torch.no_grad():
        _, lse = ops.parametric_ce(logits, target, None, weight, scale, shift, IGNORE)
    s_, l_ = scale.detach(), shift.detach()
    out["fused_dd_ms"] = timer.median_ms(lambda: ops.parametric_ce_double_backward(
        ones, logits, target, None, weight, s_, l_, lse, uz, None, None, None, IGNORE, True))

    def cross_entropy():
        loss = F.cross_entropy(z, target, ignore_index=IGNORE)
        torch.autograd.grad(loss, (z,))

    out["cross_entropy_ms"] = timer.median_ms(cross_entropy)

    def run_reference(fn):
        def step():
            loss, _ = fn(z, target, None, weight, scale, shift, IGNORE)
            torch.autograd.grad(loss, (z, scale, shift), ones)
        return step

    out["reference_ms"] = timer.median_ms(run_reference(reference.parametric_ce))
    if compiled_reference is not None:
        try:
            out["compiled_ms"] = timer.median_ms(run_reference(compiled_reference))
        except Exception as e:  # report and go on: the kernels are what is measured
            out["compiled_error"] = f"{type(e).__name__}: {str(e)[:200]}"

    copy_bw = 2 * nbytes / (out["copy_ms"] * 1e-3)
    out["copy_GBps"] = copy_bw / 1e9
    out["fused_GBps"] = 2 * nbytes / (out["fused_ms"] * 1e-3) / 1e9
    out["fused_dd_GBps"] = 3 * nbytes / (out["fused_dd_ms"] * 1e-3) / 1e9
    out["fused_frac"] = out["fused_GBps"] * 1e9 / copy_bw
    out["dd_frac"] = out["fused_dd_GBps"] * 1e9 / copy_bw
    out["speedup"] = out["cross_entropy_ms"] / out["fused_ms"]
    out["checks"] = {}
    for metric in TARGETS:
        goal = target_for(metric, classes)
        if goal is not None:
            out["checks"][metric] = {"target": goal, "value": out[metric], "met": out[metric] >= goal}
    return out


def fmt_ms(r, key):
    return f"{r[key]:8.3f}" if key in r else "       -"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "gpu_results.json"))
    parser.add_argument("--quick", action="store_true", help="fewer timed runs, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to measure.")
        return 0
    import autobalance_ext
    if not autobalance_ext.has_cuda_kernels():
        print("bench_gpu: autobalance_ext was built without CUDA kernels; rebuild with FORCE_CUDA=1.")
        return 1
    import autobalance.reference as reference

    started = time.time()
    timer = Timer(warmup=2 if args.quick else 3, iters=5 if args.quick else 10)
    compiled = None
    if not (args.quick or args.no_compile):
        compiled = torch.compile(reference.parametric_ce, dynamic=True)
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}; torch {torch.__version__}")
    print("targets: " + "; ".join(TARGETS.values()))
    print("bandwidth: minimal bytes (fwd+bwd 2NKb, double backward 3NKb) over the copy's 2NKb/t\n")
    header = (f"{'dtype':>8} {'N':>6} {'K':>6} | {'copy':>8} {'fused':>8} {'fused_dd':>8} {'F.ce':>8} "
              f"{'ref':>8} {'compiled':>8} (ms) | {'fwd+bwd':>7} {'dd':>7} {'vs ce':>6}  targets")
    print(header)
    print("-" * len(header))
    results = []
    for name, dtype in DTYPES.items():
        for rows, classes in SHAPES:
            r = bench_shape(timer, rows, classes, dtype, compiled)
            results.append(r)
            marks = " ".join(f"{m}:{'ok' if c['met'] else 'MISS'}" for m, c in r["checks"].items())
            print(f"{name:>8} {rows:>6} {classes:>6} | {fmt_ms(r, 'copy_ms')} {fmt_ms(r, 'fused_ms')} "
                  f"{fmt_ms(r, 'fused_dd_ms')} {fmt_ms(r, 'cross_entropy_ms')} {fmt_ms(r, 'reference_ms')} "
                  f"{fmt_ms(r, 'compiled_ms')}      | {r['fused_frac']:6.0%} {r['dd_frac']:6.0%} "
                  f"{r['speedup']:5.1f}x  {marks}", flush=True)
            if "compiled_error" in r:
                print(f"         torch.compile failed: {r['compiled_error']}")
            torch.cuda.empty_cache()
    summary = {"device": device, "torch": torch.__version__, "targets": TARGETS,
               "seconds": time.time() - started, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote {args.out} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
