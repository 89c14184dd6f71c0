"""Peak memory of the fused loss on the CPU (issue 14: scratch that grew with G x K).

For each case N x K with G groups, a fresh process runs one forward + backward
of the ``"mean"`` loss with the logits and all three [G, K] tables requiring
grad (float32, 2 threads) and reports how far its peak resident memory rose
during that call (after a small warm-up call, with the inputs already
allocated). The logits and their gradient take ``N K`` floats each; the
rest is the kernels' scratch, chiefly the per-block partial tables of the
table gradients (``torch.ops.autobalance._table_grad_scratch``, printed when
the build has it).

    python bench/bench_memory.py [--out bench/results_memory.json]
"""
import argparse
import json
import resource
import subprocess
import sys

CASES = [(1024, 64, 8192), (1024, 1, 8192), (4096, 16, 1000), (4096, 1, 1000)]  # (N, G, K)
MIB = 2**20


def child(rows, groups, classes):
    """Runs in the fresh process: prints the peak RSS rise (MiB) of one call."""
    import torch

    import autobalance
    torch.set_num_threads(2)
    z = torch.randn(rows, classes, requires_grad=True)
    y, g = torch.randint(0, classes, (rows,)), torch.randint(0, groups, (rows,))
    tables = [torch.rand(groups, classes).add_(0.5).requires_grad_() for _ in range(3)]
    autobalance.parametric_cross_entropy(z[:8], y[:8], tables[0], scale=tables[1], shift=tables[2], group=g[:8]).backward()  # load, warm up
    z.grad = None
    for t in tables:
        t.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    autobalance.parametric_cross_entropy(z, y, tables[0], scale=tables[1], shift=tables[2], group=g).backward()
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    ops = torch.ops.autobalance
    scratch = ops._table_grad_scratch(rows, groups, classes, False) / MIB if hasattr(ops, "_table_grad_scratch") \
        else None
    print(json.dumps({"rise_mib": rise, "scratch_mib": scratch}))


def measure(rows, groups, classes):
    proc = subprocess.run([sys.executable, __file__, "--child", str(rows), str(groups), str(classes)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results_memory.json")
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    rows = []
    print(f"{'N x K, G':>18} {'logits MiB':>11} {'peak rise MiB':>14} {'partial tables MiB':>19}")
    for n, g, k in CASES:
        r = dict(N=n, G=g, K=k, logits_mib=n * k * 4 / MIB, **measure(n, g, k))
        rows.append(r)
        scratch = "n/a" if r["scratch_mib"] is None else f"{r['scratch_mib']:.1f}"
        print(f"{n:>5} x {k:<5}, {g:<4} {r['logits_mib']:>11.1f} {r['rise_mib']:>14.1f} {scratch:>19}")
    with open(args.out, "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
