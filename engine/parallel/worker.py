"""The ranks above 0: load a shard, join the group, answer rank 0's calls until it closes the group."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.parallel.group import Rendezvous, join, launched_rank, rank_device
from engine.parallel.shard import RankShard
from models.parallel import TensorParallel

logger = logging.getLogger("gorgon.parallel")

CLOSE = "close"  # the call that ends the workers' loop


def serve(shard: RankShard, calls: dist.ProcessGroup) -> None:
    """Run rank 0's calls, each a (method of RankShard, arguments) broadcast over `calls`, until CLOSE.
    Any error ends the process: its peers then fail their next collective rather than fall out of step."""
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=calls)
        name, args = message[0]
        if name == CLOSE:
            break
        getattr(shard, name)(*args)
    dist.destroy_process_group()


def worker_main(config: EngineConfig, path: str, rank: int, rendezvous: Rendezvous, threads: int) -> None:
    """A worker's life (the target of the processes rank 0 spawns, and of torchrun's ranks above 0)."""
    # Ctrl-C reaches the whole process group: rank 0 alone decides what it means (the server drains its requests
    # for --shutdown-timeout), and closes the workers, or dies and breaks their group, when it is done
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    device = rank_device(config.device, rank)
    shard = RankShard(config, Path(path), TensorParallel(rank, rendezvous.world_size), device)
    serve(shard, join(rendezvous, rank, device))


def run_worker_if_launched(config: EngineConfig) -> bool:
    """Under torchrun (one process per rank, on one host or several), ranks above 0 serve here, with the same
    command line as rank 0, and this returns True once rank 0 has closed the group. On rank 0, or when no
    launcher started this process, it returns False at once: the caller builds its LLM as usual."""
    rank = launched_rank()
    if rank is None or rank == 0:
        return False
    rendezvous = Rendezvous.from_environment()
    if rendezvous.world_size != config.tensor_parallel_size:
        raise ValueError(f"the launcher started {rendezvous.world_size} ranks (WORLD_SIZE), but "
                         f"--tensor-parallel-size is {config.tensor_parallel_size}")
    logger.info("tensor-parallel rank %d of %d: serving rank 0's calls", rank, rendezvous.world_size)
    worker_main(config, str(config.resolve_model()), rank, rendezvous, torch.get_num_threads())
    return True
