"""ParametricCE, loss_tables and frequency_clusters (docs/math.md sections 1 and 2)."""
import io
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import autobalance
from autobalance import LossTables, ParametricCE, frequency_clusters, loss_tables
from conftest import examples

from conftest import pce  # noqa: E402
INITS = ("ce", "balanced", "la", "cdt", "vs", "group_la", "group_balanced")
USES = {"la": ("tau",), "vs": ("tau", "gamma"), "group_la": ("tau",), "cdt": ("gamma",)}  # loss_tables' options


def options(init, **values):
    """The options among ``values`` that ``init`` uses (giving it another raises)."""
    return {name: value for name, value in values.items() if name in USES.get(init, ())}


# ------------------------------------------------ tables of section 1

def expected_tables(counts, init, tau, gamma):
    """docs/math.md section 1 / losses.py docstrings, element by element in float64."""
    cells = [list(map(float, row)) for row in (counts if isinstance(counts[0], list) else [counts])]
    G, K = len(cells), len(cells[0])
    n_k = [sum(cells[g][k] for g in range(G)) for k in range(K)]
    total = sum(n_k)
    prior = [n / total for n in n_k]
    n_max = max(n_k)
    W = [[1.0] * K for _ in range(G)]
    S = [[1.0] * K for _ in range(G)]
    L = [[0.0] * K for _ in range(G)]
    for g in range(G):
        n_g = sum(cells[g])
        for k in range(K):
            if init == "balanced":
                W[g][k] = 1.0 / (K * prior[k])
            if init in ("la", "vs"):
                L[g][k] = tau * math.log(prior[k])
            if init in ("cdt", "vs"):
                S[g][k] = (n_k[k] / n_max) ** gamma
            if init == "group_la":
                W[g][k] = 1.0 / (G * n_g / total)
                L[g][k] = tau * math.log(cells[g][k] / n_g)
            if init == "group_balanced":
                W[g][k] = 1.0 / (G * K * cells[g][k] / total)
    return [torch.tensor(t, dtype=torch.float64) for t in (W, S, L)]


@st.composite
def counts_for(draw, init):
    K = draw(st.integers(1, 30))
    G = draw(st.integers(2, 4)) if init == "group_la" else draw(st.sampled_from([None, 1, 2, 3]))
    low = 0 if init == "ce" else 1  # every other init needs positive counts
    cell = st.integers(low, 10000)
    if G is None:
        counts = draw(st.lists(cell, min_size=K, max_size=K))
        if sum(counts) == 0:
            counts[0] = 1
        return counts
    rows = draw(st.lists(st.lists(cell, min_size=K, max_size=K), min_size=G, max_size=G))
    if sum(map(sum, rows)) == 0:
        rows[0][0] = 1
    return rows


