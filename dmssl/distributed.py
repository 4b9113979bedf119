"""Distributed helpers that also work in a single process (no process group: rank 0 of 1)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as torch_dist

_local_only = False  # set by `this_process_only`


def _grouped() -> bool:
    return not _local_only and torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if _grouped() else 1


def rank() -> int:
    return torch_dist.get_rank() if _grouped() else 0


@contextlib.contextmanager
def this_process_only() -> Iterator[None]:
    """Inside, the helpers below act as in a single process: no collective is called.

    For work that one process does on its own while the others do something else (the precision probe,
    which times a step a number of times that depends on the process's own clock): a collective there
    would wait for partners that never call it, and the run would hang."""
    global _local_only
    before, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = before


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each process's gradient for the local rows (all_reduce + slice).

    Written with all_gather and all_reduce only, which every backend has (gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.zeros_like(tensor) for _ in range(world_size())]
        torch_dist.all_gather(parts, tensor.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        torch_dist.all_reduce(stacked)
        return stacked[rank()]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, keeping autograd.

    `accelerator.gather` carries no gradient, so a distance over the global batch needs this one. Its
    backward sums each process's gradient for the local rows; DDP then averages over processes, so a
    loss computed on W processes x batch B gives the same update as one process with batch W * B.
    Rows may differ in number between processes.
    """
    if world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    torch_dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.cat([tensor, tensor.new_zeros(longest - tensor.shape[0], *tensor.shape[1:])])
    parts = _GatherWithGrad.apply(padded)
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes, strict=True)])


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all processes (itself in a single process); no gradient."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    torch_dist.all_reduce(total)
    return total / world_size()
