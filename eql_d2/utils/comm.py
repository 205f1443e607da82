"""The one all-reduce of eql_d2's statistics (pure ``torch.distributed``)."""

import torch

__all__ = ["world_size", "all_reduce_"]


def world_size() -> int:
    """Processes in the default process group (1 when none is initialized)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_(t: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (``mean``: average) `t` over the default process group, in place; returns `t`.

    Without an initialized process group `t` is returned unchanged, so single-process code
    calls it unconditionally.
    """
    n = world_size()
    if n > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        if mean:
            t /= n
    return t
