"""Everything about torchrun / DistributedDataParallel in one place.

Alone (no ``WORLD_SIZE`` > 1) every function here is a no-op that answers rank 0 of 1, so the
CLI and the Trainer call them unconditionally and hold no DDP code themselves.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .errors import SpatialVAEError, short_reason


class PeerFailedError(SpatialVAEError):
    """Another process of the torchrun job failed; this one stops too, in one line."""


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return dist_info()[0] == 0


def init_distributed() -> tuple[int, int, Optional[torch.device]]:
    """Under torchrun (WORLD_SIZE > 1): join the process group -> (rank, world, device);
    alone -> (0, 1, None), the caller picks the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return dist.get_rank(), world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return dist.get_rank(), world, torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def _tell_others(failure: Optional[str], value: Any = None) -> None:
    """Rank 0: one broadcast carrying either its failure or its result."""
    broadcast((failure, value))


def _hear_from_main() -> Any:
    """The other ranks: rank 0's result, or `PeerFailedError` if it failed."""
    failure, value = broadcast(None)
    if failure is not None:
        raise PeerFailedError(f"rank {dist_info()[0]} stops: rank 0 failed first ({failure}); its message is above")
    return value


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. decodes and writes the cache); the others then run it.
    If rank 0 fails in it, the others stop at once with `PeerFailedError` instead of waiting."""
    if dist_info()[1] == 1:
        yield
    elif is_main():
        try:
            yield
        except BaseException as e:
            _tell_others(short_reason(e))
            raise
        _tell_others(None)
    else:
        _hear_from_main()
        yield


def run_on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result on every rank in one broadcast; if it raises there, the others
    raise `PeerFailedError` at once instead of waiting for a result that never comes."""
    if dist_info()[1] == 1:
        return fn()
    if not is_main():
        return _hear_from_main()
    try:
        value = fn()
    except BaseException as e:
        _tell_others(short_reason(e))
        raise
    _tell_others(None, value)
    return value


def peer_failure(e: BaseException) -> Optional[str]:
    """One line for a collective that broke because another process died (``None``: not that)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(e, RuntimeError):  # the group may be gone
        return None
    text = str(e)
    if not any(k in text for k in ("Connection closed by peer", "Connection reset", "NCCL", "Broken pipe",
                                   "DistBackendError", "timed out")):
        return None
    return (f"rank {os.environ.get('RANK', '?')} stops: another process of this torchrun job failed ({short_reason(e)}); "
            "torchrun's summary below names it, and its own message is above")


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if dist_info()[1] == 1:
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list:
    """Every rank's ``value``, in rank order, on every rank (any picklable object); ``[value]`` alone."""
    if dist_info()[1] == 1:
        return [value]
    out: list = [None] * dist_info()[1]
    dist.all_gather_object(out, value)
    return out


def all_true(ok: torch.Tensor) -> bool:
    """True when ``ok`` (a 0/1 tensor) is true on every rank: all ranks then decide alike."""
    ok = ok.float().reshape(1)
    if dist_info()[1] > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when distributed, else ``model`` itself."""
    if dist_info()[1] == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
