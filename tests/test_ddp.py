"""BilevelOptimizer under DistributedDataParallel: 2 CPU processes, gloo."""
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autobalance import ParametricCE
from autobalance.augment import SphericalAugment
from autobalance.bilevel import BilevelOptimizer
from autobalance.objectives import BalancedCE

K, WORLD = 4, 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, K)).double()


def _batches(rank, n=4):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, K, (16,), generator=g))
            for _ in range(n)]


def _bopt(net, augment=False, **sources):
    """The bilevel optimizer, its criterion and (with ``augment``) its learned spherical augmentation."""
    criterion = ParametricCE(K).double()
    augment = SphericalAugment(K, radius=0.3).double() if augment else None
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    bopt = BilevelOptimizer(opt, criterion, BalancedCE(K), warmup_steps=1, hyper_every=2, augment=augment, **sources)
    return bopt, criterion, augment


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_model())
        data, val = _batches(rank), _batches(rank + WORLD)
        # the hyper-steps draw data[1:3] and val[1:3] from the bound loaders (a list starts again when it runs out)
        # the search learns a spherical augmentation with the loss (PDA): each rank draws its own
        bopt, criterion, augment = _bopt(model, augment=True, model=model, train_loader=data[1:3],
                                         val_loader=val[1:3], batches_per_hyper_step=(2, 2))
        first = _bopt(model)[0].hypergradient(model, data[:1], val[:1])
        first_augmented = bopt.hypergradient(model, data[:2], val[:1])
        alphas = []
        for t in range(6):
            x, y = data[t % len(data)]
            loss = criterion(model(augment(x, y)), y)
            bopt.zero_grad()
            loss.backward()
            bopt.step()
            if bopt.hyper_step_due:
                assert bopt.hyper_step().applied
                alphas.append([p.detach().clone() for p in (*criterion.parameters(), *augment.parameters())])
        theta = [p.detach().clone() for p in model.parameters()]
        # rank 1's validation batch has every label ignored: a NaN loss there but a zero gradient, so the
        # averaged v is finite; only rank 1 sees a reason to skip, and both ranks must skip together
        criterion = ParametricCE(K).double()
        ce = BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), criterion, nn.CrossEntropyLoss())
        x, y = data[0]
        criterion(model(x), y).backward()
        ce.step()
        x, y = val[0]
        result = ce.hyper_step(model, data[:1], [(x, torch.full_like(y, -100) if rank == 1 else y)])
        torch.save({"first": first, "first_augmented": first_augmented, "alphas": alphas, "theta": theta, "hyper_steps": bopt.hyper_steps,
                    "skip": (result.applied, result.skip_reason, ce.skipped_hyper_steps)}, f"{out_dir}/rank{rank}.pt")
        # Both ranks leave together: rank 0 hosts the TCP store, and tearing it down while
        # rank 1 still talks to it occasionally aborted rank 0 at exit (about 1 run in 30).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish in 240 s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_every_rank_ends_each_hyper_step_with_identical_hyperparameters(ranks):
    assert ranks[0]["hyper_steps"] == ranks[1]["hyper_steps"] == 3  # at steps 1, 3, 5
    for step0, step1 in zip(ranks[0]["alphas"], ranks[1]["alphas"]):
        assert all(torch.equal(a, b) for a, b in zip(step0, step1))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["theta"], ranks[1]["theta"]))
    assert ranks[0]["alphas"][-1][1].abs().max() > 0
    assert ranks[0]["alphas"][-1][2].shape == (1, K) and bool((ranks[0]["alphas"][-1][2] != 0.3).all())


def test_hypergradient_is_that_of_all_ranks_batches_together(ranks):
    """The solve uses the union of the ranks' batches: the same as one process
    given every rank's batches."""
    model = _model()
    bopt = _bopt(model)[0]
    expected = bopt.hypergradient(model, [_batches(r)[0] for r in range(WORLD)],
                                  [_batches(r + WORLD)[0] for r in range(WORLD)])
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["first"], ranks[1]["first"]))
    for got, want in zip(ranks[0]["first"], expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # and it differs from a single rank's own hypergradient
    local = bopt.hypergradient(model, _batches(0)[:1], _batches(WORLD)[:1])
    assert not torch.allclose(local[1], expected[1], rtol=1e-3)


def test_augmented_hypergradient_is_that_of_all_ranks_batches_in_rank_order(ranks):
    """With an augmentation, rank r's training batch i is drawn as batch r * n + i of
    one process given every rank's n batches in rank order: the same hypergradient."""
    model = _model()
    bopt = _bopt(model, augment=True)[0]
    train = [batch for r in range(WORLD) for batch in _batches(r)[:2]]
    val = [_batches(r + WORLD)[0] for r in range(WORLD)]
    expected = bopt.hypergradient(model, train, val)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["first_augmented"], ranks[1]["first_augmented"]))
    for got, want in zip(ranks[0]["first_augmented"], expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert float(expected[-1].abs().min()) > 0  # the radii's hypergradient
    # the draws follow the batches' positions: another order draws (and differentiates) otherwise
    other = bopt.hypergradient(model, train[2:] + train[:2], val)
    assert not torch.allclose(other[-1], expected[-1], rtol=1e-3)


def test_a_reason_to_skip_on_one_rank_skips_on_every_rank(ranks):
    assert ranks[0]["skip"] == ranks[1]["skip"] == (False, "the validation loss is not finite", 1)
