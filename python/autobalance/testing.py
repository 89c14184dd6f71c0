"""``check_hypergrad``: compares ``BilevelOptimizer``'s hypergradients with the
exact ones of a problem solved to optimality (docs/math.md section 5, "Checking it")."""
import copy
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from autobalance._validation import check_int
from autobalance.bilevel.optimizer import BilevelOptimizer, augment_seed, fix_shift_gauge, hyperparameters
from autobalance.bilevel.products import call_loss, flat, flat_grad, split


@dataclass
class HypergradCheck:
    """The exact implicit hypergradient, the ``BilevelOptimizer`` estimate and
    (optionally) central finite differences, as flat float64 vectors over the
    criterion's learnable parameters. With mini-batch draws, ``estimate`` is the
    first draw's and ``draws`` holds every draw's, ``[draws, P]``."""
    exact: torch.Tensor
    estimate: torch.Tensor
    finite_difference: Optional[torch.Tensor] = None
    draws: Optional[torch.Tensor] = None

    @staticmethod
    def _compare(a, b):
        cosine = float(torch.dot(a, b) / (a.norm() * b.norm()))
        return cosine, float((a - b).norm() / b.norm())

    @property
    def cosine(self) -> float:
        return self._compare(self.estimate, self.exact)[0]

    @property
    def relative_error(self) -> float:
        """``|estimate - exact| / |exact|``."""
        return self._compare(self.estimate, self.exact)[1]

    @property
    def draw_cosines(self) -> torch.Tensor:
        """The cosine of every draw's estimate with the exact hypergradient, ``[draws]``."""
        draws = self.estimate[None] if self.draws is None else self.draws
        return draws @ self.exact / (draws.norm(dim=1) * self.exact.norm())

    @property
    def fd_cosine(self) -> float:
        return self._compare(self.exact, self.finite_difference)[0]

    @property
    def fd_relative_error(self) -> float:
        """``|exact - finite_difference| / |finite_difference|``."""
        return self._compare(self.exact, self.finite_difference)[1]


def _unpack(batch, name):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(f"autobalance: `{name}` must be (features, target) or (features, target, group)")
    return (*batch, None)[:3]