@pytest.mark.parametrize("init", INITS)
@settings(max_examples=examples(20))
@given(data=st.data(), tau=st.floats(0.1, 2.0), gamma=st.floats(0.0, 1.0))
def test_from_counts_builds_the_tables_of_math_md(init, data, tau, gamma):
    counts = data.draw(counts_for(init), label="counts")
    W, S, L = expected_tables(counts, init, tau, gamma)
    G, K = W.shape
    module = ParametricCE.from_counts(counts, init, **options(init, tau=tau, gamma=gamma))
    tables = module.tables()
    assert isinstance(tables, LossTables)
    direct = loss_tables(counts, init, **options(init, tau=tau, gamma=gamma))
    assert module.num_groups == G and module.num_classes == K
    for name, got, got_direct, exp in zip(("weight", "scale", "shift"), tables, direct, (W, S, L)):
        assert got.shape == (G, K) and got_direct.shape == (G, K), name
        assert got.dtype == torch.float32 and got_direct.dtype == torch.float32, name
        torch.testing.assert_close(got_direct.double(), exp, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(got.double(), exp, rtol=1e-6, atol=1e-6, msg=name)


def test_known_tables_by_hand():
    counts = [60, 30, 10]
    W, S, L = loss_tables(counts, "balanced")
    torch.testing.assert_close(W, torch.tensor([[1 / 1.8, 1 / 0.9, 1 / 0.3]]))
    W, S, L = loss_tables(counts, "vs", tau=2.0, gamma=0.5)
    torch.testing.assert_close(S, torch.tensor([[1.0, 0.5 ** 0.5, (1 / 6) ** 0.5]]))
    torch.testing.assert_close(L, 2 * torch.tensor([[0.6, 0.3, 0.1]]).log())
    W, S, L = loss_tables([[30, 10], [10, 50]], "group_la")
    torch.testing.assert_close(W, torch.tensor([[1 / (2 * 0.4)] * 2, [1 / (2 * 0.6)] * 2]))
    torch.testing.assert_close(L, torch.tensor([[0.75, 0.25], [1 / 6, 5 / 6]]).log())
    # balanced weights average to 1 over the training samples
    n = torch.tensor(counts, dtype=torch.float32)
    W, _, _ = loss_tables(counts, "balanced")
    torch.testing.assert_close((W[0] * n).sum() / n.sum(), torch.tensor(1.0))
    # (group, class)-balanced: W[g, k] = 1 / (G K pi[g, k]); with one group, the class-balanced weights
    W, S, L = loss_tables([[30, 10], [10, 50]], "group_balanced")
    torch.testing.assert_close(W, 100 / (4 * torch.tensor([[30.0, 10.0], [10.0, 50.0]])))
    assert torch.equal(S, torch.ones(2, 2)) and torch.equal(L, torch.zeros(2, 2))
    torch.testing.assert_close(loss_tables(counts, "group_balanced").weight, loss_tables(counts, "balanced").weight)
    with pytest.raises(ValueError, match="init='group_balanced' needs every count to be positive"):
        loss_tables([[3, 0], [1, 2]], "group_balanced")


def test_la_temperature_is_la_with_a_learnable_tau():
    counts = torch.tensor([[40, 10, 5], [20, 20, 5]])
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(12, 3, generator=g), torch.randint(0, 3, (12,), generator=g)
    group = torch.randint(0, 2, (12,), generator=g)
    module = autobalance.LATemperature(counts, tau=0.5)
    assert [n for n, _ in module.named_parameters()] == ["tau"]
    la = loss_tables(counts, "la", tau=0.5)
    for got, expected in zip(module.tables(), la):
        torch.testing.assert_close(got, expected)
    loss = module(logits, target, group)
    torch.testing.assert_close(loss, pce(logits, target, *la, group))
    # d loss / d tau = sum_k (d loss / d L[g, k]) log pi_k
    shift = la.shift.clone().requires_grad_(True)
    grad_shift = torch.autograd.grad(pce(logits, target, la.weight, la.scale, shift, group), shift)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, module.tau)[0], (grad_shift * la.shift / 0.5).sum())
    summed = autobalance.LATemperature(counts, 0.5, reduction="sum")(logits, target, group)
    torch.testing.assert_close(summed, pce(logits, target, *la, group, reduction="sum"))
    with pytest.raises(ValueError, match="`tau` must be a finite float"):
        autobalance.LATemperature(counts, tau=float("nan"))


def test_group_dro_cells_are_group_by_class():
    dro = autobalance.GroupDRO(num_classes=3, num_groups=2, step_size=1.0)
    assert dro.cell_weights.shape == (2, 3)
    logits = torch.zeros(2, 3)
    logits[0, 0] = -5.0  # sample 0 (group 1, class 0) is badly wrong, sample 1 (group 0, class 2) is not
    target, group = torch.tensor([0, 2]), torch.tensor([1, 0])
    dro(logits, target, group)
    q = dro.cell_weights
    # only the two present cells moved, and the wrong one most: q[1, 0] > q[0, 2] > the absent cells
    assert q[1, 0] > q[0, 2] > q[0, 0] and torch.allclose(q.sum(), torch.tensor(1.0))
    absent = [q[0, 0], q[0, 1], q[1, 1], q[1, 2]]
    assert all(torch.equal(a, absent[0]) for a in absent)
    with pytest.raises(ValueError, match="`step_size` must be a positive finite float"):
        autobalance.GroupDRO(3, 2, step_size=0.0)


# ------------------------------------------------- frequency clusters

@settings(max_examples=examples(40))
@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=60), size=st.integers(1, 12),
       groups=st.integers(0, 3))
