"""Driver: rank 0's end of a tensor-parallel engine; ShardedKVCache: the engine's view of the ranks' KV caches."""
from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.parallel.group import Rendezvous, join, launched_rank, rank_device
from engine.parallel.shard import RankShard
from engine.parallel.worker import CLOSE, worker_main
from models.context import ForwardContext
from models.loader import model_config
from models.parallel import TensorParallel, check_shardable

logger = logging.getLogger("gorgon.parallel")

JOIN_TIMEOUT_S = 30.0  # how long closing waits for a worker to exit before killing it
DEATH_GRACE_S = 0.5  # how long a failed call waits to see whether a worker is exiting


class WorkerFailure(RuntimeError):
    """A rank of the tensor-parallel group died or failed a call: the engine cannot step any more."""


class Driver:
    """Rank 0 of a tensor-parallel engine. Each call is broadcast to the workers, then run on rank 0's own
    RankShard, so every rank makes it. Invariant: calls run one at a time; once one fails (or a worker is
    found dead) the workers are stopped, and every later call raises WorkerFailure with `failure`."""

    def __init__(self, shard: RankShard, calls: dist.ProcessGroup, workers: list[mp.Process],
                 threads_before: int) -> None:
        self.shard, self.calls, self.workers = shard, calls, workers
        self.threads_before = threads_before  # this process's torch threads before the group took its share
        self.failure: str | None = None
        self.closed = False
        self._lock = threading.Lock()
        atexit.register(self.close)  # the workers stop cleanly even if no one closes the engine

    @classmethod
    def start(cls, config: EngineConfig, path: Path) -> Driver:
        """Rank 0's shard and its group: the workers are spawned here (one host), or were started by torchrun
        (several hosts: engine.parallel.run_worker_if_launched). Spawned on one host, the ranks share its cores:
        each uses 1/size of this process's torch threads (this one too, until close())."""
        size = config.tensor_parallel_size
        if dist.is_initialized():
            raise ValueError("this process already belongs to a torch.distributed group (another tensor-parallel "
                             "engine?): close() that engine first")
        threads_before = torch.get_num_threads()
        check_shardable(model_config(path), size)  # before any spawn
        if launched_rank() is not None:
            rendezvous, workers = Rendezvous.from_environment(), []
            if launched_rank() != 0 or rendezvous.world_size != size:
                raise ValueError(f"this process is rank {launched_rank()} of {rendezvous.world_size} (RANK, "
                                 f"WORLD_SIZE), but an engine of tensor_parallel_size={size} runs on rank 0 "
                                 "(the other ranks call engine.parallel.run_worker_if_launched)")
        else:
            if config.device.startswith("cuda") and torch.cuda.device_count() < size:
                raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs; torch sees "
                                 f"{torch.cuda.device_count()}")
            rendezvous = Rendezvous.local(size)
            threads = max(1, threads_before // size)
            spawn = mp.get_context("spawn")
            workers = [spawn.Process(target=worker_main, name=f"gorgon-tp-rank{rank}", daemon=True,
                                     args=(config, str(path), rank, rendezvous, threads))
                       for rank in range(1, size)]
            for worker in workers:
                worker.start()
            torch.set_num_threads(threads)
        try:
            device = rank_device(config.device, 0)
            shard = RankShard(config, path, TensorParallel(0, size), device)
            calls = _join_watching(rendezvous, device, workers)
        except BaseException:
            _kill(workers)
            torch.set_num_threads(threads_before)
            raise
        return cls(shard, calls, workers, threads_before)

    def call(self, name: str, *args):
        """RankShard.<name>(*args) on every rank; returns rank 0's result."""
        with self._lock:
            self._check()
            try:
                sent = args
                if self.shard.device.type != "cpu":
                    sent = tuple(map(_on_cpu, args))
                    torch.cuda.current_stream(self.shard.device).synchronize()  # the contexts' copies are non-blocking
                dist.broadcast_object_list([(name, sent)], src=0, group=self.calls)
                return getattr(self.shard, name)(*args)
            except Exception as e:
                for worker in self.workers:  # a worker that died fails the call: say that rather than how
                    worker.join(DEATH_GRACE_S)
                self._fail(_deaths(self.workers) or f"tensor-parallel call {name!r} failed: {e}")
                raise WorkerFailure(self.failure) from e
            except BaseException:  # Ctrl-C mid-call: the ranks sit in different collectives, none can be closed
                self._fail(f"tensor-parallel call {name!r} interrupted")
                raise

    def check(self) -> str | None:
        """Why the group cannot step any more (a worker found dead now included), or None. Never waits for
        a call in flight."""
        if self._lock.acquire(blocking=False):
            try:
                self._check()
            except WorkerFailure:
                pass
            finally:
                self._lock.release()
        return self.failure

    def close(self) -> None:
        """End the workers and leave the group (idempotent)."""
        atexit.unregister(self.close)
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.failure is None:
                try:
                    dist.broadcast_object_list([(CLOSE, ())], src=0, group=self.calls)
                except Exception as e:  # noqa: BLE001 - a worker already gone: stop the others below
                    logger.warning("closing the tensor-parallel group: %s", e)
            for worker in self.workers:
                worker.join(JOIN_TIMEOUT_S)
            _kill(self.workers)
            _leave_group()
            torch.set_num_threads(self.threads_before)

    def _check(self) -> None:
        if self.closed and self.failure is None:
            self.failure = "the tensor-parallel group is closed"
        if self.failure is None and _deaths(self.workers):
            self._fail(_deaths(self.workers))
        if self.failure is not None:
            raise WorkerFailure(self.failure)

    def _fail(self, why: str) -> None:
        logger.error("%s; stopping the tensor-parallel group", why)
        self.failure = why
        self.closed = True
        _kill(self.workers)
        _leave_group()
        torch.set_num_threads(self.threads_before)


class ShardedKVCache:
    """The engine's KV cache (engine.kv_cache.KVCache's interface) when each rank holds its KV heads of every
    block: writes and copies name all heads and reach every rank through the driver. Invariant: a slot is
    the same place on every rank."""

    def __init__(self, driver: Driver, num_blocks: int) -> None:
        self.driver = driver
        driver.call("allocate", num_blocks)
        local = driver.shard.kv_cache
        self.num_blocks, self.block_size, self.device = local.num_blocks, local.block_size, local.device

    def write(self, slot_ids: list[int], kv: torch.Tensor) -> None:
        self.driver.call("write_kv", slot_ids, kv)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.driver.call("copy_kv", src, dst)


def _join_watching(rendezvous: Rendezvous, device: torch.device, workers: list[mp.Process]) -> dist.ProcessGroup:
    """join() as rank 0, failing at once if a spawned worker dies first (a bad checkpoint, no memory, ...)."""
    done, result = threading.Event(), {}

    def run() -> None:
        try:
            result["calls"] = join(rendezvous, 0, device)
        except Exception as e:  # noqa: BLE001 - raised on the caller's thread
            result["error"] = e
        done.set()

    threading.Thread(target=run, name="gorgon-tp-join", daemon=True).start()
    while not done.wait(0.05):
        dead = [w for w in workers if not w.is_alive()]
        if dead:
            raise WorkerFailure(f"tensor-parallel worker {dead[0].name} exited with code {dead[0].exitcode} "
                                "before joining the group (its error is above)")
    if "error" in result:
        raise result["error"]
    return result["calls"]


def _deaths(workers: list[mp.Process]) -> str:
    """Which workers have exited, and how ('' when none)."""
    return ", ".join(f"tensor-parallel worker {w.name} (pid {w.pid}) exited with code {w.exitcode}"
                     for w in workers if not w.is_alive())


def _kill(workers: list[mp.Process]) -> None:
    for worker in workers:
        if worker.is_alive():
            worker.kill()
        worker.join()


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _on_cpu(arg):
    """A call's argument as it crosses to another rank's device: tensors (and contexts) via the host."""
    if isinstance(arg, ForwardContext):
        return arg.to(torch.device("cpu"))
    if isinstance(arg, torch.Tensor):
        return arg.cpu()
    if isinstance(arg, dict):
        return {k: [tuple(_on_cpu(x) for x in item) for item in v] for k, v in arg.items()}
    return arg
