"""DistributedDataParallel: a hyper-step treats the union of all ranks' batches
as its batches (docs/math.md section 5). Without DDP (or with one rank) every
helper here is the identity."""
import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def process_group(model):
    """The process group to reduce over: the DDP model's group when it spans
    more than one rank, else None."""
    if isinstance(model, DistributedDataParallel) and dist.is_available() and dist.is_initialized():
        group = model.process_group
        if dist.get_world_size(group) > 1:
            return group
    return None


def rank_in(group):
    """This process's rank in ``group`` (0 without one)."""
    return 0 if group is None else dist.get_rank(group)


def unwrap(model):
    """The module DDP wraps (the model itself without DDP)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_sync(model):
    """DDP's ``no_sync()`` (a null context without DDP)."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def mean_over_ranks(t, group):
    """All-reduce mean of a theta-sized vector (inside the solver)."""
    if group is None:
        return t
    dist.all_reduce(t, group=group)
    return t / dist.get_world_size(group)


def max_over_ranks(t, group):
    """All-reduce maximum (e.g. of flags, so that every rank takes the same decision)."""
    if group is None:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def ordered_mean_over_ranks(t, group):
    """Mean over ranks summed in rank order on every rank, so every rank gets
    bit-identical values whatever the all-reduce algorithm."""
    if group is None:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total / len(parts)
