"""Tensor parallelism across processes on torch.distributed (gloo on CPU, NCCL on CUDA).

Rank 0 is the engine's own process: it schedules, samples, and runs its share of the model behind a `Driver`,
which broadcasts each call (a step's token ids and ForwardContext, a KV cache write, a LoRA slot) to the other
ranks first. The others run `worker.serve`: they were spawned by rank 0 with torch.multiprocessing (one
host), or started by torchrun with the same command line (several hosts: `run_worker_if_launched`). The
sharded layers themselves are the model's (models.parallel)."""
from engine.parallel.driver import Driver, ShardedKVCache, WorkerFailure
from engine.parallel.worker import run_worker_if_launched

__all__ = ["Driver", "ShardedKVCache", "WorkerFailure", "run_worker_if_launched"]