def test_frequency_clusters_sort_and_chunk(counts, size, groups):
    K = len(counts)
    if groups:  # [G, K] counts are summed over groups
        split = torch.tensor(counts)[None].repeat(groups, 1)
        split[0] -= split[0] // 2
        split[1:] = 0
        split[-1] += torch.tensor(counts) // 2
        assert torch.equal(split.sum(0), torch.tensor(counts))
        clusters = frequency_clusters(split, size)
    else:
        clusters = frequency_clusters(counts, size)
    assert clusters.dtype == torch.int64 and clusters.shape == (K,)
    order = sorted(range(K), key=lambda k: (-counts[k], k))  # descending count, ties by index
    expected = torch.empty(K, dtype=torch.long)
    for rank, k in enumerate(order):
        expected[k] = rank // size
    assert torch.equal(clusters, expected)
    assert int(clusters.max()) + 1 == math.ceil(K / size)
    sizes = torch.bincount(clusters).tolist()
    assert sizes[:-1] == [size] * (len(sizes) - 1) and 1 <= sizes[-1] <= size


def test_frequency_clusters_example():
    assert frequency_clusters([5, 100, 7, 100, 1], 2).tolist() == [1, 0, 1, 0, 2]
    assert frequency_clusters([5, 100, 7, 100, 1], 1).tolist() == [3, 0, 2, 1, 4]
    assert frequency_clusters([5, 100, 7, 100, 1], 5).tolist() == [0] * 5
    assert frequency_clusters([5, 100, 7, 100, 1], 9).tolist() == [0] * 5


def test_frequency_clusters_min_count_example():
    # long-tailed MNIST's validation counts: the four rarest classes (4 + 2 + 1 + 1) share one cluster
    val = [80, 48, 29, 17, 10, 6, 4, 2, 1, 1]
    assert frequency_clusters(val, min_count=5).tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 6, 6]
    assert frequency_clusters(val, 2, min_count=5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    assert frequency_clusters([5, 100, 7, 100, 1], min_count=8).tolist() == [2, 0, 2, 1, 2]
    assert frequency_clusters([1, 1, 1], min_count=5).tolist() == [0, 0, 0]  # too few for two clusters
    assert frequency_clusters([3, 9, 1], min_count=4).tolist() == [1, 0, 1]  # the head never stands alone short


@settings(max_examples=examples(40))
@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=40), size=st.integers(1, 5),
       min_count=st.floats(0.5, 60))
def test_frequency_clusters_min_count(counts, size, min_count):
    clusters = frequency_clusters(counts, size, min_count=min_count)
    chunks = frequency_clusters(counts, size)
    K = len(counts)
    # contiguous merges of the plain chunks, in frequency order
    order = sorted(range(K), key=lambda k: (-counts[k], k))
    ranks = [int(clusters[k]) for k in order]
    assert ranks[0] == 0 and all(b - a in (0, 1) for a, b in zip(ranks, ranks[1:]))
    assert all(chunks[a] != chunks[b] or clusters[a] == clusters[b] for a in range(K) for b in range(K))
    sums = torch.zeros(int(clusters.max()) + 1, dtype=torch.float64).index_add_(
        0, clusters, torch.tensor(counts, dtype=torch.float64))
    if len(sums) > 1:
        assert (sums >= min_count).all()  # every cluster holds min_count examples, or there is one cluster
    # nothing merged that did not need it: a cluster of several chunks falls short without its most frequent one
    for c in range(1, int(clusters.max()) + 1):
        members = sorted({int(chunks[k]) for k in range(K) if clusters[k] == c})
        rest = sum(counts[k] for k in range(K) if clusters[k] == c and chunks[k] != members[0])
        assert len(members) == 1 or rest < min_count


def _randomize_parameters(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))


def _offsets(module):
    """The learned part of each effective table, [G, K]."""
    W, S, L = (t.detach().double() for t in module.tables())
    scale_logit = torch.logit(S / module.scale_max)
    return (W - module.base_weight.double(), scale_logit - module.base_scale_logit.double(),
            L - module.base_shift.double())


