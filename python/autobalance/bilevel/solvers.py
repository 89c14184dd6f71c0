"""Solvers for ``p ~ H^-1 b`` (docs/math.md section 5), the linear solve of the implicit
hypergradient. Each is a small object that captures its options at construction
and has one method::

    x, state = solver.solve(matvec, b, state)

``matvec(v)`` is ``H v`` for a flat vector ``v`` shaped like ``b``; ``state`` is the
``SolverState`` the previous solve returned (or None), and the returned state is the
one to pass to the next solve. Regularisation wraps the matvec (``ridge``) instead of
being an option of every solver.
"""
import math
from typing import Callable, NamedTuple, Optional, Protocol, Tuple, Union, runtime_checkable

import torch

from autobalance._validation import check_int, check_non_negative, check_positive

Matvec = Callable[[torch.Tensor], torch.Tensor]


class SolverState(NamedTuple):
    """What a solve leaves for the next: the power-iteration estimate of ``H``'s
    largest eigenvalue and its eigenvector (None before the first estimate), and
    ``solves``, how many solves the state has been carried through (it times the
    estimate's refreshes; ``BilevelOptimizer`` keeps the state of applied hyper-steps
    only, so there it counts them). ``corrections`` (restarts of the Neumann series with a
    corrected step size), ``step_size`` (the Neumann / first-order ``eta``; None
    for CG) and ``residual`` (CG's relative residual ``|b - H x| / |b|``, NaN when a
    product was not finite; None for the others) describe the solve that returned
    this state."""
    eigenvector: Optional[torch.Tensor] = None
    eigenvalue: Optional[float] = None
    solves: int = 0
    corrections: int = 0
    step_size: Optional[float] = None
    residual: Optional[float] = None


@runtime_checkable
class Solver(Protocol):
    def solve(self, matvec: Matvec, b: torch.Tensor,
              state: Optional[SolverState] = None) -> Tuple[torch.Tensor, SolverState]:
        ...


def ridge(matvec: Matvec, coefficients: Optional[torch.Tensor]) -> Matvec:
    """``v -> matvec(v) + coefficients * v``: the ridge of the inner problem (from the
    wrapped optimizer's weight decay, ``BilevelOptimizer(ridge=...)``) added to ``H``;
    ``matvec`` itself when ``coefficients`` is None."""
    if coefficients is None:
        return matvec
    return lambda v: matvec(v) + coefficients * v


def _step_size(value):
    if isinstance(value, str) and value == "auto":
        return value
    try:
        return check_positive(value, "step_size")
    except ValueError:
        raise ValueError(f"autobalance: `step_size` must be 'auto' or a positive finite float, got {value!r}") \
            from None


class Neumann:
    """``terms`` (``J``) terms of the Neumann series with step ``eta = step_size``
    (docs/math.md section 5)::

        v <- b ;  p <- v ;  repeat J times: v <- v - eta (H v) ;  p <- p + v ;  x = eta p

    ``step_size="auto"`` (default) sets ``eta = 1 / lambda_max(H)``, estimated by power
    iteration: ``power_iterations`` steps at the first solve, then one step
    warm-started from the previous eigenvector at every ``power_refresh_every``-th
    solve (counted by ``SolverState.solves``; the solves in between reuse the last
    estimate). A refresh costs
    one Hessian-vector product; ``power_refresh_every=1`` refreshes at every solve.
    The series converges as long as the true ``lambda_max`` stays below twice the
    estimate (``0 < eta lambda_max < 2``); every Hessian-vector product checks it:
    where ``|H u| / |u| > 2 / eta`` for a term ``u`` the estimate is stale, so
    ``lambda`` becomes that ratio (and ``u`` the eigenvector) and the series restarts,
    at most ``MAX_STEP_SIZE_CORRECTIONS`` times a solve (``SolverState.corrections``
    counts them). Without this check a stale estimate lets the series grow like
    ``|1 - eta lambda_max|^J``. The published configuration is
    ``Neumann(terms=5, step_size=1.0)``.
    """

    MAX_STEP_SIZE_CORRECTIONS = 3

    def __init__(self, terms: int = 5, step_size: Union[str, float] = "auto", power_iterations: int = 5,
                 power_refresh_every: int = 10):
        self.terms = check_int(terms, "terms", 0)
        self.step_size = _step_size(step_size)
        self.power_iterations = check_int(power_iterations, "power_iterations", 1)
        self.power_refresh_every = check_int(power_refresh_every, "power_refresh_every", 1)

    def _options(self):
        refresh = (f", power_iterations={self.power_iterations}, power_refresh_every={self.power_refresh_every}"
                   if self.step_size == "auto" else "")
        return f"step_size={self.step_size!r}{refresh}"

    def __repr__(self) -> str:
        return f"Neumann(terms={self.terms}, {self._options()})"

    def _power_iteration(self, matvec, like, start):
        """``(lambda, u)``: ``lambda = |H u|`` for the unit ``u`` after the power iterations
        from ``start`` (a lower bound on ``lambda_max``); ``(nan, None)`` if it is not
        positive and finite."""
        u, iterations = start, 1
        if u is None or u.shape != like.shape:
            generator = torch.Generator().manual_seed(0)  # the same start on every rank
            u = torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
            iterations = self.power_iterations
        u = u / u.norm()
        for _ in range(iterations):
            w = matvec(u)
            eigenvalue = w.norm()
            u = w / eigenvalue
        eigenvalue = float(eigenvalue)
        if not (math.isfinite(eigenvalue) and eigenvalue > 0):
            return math.nan, None
        return eigenvalue, u

    def _eta(self, matvec, b, state):
        """``(eta, state)``: the fixed ``step_size``, or ``1 / lambda`` with ``lambda``
        refreshed by power iteration when due (and whenever there is no estimate yet),
        else the saved one."""
        if self.step_size != "auto":
            return self.step_size, state
        if (state.eigenvector is None or state.eigenvector.shape != b.shape or state.eigenvalue is None
                or state.solves % self.power_refresh_every == 0):
            eigenvalue, u = self._power_iteration(matvec, b, state.eigenvector)
            state = state._replace(eigenvector=u, eigenvalue=eigenvalue)
        return 1.0 / state.eigenvalue, state

    def solve(self, matvec: Matvec, b: torch.Tensor,
              state: Optional[SolverState] = None) -> Tuple[torch.Tensor, SolverState]:
        state = SolverState() if state is None else state
        eta, state = self._eta(matvec, b, state)
        corrections = 0
        term, p, j = b, b.clone(), 0
        while j < self.terms:
            h = matvec(term)
            if self.step_size == "auto" and corrections < self.MAX_STEP_SIZE_CORRECTIONS:
                # |H u| / |u| <= lambda_max for any u: a ratio above 2 / eta shows a direction in
                # which (I - eta H) expands, i.e. a stale lambda. Restart with that ratio as lambda.
                # (A zero term gives inf or nan: no restart. One host sync per product.)
                ratio = float(torch.linalg.vector_norm(h) / torch.linalg.vector_norm(term))
                if math.isfinite(ratio) and eta * ratio > 2.0:
                    eta = 1.0 / ratio
                    state = state._replace(eigenvector=term / term.norm(), eigenvalue=ratio)
                    corrections += 1
                    term, p, j = b, b.clone(), 0
                    continue
            term = term - eta * h
            p += term
            j += 1
        return eta * p, state._replace(solves=state.solves + 1, corrections=corrections, step_size=eta)