def check_hypergrad(criterion: nn.Module, objective, train: Sequence[torch.Tensor], val: Sequence[torch.Tensor], *,
                    l2: float = 1e-2, finite_differences: bool = False, fd_step: float = 1e-4,
                    batch_size: Union[int, Tuple[int, int], None] = None, batches: Tuple[int, int] = (1, 1), draws: int = 1,
                    seed: int = 0, augment: Optional[nn.Module] = None, **options) -> HypergradCheck:
    """Checks ``BilevelOptimizer``'s hypergradient against the exact one (docs/math.md section 5).

    The inner problem is L2-regularised multinomial logistic regression on
    ``train = (features [N, D], target[, group])``: ``theta = W [K, D]`` minimises
    ``criterion(x W^T, y[, g]) + l2/2 |W|^2``, solved to optimality by Newton's
    method in float64 with the dense Hessian. The exact hypergradient of
    ``objective`` on ``val`` is then a linear solve. The estimate is
    ``BilevelOptimizer(SGD(W, weight_decay=l2), criterion, objective, **options)
    .hypergradient`` at the optimum, with the same ``train`` / ``val`` batch. With
    ``finite_differences``, it also returns central differences (step ``fd_step``)
    of the re-solved validation loss along every coordinate of alpha.

    With ``batch_size``, the estimate is the one a hyper-step during training makes:
    it averages ``batches = (n_train, n_val)`` mini-batches of ``batch_size`` rows
    (or of ``batch_size = (train_rows, val_rows)``; each drawn at random without replacement from ``train`` / ``val``, generator
    seeded with ``seed``), while the exact hypergradient still uses all the rows;
    ``draws`` such estimates are made (``HypergradCheck.draws``, ``draw_cosines``).

    With ``augment`` (e.g. ``SphericalAugment``), the training features are
    augmented with one fixed draw (the one ``BilevelOptimizer``'s first hyper-step
    makes for its first batch), and the augmentation's learnable strengths are
    hyperparameters too, after the criterion's (the whole batch only: no
    ``batch_size``).

    ``criterion`` (a ``ParametricCE``) and ``augment`` are copied and cast to
    float64; the originals are not changed. The exact hypergradient gets the same shift-gauge projection
    as the estimate; the finite differences get none (they are gauge-free).
    """
    if batch_size is not None:
        pair = batch_size if isinstance(batch_size, (tuple, list)) else (batch_size, batch_size)
        if len(pair) != 2:
            raise ValueError(f"autobalance: `batch_size` must be an int or a pair (train_rows, val_rows), got "
                             f"{batch_size!r}")
        batch_size = tuple(check_int(b, "batch_size", 1) for b in pair)
    if not isinstance(batches, (tuple, list)) or len(batches) != 2:
        raise ValueError(f"autobalance: `batches` must be a pair (n_train, n_val), got {batches!r}")
    batches = tuple(check_int(n, f"batches[{i}]", 1) for i, n in enumerate(batches))
    check_int(draws, "draws", 1)
    if batch_size is None and (batches != (1, 1) or draws != 1):
        raise ValueError("autobalance: `batches` and `draws` need a `batch_size` (without one the estimate uses "
                         "all of `train` and `val` as one batch)")
    if augment is not None and batch_size is not None:
        raise ValueError("autobalance: `augment` needs the whole batch (no `batch_size`): the exact hypergradient "
                         "uses the one draw of the estimate's single batch")
    criterion = copy.deepcopy(criterion).double()
    augment = None if augment is None else copy.deepcopy(augment).double().train()
    x, y, g = _unpack(train, "train")
    xv, yv, gv = _unpack(val, "val")
    x, xv = x.double(), xv.double()
    classes, features = criterion.num_classes, x.shape[1]
    names, hyper = hyperparameters(criterion, augment)
    def train_features():  # BilevelOptimizer's first draw (of batch 0)
        draw = torch.Generator().manual_seed(augment_seed(0, 0))
        return x if augment is None else call_loss(augment, x, y, g, generator=draw)

    def regularised_train_loss(w):  # the l2 term does not depend on alpha
        return call_loss(criterion, train_features() @ w.view(classes, features).T, y, g) + 0.5 * l2 * w.dot(w)

    def val_loss(w):
        return call_loss(objective, xv @ w.view(classes, features).T, yv, gv)

    def gradient_and_hessian(w):
        w = w.detach().requires_grad_(True)
        grad = torch.autograd.grad(regularised_train_loss(w), w, create_graph=True)[0]
        return w, grad, torch.stack([torch.autograd.grad(grad[i], w, retain_graph=True)[0] for i in range(w.numel())])

    def solve(w):
        for _ in range(100):
            w, grad, hessian = gradient_and_hessian(w)
            step = torch.linalg.solve(hessian, grad.detach())
            w = w.detach() - step
            if float(step.norm()) <= 1e-12 * (1.0 + float(w.norm())):
                return w
        raise RuntimeError("autobalance: check_hypergrad: Newton's method did not converge; increase `l2`")

    w_star = solve(torch.zeros(classes * features, dtype=torch.float64))

    # exact: p = H^-1 grad L_V, hypergrad = -d/dalpha <grad_theta L_T, p>
    w, grad, hessian = gradient_and_hessian(w_star)
    p = torch.linalg.solve(hessian, torch.autograd.grad(val_loss(w), w)[0])
    exact = fix_shift_gauge(criterion, names, split(-flat_grad([grad], hyper, [p]), hyper))

    model = nn.Linear(features, classes, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star.view(classes, features))
    bopt = BilevelOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=l2), criterion, objective,
                            augment=augment, **options)
    whole = [(x, y, g)[:3 if g is not None else 2]], [(xv, yv, gv)[:3 if gv is not None else 2]]
    generator = torch.Generator().manual_seed(seed)

    def minibatches(data, n, size):
        rows = data[0][0].shape[0]
        picks = [torch.randperm(rows, generator=generator)[:size] for _ in range(n)]
        return [tuple(t[i] for t in data[0]) for i in picks]

    estimates = []
    for _ in range(draws):
        pair = whole if batch_size is None else tuple(minibatches(part, n, size) for part, n, size
                                                       in zip(whole, batches, batch_size))
        estimates.append(flat(bopt.hypergradient(model, *pair)).double())

    fd = None
    if finite_differences:
        columns = []
        for q in hyper:
            entries = q.detach().view(-1)
            for j in range(entries.numel()):
                values = []
                for sign in (1.0, -1.0):
                    entries[j] += sign * fd_step
                    values.append(float(val_loss(solve(w_star)).detach()))
                    entries[j] -= sign * fd_step
                columns.append((values[0] - values[1]) / (2 * fd_step))
        fd = torch.tensor(columns, dtype=torch.float64)
    return HypergradCheck(flat(exact).double(), estimates[0], fd, torch.stack(estimates) if draws > 1 else None)