@pytest.mark.parametrize("G,group_params", [(1, None), (3, True), (3, False)])
@pytest.mark.parametrize("size", [1, 3, 4, 7])
def test_cluster_size_shares_offsets_within_a_cluster(size, G, group_params):
    K = 13
    counts = torch.randint(1, 500, (G, K), generator=torch.Generator().manual_seed(size))
    module = ParametricCE.from_counts(counts if G > 1 else counts[0], "la", clusters=size,
                                      learn=("weight", "scale", "shift"), group_params=group_params)
    clusters = frequency_clusters(counts, size)
    assert torch.equal(module.clusters, clusters)
    K_prime = math.ceil(K / size)
    assert module.num_clusters == K_prime
    rows = G if (group_params or (group_params is None and G > 1)) else 1
    for name in ("weight_param", "scale_param", "shift_param"):
        assert getattr(module, name).shape == (rows, K_prime), name
    _randomize_parameters(module, seed=size)
    for name, offset in zip(("weight", "scale", "shift"), _offsets(module)):
        assert offset.shape == (G, K)
        for c in range(K_prime):
            members = offset[:, clusters == c]
            torch.testing.assert_close(members, members[:, :1].expand_as(members), rtol=0, atol=2e-6,
                                       msg=f"{name}: cluster {c}")
        if K_prime > 1:  # different clusters do get different offsets
            firsts = torch.stack([offset[0, clusters == c][0] for c in range(K_prime)])
            assert len(set(firsts.tolist())) == K_prime, name
        if G > 1:
            same_across_groups = torch.allclose(offset, offset[:1].expand_as(offset), atol=1e-6)
            assert same_across_groups == (rows == 1), name


