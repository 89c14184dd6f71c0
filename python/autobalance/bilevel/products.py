"""The gradients and second-order products of a hyper-step (docs/math.md section 5):
``grad_theta L_V`` of a validation batch, and on the training batches the
Hessian-vector product ``H v`` and the mixed product
``d/d alpha <grad_theta L_T, p>``. Vectors over ``theta`` (and ``alpha``) are
flat: one tensor, the parameters' entries in order."""
import math
import os

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

from autobalance.bilevel.distributed import mean_over_ranks, unwrap


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def split(vector, like):
    """The flat ``vector`` as tensors shaped like ``like`` (views)."""
    return [chunk.view_as(t) for chunk, t in zip(vector.split([t.numel() for t in like]), like)]


def flat_grad(outputs, inputs, grad_outputs=None, **kwargs):
    """``torch.autograd.grad`` as a flat vector; outputs that do not require grad
    and inputs they do not reach contribute zeros."""
    if grad_outputs is None:
        grad_outputs = [None] * len(outputs)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return flat([torch.zeros_like(x) for x in inputs])
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True, **kwargs)
    return flat([torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)])


def call_loss(fn, inputs, target, group, **kwargs):
    """``fn(inputs, target[, group], **kwargs)``: a loss (or an augmentation) used without
    groups need not take one."""
    return fn(inputs, target, **kwargs) if group is None else fn(inputs, target, group, **kwargs)


def check_scalar(loss, name):
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"autobalance: the `{name}` must return a scalar loss (reduction 'mean' or 'sum'), "
                         f"got {got}")


def validation_gradient(model, objective, theta, hyper, batch):
    """``(grad_theta L_V, L_V)`` of one validation batch ``(inputs, target, group)``, flat;
    raises if ``L_V`` depends on ``hyper`` or does not depend on ``theta``."""
    inputs, target, group = batch
    loss = call_loss(objective, model(inputs), target, group)
    check_scalar(loss, "objective")
    grads = (torch.autograd.grad(loss, theta + hyper, allow_unused=True) if loss.requires_grad
             else [None] * len(theta + hyper))
    if any(g is not None for g in grads[len(theta):]):
        raise ValueError("autobalance: the `objective` depends on the loss hyperparameters; L_V must be a "
                         "function of the network weights only (docs/math.md section 5)")
    if all(g is None for g in grads[:len(theta)]):
        raise ValueError("autobalance: the validation loss does not depend on theta; pass the `model` "
                         "whose weights the wrapped optimizer trains")
    return flat([torch.zeros_like(p) if g is None else g for p, g in zip(theta, grads)]), float(loss.detach())


AUTO_GRAPH_MEMORY = 0.5  # graph_memory="auto": this fraction of the memory available at the hyper-step