class FirstOrder(Neumann):
    """``x = eta b`` (``H^-1 ~ eta I``, DARTS-style): the Neumann series without
    terms, with its step size (``"auto"``: ``1 / lambda_max`` by power iteration)."""

    def __init__(self, step_size: Union[str, float] = "auto", power_iterations: int = 5,
                 power_refresh_every: int = 10):
        super().__init__(0, step_size, power_iterations, power_refresh_every)

    def __repr__(self) -> str:
        return f"FirstOrder({self._options()})"


class ConjugateGradient:
    """Conjugate gradient on ``H x = b`` from ``x = 0``: at most ``iterations``
    iterations, stopping at relative residual ``tol`` or at a direction of
    non-positive curvature. The state passes through unchanged (but for ``solves``);
    ``SolverState.residual`` is the relative residual reached, NaN when ``b`` or a
    product (a curvature ``d^T H d``) was not finite: then ``x`` is where CG
    stopped, not a solution."""

    def __init__(self, iterations: int = 10, tol: float = 1e-6):
        self.iterations = check_int(iterations, "iterations", 1)
        self.tol = check_non_negative(tol, "tol")

    def __repr__(self) -> str:
        return f"ConjugateGradient(iterations={self.iterations}, tol={self.tol})"

    def solve(self, matvec: Matvec, b: torch.Tensor,
              state: Optional[SolverState] = None) -> Tuple[torch.Tensor, SolverState]:
        state = SolverState() if state is None else state
        x = torch.zeros_like(b)
        r, d = b.clone(), b.clone()
        rs = torch.dot(r, r)
        norm = float(b.norm())
        stop, residual = (self.tol * norm) ** 2, None
        for _ in range(self.iterations):
            if float(rs) <= stop:
                break
            hd = matvec(d)
            curvature = float(torch.dot(d, hd))
            if not math.isfinite(curvature):
                residual = math.nan
                break
            if not curvature > 0:
                break
            a = rs / curvature
            x += a * d
            r -= a * hd
            rs_next = torch.dot(r, r)
            d = r + (rs_next / rs) * d
            rs = rs_next
        if residual is None:
            residual = math.sqrt(float(rs)) / norm if norm > 0 else (0.0 if math.isfinite(norm) else math.nan)
        return x, state._replace(solves=state.solves + 1, corrections=0, step_size=None, residual=residual)


# the solver names of BilevelOptimizer(solver=...), and its keyword options each takes: option -> parameter
SOLVERS = {"neumann": (Neumann, {"neumann_terms": "terms", "step_size": "step_size",
                                 "power_iterations": "power_iterations", "power_refresh_every": "power_refresh_every"}),
           "cg": (ConjugateGradient, {"cg_iterations": "iterations", "cg_tol": "tol"}),
           "first_order": (FirstOrder, {"step_size": "step_size", "power_iterations": "power_iterations",
                                        "power_refresh_every": "power_refresh_every"})}


def make_solver(solver, **options) -> Solver:
    """The solver of ``BilevelOptimizer(solver=..., **options)``: a solver object as it
    is, or the one a name in ``SOLVERS`` stands for, built from the options it takes
    (None: the solver's default; the other solvers' options are not used)."""
    given = sorted(name for name, value in options.items() if value is not None)
    if isinstance(solver, Solver):
        if given:
            raise ValueError(f"autobalance: `{given[0]}` is an option of the solver names; with a solver object "
                             f"({solver!r}) set it on the object")
        return solver
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"autobalance: `solver` must be one of {tuple(SOLVERS)} or an object with a "
                         f"solve(matvec, b, state) method, got {solver!r}")
    cls, parameters = SOLVERS[solver]
    try:
        return cls(**{parameter: options[option] for option, parameter in parameters.items()
                      if options.get(option) is not None})
    except ValueError as error:  # name the option the caller passed, not the solver's parameter
        message = str(error)
        for option, parameter in parameters.items():
            message = message.replace(f"`{parameter}`", f"`{option}`")
        raise ValueError(message) from None