def test_explicit_cluster_map():
    clusters = torch.tensor([0, 3, 3, 0, 1, 3])
    module = ParametricCE(6, clusters, learn=("scale", "shift"))
    assert module.num_clusters == 4
    assert module.scale_param.shape == (1, 4) and module.shift_param.shape == (1, 4)
    with torch.no_grad():
        module.shift_param.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        module.scale_param.copy_(torch.tensor([[0.5, -1.0, 0.0, 2.0]]))
    _, scale_offset, shift_offset = _offsets(module)
    torch.testing.assert_close(shift_offset[0], torch.tensor([1.0, 4.0, 4.0, 1.0, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(scale_offset[0], torch.tensor([0.5, 2.0, 2.0, 0.5, -1.0, 2.0], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    clusters[0] = 2  # the module keeps its own copy
    assert module.clusters[0] == 0


def test_default_is_one_cluster_per_class_and_learns_scale_and_shift():
    module = ParametricCE(7)
    assert torch.equal(module.clusters, torch.arange(7)) and module.num_clusters == 7
    assert sorted(n for n, _ in module.named_parameters()) == ["scale_param", "shift_param"]
    assert module.scale_param.shape == (1, 7)
    W, S, L = module.tables()
    assert torch.equal(W, torch.ones(1, 7)) and torch.equal(S, torch.ones(1, 7)) and torch.equal(L, torch.zeros(1, 7))


@pytest.mark.parametrize("learn", [(), ("weight",), ("shift",), "scale", ("shift", "weight", "scale")])
def test_learn_selects_parameters(learn):
    module = ParametricCE(5, learn=learn)
    wanted = {learn} if isinstance(learn, str) else set(learn)
    assert {n[:-len("_param")] for n, _ in module.named_parameters()} == wanted
    _randomize_parameters(module)
    offsets = dict(zip(("weight", "scale", "shift"), _offsets(module)))
    for name, offset in offsets.items():
        assert bool((offset.abs() > 1e-3).any()) == (name in wanted), name


@pytest.mark.parametrize("G,group_params,rows", [(1, None, 1), (1, True, 1), (4, None, 4), (4, True, 4),
                                                 (4, False, 1)])
def test_group_params_shapes(G, group_params, rows):
    module = ParametricCE(6, num_groups=G, group_params=group_params, learn=("weight", "scale", "shift"))
    for param in module.parameters():
        assert param.shape == (rows, 6)
    for table in module.tables():
        assert table.shape == (G, 6)


def test_scales_stay_inside_the_interval():
    module = ParametricCE(50, scale_max=1.5, scale=torch.linspace(0.1, 1.4, 50))
    with torch.no_grad():
        module.scale_param.copy_(torch.linspace(-8, 8, 50)[None])
    S = module.tables().scale
    assert bool(((S > 0) & (S < 1.5)).all())


# ------------------------------------------------------------ the loss

def _batch(K, G, N=64, seed=0, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, K, generator=gen) * 2
    target = torch.randint(0, K, (N,), generator=gen)
    if ignore:
        target[::7] = -100
    group = torch.randint(0, G, (N,), generator=gen) if G > 1 else None
    return logits, target, group


COUNTS_1D = [500, 200, 90, 40, 12, 5, 2]
COUNTS_2D = [[300, 20, 50, 10, 4, 2, 1], [200, 180, 40, 30, 8, 3, 1]]


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_starts_exactly_at_its_initial_loss(init, reduction):
    counts = COUNTS_2D if init == "group_la" else COUNTS_1D
    module = ParametricCE.from_counts(counts, init, **options(init, tau=1.3, gamma=0.3), clusters=2,
                                      reduction=reduction)
    tables = loss_tables(counts, init, **options(init, tau=1.3, gamma=0.3))
    logits, target, group = _batch(7, tables.weight.shape[0])
    got = module(logits, target, group)
    expected = pce(logits, target, *tables, group, reduction=reduction)
    if init in ("cdt", "vs"):  # the scales pass through logit and sigmoid
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, expected)
        assert torch.equal(module.tables().scale, tables.scale)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_mean_is_sum_over_total_weight(backend):
    counts = COUNTS_2D
    module = ParametricCE.from_counts(counts, "group_la", backend=backend, learn=("weight", "scale", "shift"))
    _randomize_parameters(module)
    with torch.no_grad():
        module.weight_param.abs_()  # keep the weights positive
    logits, target, group = _batch(7, 2, N=80, seed=3)
    W = module.tables().weight.detach()
    module.reduction = "sum"
    total = module(logits, target, group)
    module.reduction = "none"
    per_row = module(logits, target, group)
    module.reduction = "mean"
    mean = module(logits, target, group)
    valid = target != -100
    denominator = W[group[valid], target[valid]].sum()
    torch.testing.assert_close(total, per_row.sum())
    torch.testing.assert_close(mean, total / denominator)
    assert torch.equal(per_row[~valid], torch.zeros(int((~valid).sum())))


def test_gradients_flow_to_every_parameter_and_match_the_reference_backend():
    losses, grads = [], []
    for backend in ("fused", "reference"):
        module = ParametricCE.from_counts(COUNTS_2D, "group_la", clusters=2, learn=("weight", "scale", "shift"),
                                          backend=backend)
        _randomize_parameters(module, seed=5)
        logits, target, group = _batch(7, 2, N=100, seed=4)
        logits.requires_grad_()
        loss = module(logits, target, group)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()} | {"logits": logits.grad})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert set(grads[0]) == {"weight_param", "scale_param", "shift_param", "logits"}
    for name in grads[0]:
        g = grads[0][name]
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    # gauge (docs/math.md section 2): a common shift of a group's L changes nothing,
    # so each group's shift gradient sums to zero over the (complete) clusters.
    shift_grad = grads[0]["shift_param"]
    assert (shift_grad.sum(1).abs() <= 1e-5 * shift_grad.abs().sum(1)).all()


def test_hypergradient_style_second_derivative_reaches_the_parameters():
    """d/d(params) <v, dloss/dlogits>: the mixed derivative used by the bilevel optimizer."""
    results = []
    for backend in ("fused", "reference"):
        module = ParametricCE.from_counts(COUNTS_1D, "vs", clusters=3, backend=backend)
        _randomize_parameters(module, seed=6)
        logits, target, _ = _batch(7, 1, N=50, seed=8)
        logits.requires_grad_()
        gz, = torch.autograd.grad(module(logits, target), logits, create_graph=True)
        v = torch.randn(gz.shape, generator=torch.Generator().manual_seed(9))
        results.append(torch.autograd.grad((gz * v).sum(), [module.scale_param, module.shift_param]))
    for a, b in zip(*results):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_double_precision_module():
    module = ParametricCE.from_counts(COUNTS_2D, "group_la", clusters=3, learn=("weight", "scale", "shift"))
    _randomize_parameters(module, seed=7)
    m64 = module.double()
    assert m64 is module
    for t in (*module.tables(), *module.parameters()):
        assert t.dtype == torch.float64
    logits, target, group = _batch(7, 2, N=60, seed=10)
    logits = logits.double().requires_grad_()
    loss = module(logits, target, group)
    assert loss.dtype == torch.float64
    W, S, L = (t.detach() for t in module.tables())
    expected = pce(logits.detach(), target, W, S, L, group, backend="reference")
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    for param in module.parameters():
        assert param.grad.dtype == torch.float64 and torch.isfinite(param.grad).all()
    # float32 logits still work with float64 tables (cast to the accumulation dtype)
    loss32 = module(logits.detach().float(), target, group)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss.detach(), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    clusters = torch.tensor([0, 1, 1, 2, 0, 2, 3])
    kwargs = dict(learn=("weight", "scale", "shift"), scale_max=3.0)
    module = ParametricCE.from_counts(COUNTS_2D, "group_la", clusters=clusters, **kwargs)
    assert module.num_groups == 2
    _randomize_parameters(module, seed=11)
    state = module.state_dict()
    assert {"clusters", "base_weight", "base_scale_logit", "base_shift", "weight_param", "scale_param",
            "shift_param"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = ParametricCE(7, torch.zeros(7, dtype=torch.long).index_fill_(0, torch.tensor([6]), 3), num_groups=2,
                         **kwargs)
    assert not torch.equal(fresh.tables().shift, module.tables().shift)
    fresh.load_state_dict(torch.load(buffer))
    for a, b in zip(fresh.tables(), module.tables()):
        assert torch.equal(a, b)
    assert torch.equal(fresh.clusters, clusters)
    logits, target, group = _batch(7, 2, seed=12)
    assert torch.equal(fresh(logits, target, group), module(logits, target, group))


def test_ignore_index_and_reduction_are_used():
    module = ParametricCE(5, ignore_index=3, reduction="none")
    logits, target, _ = _batch(5, 1, N=40, seed=13, ignore=False)
    loss = module(logits, target)
    assert loss.shape == (40,)
    assert bool((loss[target == 3] == 0).all()) and bool((loss[target != 3] > 0).all())
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, target, ignore_index=3,
                                                                       reduction="none"))


def test_ldam_moves_only_the_true_class_logit():
    counts = torch.tensor([100, 16, 1])
    ldam = autobalance.LDAMLoss(counts, max_margin=0.5, logit_multiplier=10.0)
    torch.testing.assert_close(ldam.margins, 0.5 * torch.tensor([100 ** -0.25, 16 ** -0.25, 1.0]))
    logits, target = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]), torch.tensor([2, 0])
    shifted = logits - torch.tensor([[0.0, 0.0, 0.5], [0.5 * 100 ** -0.25, 0.0, 0.0]])
    torch.testing.assert_close(ldam(logits, target), torch.nn.functional.cross_entropy(10.0 * shifted, target))
    with pytest.raises(ValueError, match="`logit_multiplier` must be a positive finite float"):
        autobalance.LDAMLoss(counts, logit_multiplier=0)


