"""torch.distributed set-up for ``torchrun`` launches, shared by the store writer and the SAE trainer.

``torchrun --nproc_per_node N`` starts N processes and describes the group to each through the
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). The
entry point (a ``workbench`` command or a user's script) calls :func:`init_distributed` once;
library code then asks :func:`dist_info` for its rank and calls :func:`barrier`. In a single
process (no ``WORLD_SIZE`` above 1) everything here is a no-op: rank 0 of 1.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist

from workbench.errors import ConfigError

# What the env:// rendezvous reads besides WORLD_SIZE; torchrun sets them all.
_RENDEZVOUS_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


class DistInfo(NamedTuple):
    """Where this process stands in its process group."""

    rank: int
    """This process's index in the group, 0 to world_size - 1 (0 in a single process)."""
    world_size: int
    """How many processes share the work (1 in a single process)."""


def launched_world_size() -> int:
    """Return the group size the launcher asked for (``WORLD_SIZE``; 1 when unset)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        world = 0
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not a positive integer; launch with torchrun or unset WORLD_SIZE")
    return world


def local_device(device: torch.device | str) -> torch.device:
    """Return ``device`` as this process's own: an index-less CUDA device becomes ``cuda:LOCAL_RANK``.

    Under ``torchrun`` each process on a machine gets its own GPU; without this every rank would
    use ``cuda:0``. Explicit indices (``cuda:1``) and other device types are kept as given.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init_distributed(device: torch.device | str = "cpu") -> DistInfo:
    """Return this process's rank and world size, first joining the group ``torchrun`` describes.

    Joins only when launched with ``WORLD_SIZE`` above 1 and no group exists yet; an existing group
    (made by the caller or an earlier call) is reused as it is, so calling this twice is harmless.
    The backend follows the device the work runs on: nccl for a CUDA device (which is also made
    the current device, so collectives use this rank's GPU), gloo for anything else. Choosing by
    ``torch.cuda.is_available()`` instead would pick nccl for a CPU run on a GPU machine, and
    nccl cannot reduce CPU tensors.
    """
    if launched_world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise ConfigError(
                "WORLD_SIZE is above 1 but this torch build has no torch.distributed; "
                "run in one process (unset WORLD_SIZE) or install a torch with distributed support"
            )
        missing = [name for name in _RENDEZVOUS_ENV if name not in os.environ]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for a process group but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set; launch with "
                "`torchrun --nproc_per_node N ...` (it sets them), or unset WORLD_SIZE to run in one process"
            )
        device = local_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist_info()


def dist_info() -> DistInfo:
    """Return this process's rank and world size: from the process group, or (0, 1) in a single process.

    Launched with ``WORLD_SIZE`` above 1 but with no group joined is an error rather than (0, 1):
    every rank would then believe it does all the work, and they would overwrite each other's files.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size())
    world = launched_world_size()
    if world > 1:
        raise ConfigError(
            f"launched with WORLD_SIZE={world} but no process group was joined; call "
            "workbench.distributed.init_distributed(device) first (the workbench commands do), "
            "or unset WORLD_SIZE to run in one process"
        )
    return DistInfo(0, 1)


def barrier() -> None:
    """Wait until every rank of the group gets here; return at once in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    """Leave the process group if one was joined; do nothing otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