def _read_int(path, field=None):
    """The integer in a file (``field``: of its line ``field: value kB``), None where unreadable."""
    try:
        with open(path) as f:
            if field is None:
                return int(f.read().strip())
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def available_memory(device):
    """Bytes available for new tensors on ``device``: on CUDA the device's free memory
    plus what PyTorch's caching allocator holds unused; on the CPU the system's
    ``MemAvailable`` (Linux; the page count elsewhere), capped by a cgroup v2 memory
    limit; ``inf`` where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return math.inf
    available = _read_int("/proc/meminfo", "MemAvailable")
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return math.inf
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        available = min(available, max(limit - used, 0))
    return float(available)


def graph_budget(graph_memory, device):
    """The bytes of training graphs a hyper-step may keep: ``graph_memory`` itself, or
    for ``"auto"`` ``AUTO_GRAPH_MEMORY`` times ``available_memory(device)``."""
    return AUTO_GRAPH_MEMORY * available_memory(device) if graph_memory == "auto" else graph_memory


class SavedBytes:
    """Counts the bytes of the tensors autograd saves for backward inside the ``with``
    block (each storage once), leaving out the storages of ``exclude`` (the weights,
    which exist anyway): the size of the graph built there. The hook keeps each tensor
    detached: autograd re-attaches its history when it unpacks it, and a node that kept
    its own output with that output's history would form a reference cycle, which only
    the garbage collector frees."""

    def __init__(self, exclude=()):
        self.bytes, self._seen = 0, {t.untyped_storage().data_ptr() for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return t.detach()

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class TrainGradients:
    """The two second-order products of docs/math.md section 5 on the training batches
    ``(inputs, target, group)``, averaged over the batches (and over ranks under DDP,
    ``group`` being the process group or None):

    - ``hvp(v) = H v``: reverse over reverse, through ``grad_theta L_T`` of each batch
      built with its graph (``create_graph``). (The wrapped optimizer's L2 term is
      added by the caller, ``solvers.ridge``.)
    - ``mixed(p) = d/d alpha <grad_theta L_T, p>``: for a batch whose graph is kept,
      one more backward through it (no new pass over the network). Otherwise, as the
      loss depends on theta only through the logits ``z``, it is ``d/d alpha <dl/dz,
      u>`` with ``u = J_theta p`` the network's Jacobian-vector product in logit
      space, from one forward pass in forward-mode AD; the rest is a second derivative
      of the loss alone, ``[N, K]``-sized (with ``ParametricCE(backend="fused")`` the
      fused double backward with the logit cotangent ``u``). Where a layer of the
      model has no forward-mode derivative, it goes through a rebuilt graph and sets
      ``forward_ad`` to False (pass that to the next hyper-step's products).

    **Kept graphs.** Each batch's gradient graph is built once and kept for the
    solver's products as long as the kept graphs' size (``SavedBytes``, measured as
    they are built) stays within ``graph_memory`` bytes; the graphs of the batches
    beyond it are rebuilt for every product, one at a time (a forward and a
    backward more per batch and product, and at most one such graph alive). A
    single batch's graph is always kept. ``kept`` counts the kept graphs,
    ``graph_bytes`` holds each batch's measured size (leaving out the model's
    parameters and buffers and the batch's inputs), ``losses`` each batch's training
    loss from the first pass over them.
    """

    def __init__(self, model, criterion, theta, hyper, batches, group, forward_ad=True,
                 graph_memory=float("inf"), augment=None, draw_seed=0):
        self.model, self.criterion, self.theta, self.hyper = model, criterion, theta, hyper
        self.augment, self.draw_seed = augment, draw_seed
        self.batches, self.group, self.forward_ad = batches, group, forward_ad
        self.graph_memory = graph_memory
        self.losses, self.graph_bytes, self.kept = [], [], 0
        self._kept = [None] * len(batches)

    def _record(self, loss):
        check_scalar(loss, "criterion")
        if len(self.losses) < len(self.batches):  # the first pass over the batches
            self.losses.append(float(loss.detach()))

    def _build(self, i):
        inputs, target, group = self.batches[i]
        if self.augment is not None:  # batch i's one draw (its generator seeded draw_seed + i)
            generator = torch.Generator(device=inputs.device).manual_seed(self.draw_seed + i)
            inputs = call_loss(self.augment, inputs, target, group, generator=generator)
        loss = call_loss(self.criterion, self.model(inputs), target, group)
        self._record(loss)
        return torch.autograd.grad(loss, self.theta, create_graph=True, allow_unused=True)

    def _graph(self, i):
        """Batch ``i``'s ``grad_theta L_T`` with its graph: the kept one, or built (and
        kept if it is the first build and fits the budget)."""
        if self._kept[i] is not None:
            return self._kept[i]
        if i < len(self.graph_bytes):  # built before and not kept
            return self._build(i)
        module = unwrap(self.model)
        with SavedBytes([*module.parameters(), *module.buffers(), self.batches[i][0]]) as size:
            grads = self._build(i)
        kept_bytes = sum(b for b, g in zip(self.graph_bytes, self._kept) if g is not None)
        self.graph_bytes.append(size.bytes)
        if len(self.batches) == 1 or kept_bytes + size.bytes <= self.graph_memory:
            self._kept[i] = grads
            self.kept += 1
        return grads

    def _average(self, inputs, vector):
        parts = split(vector, self.theta)
        total = None
        for i in range(len(self.batches)):
            grads = self._graph(i)
            term = flat_grad(grads, inputs, parts, retain_graph=True)
            del grads  # free a graph that is not kept before the next one is built
            total = term if total is None else total + term
        return total / len(self.batches)

    def hvp(self, v):
        return mean_over_ranks(self._average(self.theta, v), self.group)

    def _logit_jvp(self, inputs, parts):
        """``(z, J_theta p)`` of one batch by forward-mode AD (``None`` for a zero JVP)."""
        module = unwrap(self.model)
        names = {id(q): name for name, q in module.named_parameters()}
        with torch.no_grad(), fwAD.dual_level():
            duals = {names[id(q)]: fwAD.make_dual(q, t) for q, t in zip(self.theta, parts) if id(q) in names}
            return tuple(fwAD.unpack_dual(functional_call(module, duals, (inputs,))))

    def _mixed_term(self, batch, parts):
        inputs, target, group = batch
        logits, jvp = self._logit_jvp(inputs, parts)
        logits = logits.detach().requires_grad_(True)
        loss = call_loss(self.criterion, logits, target, group)
        self._record(loss)
        grad_logits = torch.autograd.grad(loss, logits, create_graph=True)[0]
        if jvp is None:
            return flat([torch.zeros_like(a) for a in self.hyper])
        return flat_grad([grad_logits], self.hyper, [jvp])

    def mixed(self, p):
        """The mixed product, batch by batch: through the batch's kept graph (no new
        pass), else by forward mode (one forward pass instead of a rebuilt graph),
        else through a rebuilt graph. Each kept graph is freed after its term."""
        parts = split(p, self.theta)
        total = None
        for i, batch in enumerate(self.batches):
            grads, self._kept[i] = self._kept[i], None
            term = None
            if grads is None and self.forward_ad:
                try:
                    term = self._mixed_term(batch, parts)
                except NotImplementedError:  # a layer without a forward-mode derivative
                    self.forward_ad = False
            if term is None:
                grads = self._graph(i) if grads is None else grads
                self._kept[i] = None
                term = flat_grad(grads, self.hyper, parts)
            del grads
            total = term if total is None else total + term
        return total / len(self.batches)