def test_group_la_honours_tau_and_unused_options_raise():
    cells = [[30, 10], [10, 50]]
    half = ParametricCE.from_counts(cells, "group_la", tau=0.5).tables()
    torch.testing.assert_close(half.shift, 0.5 * loss_tables(cells, "group_la").shift)
    assert not torch.equal(half.shift, ParametricCE.from_counts(cells, "group_la").tables().shift)
    for init, name in [("ce", "tau"), ("balanced", "tau"), ("cdt", "tau"), ("group_balanced", "tau"),
                       ("la", "gamma"), ("group_la", "gamma"), ("ce", "gamma")]:
        with pytest.raises(ValueError, match=rf"`{name}` is used by init in .* got {name}=0.5 with init='{init}'"):
            ParametricCE.from_counts(cells, init, **{name: 0.5})


@pytest.mark.parametrize("init, name", [("la", "tau"), ("vs", "tau"), ("group_la", "tau"), ("cdt", "gamma"),
                                        ("vs", "gamma")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "1", True])
def test_non_finite_options_raise(init, name, value):
    with pytest.raises(ValueError, match=rf"`{name}` must be a finite float, got {value!r}"):
        ParametricCE.from_counts([[30, 10], [10, 50]], init, **{name: value})


@pytest.mark.parametrize("table", ["weight", "scale", "shift"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e300])
@pytest.mark.parametrize("form", ["scalar", "[K]", "[G, K]"])
def test_non_finite_initial_tables_raise(table, bad, form):
    value = {"scalar": torch.tensor(bad, dtype=torch.float64), "[K]": torch.tensor([1.0, bad, 1.0],
             dtype=torch.float64), "[G, K]": torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, bad]], dtype=torch.float64)}
    where = {"scalar": [0, 0], "[K]": [0, 1], "[G, K]": [1, 2]}[form]
    with pytest.raises(ValueError, match=rf"initial `{table}` must be finite \(as float32\), got .* at "
                                         + re.escape(f"[g, k] = {where}")):
        ParametricCE(3, num_groups=2, **{table: value[form]})


