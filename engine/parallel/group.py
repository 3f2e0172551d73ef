"""Where the ranks of a tensor-parallel engine meet, and joining their process groups.

Two groups span the same ranks. torch.distributed's default group (gloo on CPU, NCCL on CUDA) carries the
model's collectives, with a timeout, so that a rank that stops answering fails a step instead of hanging it.
A gloo group carries rank 0's calls (engine.parallel.driver), which the workers await with no timeout to
speak of, since an engine may sit idle for days."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(minutes=5)
IDLE_TIMEOUT = timedelta(days=365 * 100)
# what torchrun (and any launch in its style) sets in each process's environment
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Rendezvous:
    """How world_size ranks find each other: a torch.distributed init_method (rank 0 hosts its store)."""

    init_method: str
    world_size: int

    @classmethod
    def local(cls, world_size: int) -> Rendezvous:
        """On this host, at a port that is free now."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return cls(f"tcp://127.0.0.1:{port}", world_size)

    @classmethod
    def from_environment(cls) -> Rendezvous:
        """torchrun's (MASTER_ADDR, MASTER_PORT, WORLD_SIZE; its agent's store where it runs one)."""
        return cls("env://", int(os.environ["WORLD_SIZE"]))


def launched_rank() -> int | None:
    """This process's rank when a launcher such as torchrun started it (LAUNCH_VARIABLES set), else None."""
    return int(os.environ["RANK"]) if all(name in os.environ for name in LAUNCH_VARIABLES) else None


def rank_device(device: str, rank: int) -> torch.device:
    """The device of `rank`: on CUDA, the GPU of its local rank (torchrun's LOCAL_RANK, else the rank)."""
    if not device.startswith("cuda"):
        return torch.device(device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def join(rendezvous: Rendezvous, rank: int, device: torch.device) -> dist.ProcessGroup:
    """Join the default group (the model's collectives) and return the group of rank 0's calls."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=rendezvous.init_method,
                            rank=rank, world_size=rendezvous.world_size, timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