def ldam_by_hand(logits, target, margins, s, weight=None, ignore_index=-100, reduction="mean"):
    """LDAM row by row in the logits' dtype: ``-w_y log softmax(s (z - m_y e_y))_y``."""
    losses, weights = [], []
    for z, y in zip(logits, target.tolist()):
        if y == ignore_index:
            losses.append(z.new_zeros(()))
            weights.append(0.0)
            continue
        a = s * z.clone()
        a[y] = a[y] - s * margins[y].to(z.dtype)
        w = 1.0 if weight is None else float(weight[y])
        losses.append(-w * (a[y] - torch.logsumexp(a, 0)))
        weights.append(w)
    losses = torch.stack(losses)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / sum(weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ldam_weight_ignore_index_reduction_and_dtypes(dtype, reduction):
    counts, weight = torch.tensor([100, 16, 3, 1]), torch.tensor([0.5, 1.0, 2.0, 3.0])
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 4, generator=g, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, -100, 3, 1, -100, 0])
    ldam = autobalance.LDAMLoss(counts, max_margin=0.5, logit_multiplier=5.0, weight=weight, reduction=reduction)
    got = ldam(logits, target, torch.zeros(9, dtype=torch.long))  # group is accepted and not used
    expected = ldam_by_hand(logits, target, ldam.margins, 5.0, weight, reduction=reduction)
    assert got.dtype == dtype and got.shape == expected.shape
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got, expected, **tolerance)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), logits)[0],
                               torch.autograd.grad(expected.sum(), logits)[0], **tolerance)
    if reduction == "none":
        assert bool((got[target == -100] == 0).all())
    other = autobalance.LDAMLoss(counts, weight=weight, ignore_index=2, logit_multiplier=5.0)
    torch.testing.assert_close(other(logits, target.clamp_min(0)),
                               ldam_by_hand(logits, target.clamp_min(0), other.margins, 5.0, weight, ignore_index=2),
                               **tolerance)


def test_ldam_bad_inputs_raise_clear_errors():
    counts = [100, 16, 1]
    with pytest.raises(ValueError, match=r"`weight` must be a \[K\] = \[3\] tensor of finite non-negative"):
        autobalance.LDAMLoss(counts, weight=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"`weight` must be a \[K\] = \[3\] tensor of finite non-negative"):
        autobalance.LDAMLoss(counts, weight=[1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"`reduction` must be one of"):
        autobalance.LDAMLoss(counts, reduction="avg")
    ldam = autobalance.LDAMLoss(counts)
    with pytest.raises(ValueError, match=r"`logits` must be a floating-point \[N, K\] = \[N, 3\] tensor, got "
                                         r"torch.float32 of shape \[2, 4\]"):
        ldam(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`target` must be an int64 tensor of shape \[N\] = \[2\]"):
        ldam(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(IndexError, match=r"`target` must hold classes in \[0, 3\), got values in \[0, 3\]"):
        ldam(torch.zeros(2, 3), torch.tensor([0, 3]))
