"""AdapterManager: load and unload PEFT adapters by name while the engine runs.

Loading reads and validates the folder on the caller's thread; only publishing (a LoRA slot write, or
pinning a prefix's KV blocks) waits for a gap between steps, so running requests never stall. A
request holds the LoadedAdapter it started with: a reload publishes a new version under the name,
and the old one stays resident until its last request ends."""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from engine.adapters.lora import LoRAFormatError, max_rank, read_lora
from engine.adapters.prefix import PrefixFormatError, read_prefix, write_pinned_blocks
from engine.config import EngineConfig
from engine.kv_cache import BlockManager, KVCache
from engine.sequence import Sequence
from models.loader import PICKLE_SUFFIXES
from models.lora import LORA_PROJECTIONS, LoRALinear, install_lora, lora_targets

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


logger = logging.getLogger("gorgon.engine")


class AdapterError(ValueError):
    pass


class AdapterNotFound(AdapterError):
    """No adapter of that name is loaded, or no folder at that path."""


@dataclass(eq=False)
class LoadedAdapter:
    """One published version of a named adapter. Invariant: unchanged after publishing; its LoRA slot
    or pinned KV blocks stay reserved until it is unpublished and no request uses it."""

    name: str
    version: int
    kind: str  # "lora" or "prefix"
    path: Path
    cache_key: int  # unique per loaded version: prefix-cache hashes of its K/V never match another's
    rank: int = 0
    slot: int = -1  # LoRA: the slot in every LoRALinear's stacked A/B
    prefix_kv: torch.Tensor | None = None  # prefix: [num_layers, 2, num_virtual_tokens, num_kv_heads, head_dim]
    kv_blocks: list[int] = field(default_factory=list)  # prefix: pinned blocks holding prefix_kv's full blocks
    last_used: float = field(default_factory=time.monotonic)

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prefix_kv is None else self.prefix_kv.shape[2]

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "kind": self.kind, "path": str(self.path),
                "rank": self.rank, "num_virtual_tokens": self.num_virtual_tokens}


@dataclass
class _Staged:
    """A validated adapter, read but not yet published."""

    kind: str
    path: Path
    rank: int = 0
    lora: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] | None = None
    prefix_kv: torch.Tensor | None = None


class _Job:
    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn, self.done, self.result, self.error = fn, threading.Event(), None, None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as e:  # handed to the caller's thread; the step loop goes on
            self.error = e
        self.done.set()


class AdapterManager:
    """Named adapters of one engine. Invariant: every published or retired adapter owns a distinct LoRA
    slot (LoRA) or its pinned blocks (prefix), and at most `max_adapters` are resident."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, block_manager: BlockManager,
                 requests: dict[str, Sequence], config: EngineConfig, root: Path, max_model_len: int,
                 write_lora: Callable[[int, dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]], None] | None
                 = None) -> None:
        """write_lora(slot, weights): sets a LoRA slot in the model (None: in `model`, here; a tensor-parallel
        engine passes its driver's call, which sets it on every rank)."""
        self.model, self.kv_cache, self.block_manager, self.requests = model, kv_cache, block_manager, requests
        self._write_slot = write_lora or self._write_lora
        self.root = root
        self.max_adapters, self.max_rank, self.max_model_len = config.max_adapters, config.max_lora_rank, max_model_len
        self.device, self.dtype = config.device, config.torch_dtype
        # step_lock: held by each engine step and by publishing. lock: guards the name table and is held
        # by add_request while it registers a request, so no unload can miss a request that is joining.
        self.step_lock = threading.Lock()
        self.lock = threading.Lock()
        self.adapters: dict[str, LoadedAdapter] = {}
        self.retired: list[LoadedAdapter] = []  # unpublished versions still used by requests
        self._jobs: deque[_Job] = deque()
        self._targets = lora_targets(model)
        self._lora_modules: dict[str, LoRALinear] = {}  # installed with the first LoRA
        self._free_slots = list(range(self.max_adapters))
        self._versions: dict[str, int] = {}
        self._cache_keys = itertools.count(1)

    # ---- the public operations (any thread) --------------------------------------------------------
    def load(self, name: str, path: str | Path) -> LoadedAdapter:
        if not isinstance(name, str) or not name:
            raise AdapterError("an adapter needs a non-empty name")
        staged = self._read(self._resolve(path))
        return self._between_steps(lambda: self._publish(name, staged))

    def unload(self, name: str) -> None:
        self._between_steps(lambda: self._unload(name))

    def list(self) -> list[dict]:
        return [a.describe() for a in list(self.adapters.values())]

    def get(self, name: str | None) -> LoadedAdapter | None:
        """The current version of `name` (None: no adapter). Call with `lock` held until the request is registered."""
        if name is None:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            raise AdapterError(f"unknown adapter {name!r}; loaded: {sorted(self.adapters) or 'none'}")
        adapter.last_used = time.monotonic()
        return adapter

    def between_steps(self) -> None:
        """Run by the step loop (holding step_lock) before each step: queued loads/unloads, then release
        retired versions that no request uses any more."""
        while self._jobs:
            self._jobs.popleft().run()
        if self.retired:
            with self.lock:
                for adapter in [a for a in self.retired if not self._users(a)]:
                    self.retired.remove(adapter)
                    self._release(adapter)

    # ---- reading (caller's thread, no engine state touched) -----------------------------------------
    def _resolve(self, path: str | Path) -> Path:
        root = self.root.resolve()
        folder = (root / path).resolve()  # absolute paths stay absolute; '..' and symlinks are resolved
        if not folder.is_relative_to(root):
            raise AdapterError(f"adapter path {str(path)!r} is outside the adapter root")
        if not folder.is_dir():
            raise AdapterNotFound(f"adapter folder {str(path)!r} does not exist in the adapter root")
        return folder

    def _read(self, folder: Path) -> _Staged:
        config = self._read_config(folder)
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise AdapterError(f"{self._shown(folder)} holds only pickled weights ({', '.join(pickles)}); gorgon "
                                   "never unpickles. Re-save the adapter with save_pretrained(dir, "
                                   "safe_serialization=True)")
            raise AdapterError(f"{self._shown(folder)} has no {WEIGHTS_FILE}")
        self._check_inside_root(weights)
        try:
            if config["peft_type"] == "LORA":
                lora = read_lora(weights, config, self.model, self._targets)
                return _Staged("lora", folder, rank=max_rank(config), lora=lora)
            return _Staged("prefix", folder, prefix_kv=read_prefix(weights, config, self.model.config))
        except (LoRAFormatError, PrefixFormatError) as e:
            raise AdapterError(f"{self._shown(folder)}: {e}") from None
        except SafetensorError as e:  # a truncated or corrupt file
            raise AdapterError(f"{self._shown(weights)} is not a readable safetensors file: {e}") from None

    def _shown(self, path: Path) -> str:
        """A path in the adapter root as errors name it: relative to the root (a client need not learn where on the
        server's disk that is)."""
        try:
            return str(path.relative_to(self.root.resolve()))
        except ValueError:  # (not under the resolved root: the root's own spelling, a symbolic link in it)
            return path.name

    def _check_inside_root(self, file: Path) -> None:
        """An adapter's files are read only inside the adapter root, symbolic links resolved."""
        if not file.resolve().is_relative_to(self.root.resolve()):
            raise AdapterError(f"{self._shown(file)} links outside the adapter root")

    def _read_config(self, folder: Path) -> dict:
        file = folder / CONFIG_FILE
        if not file.is_file():
            raise AdapterError(f"{self._shown(folder)} has no {CONFIG_FILE}")
        self._check_inside_root(file)
        try:
            config = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise AdapterError(f"{self._shown(file)} is not valid JSON: {e}") from None

        def refuse(why: str) -> AdapterError:
            return AdapterError(f"{self._shown(folder)}: {why}")

        peft_type = config.get("peft_type")
        if peft_type not in ("LORA", "PREFIX_TUNING"):
            raise refuse(f"peft_type {peft_type!r} is not supported; gorgon serves LORA and PREFIX_TUNING adapters")
        if config.get("modules_to_save"):
            raise refuse(f"modules_to_save ({config['modules_to_save']}) is not supported: it replaces whole "
                         "base-model modules, which cannot be mixed per request")
        if peft_type == "PREFIX_TUNING":
            return config
        if config.get("use_dora"):
            raise refuse("DoRA (use_dora) is not supported")
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            raise refuse(f"LoRA bias {config.get('bias')!r} is not supported; only bias='none'")
        r, alpha = config.get("r"), config.get("lora_alpha")
        ranks = [r, *(config.get("rank_pattern") or {}).values()]  # (per-module ranks: engine.adapters.lora)
        alphas = [alpha, *(config.get("alpha_pattern") or {}).values()]
        if not all(isinstance(x, int) and x >= 1 for x in ranks) or not all(
                isinstance(x, (int, float)) for x in alphas):
            raise refuse(f"ranks must be positive integers and lora_alphas numbers; got r={ranks}, "
                         f"lora_alpha={alphas}")
        r = max_rank(config)
        if r > self.max_rank:
            raise refuse(f"rank {r} exceeds this engine's max_lora_rank={self.max_rank} (gorgon serve --max-lora-rank)")
        targets = config.get("target_modules")
        # (by their last part: PEFT saves all-linear as full paths, model.layers.0.self_attn.q_proj; a string, a
        # regex, is checked tensor by tensor in read_lora)
        leaves = {t.rpartition(".")[2] for t in targets} if isinstance(targets, list) else set()
        if not leaves <= set(LORA_PROJECTIONS):
            raise refuse(f"target_modules {sorted(leaves - set(LORA_PROJECTIONS))} are not supported; "
                         f"gorgon applies LoRA to {', '.join(LORA_PROJECTIONS)}")
        # fan_in_fan_out concerns transposed (Conv1D) base weights; Llama's are nn.Linear, and PEFT saves
        # lora_A/lora_B in the same layout either way, which read_lora checks by shape.
        return config

    # ---- publishing (between steps) ---------------------------------------------------------------------
    def _between_steps(self, fn: Callable[[], object]):
        """Run fn while no step runs: the step loop runs it before its next step, or we do if it is idle."""
        job = _Job(fn)
        self._jobs.append(job)
        while not job.done.is_set():
            if self.step_lock.acquire(timeout=0.005):
                try:
                    self.between_steps()
                finally:
                    self.step_lock.release()
        if job.error is not None:
            raise job.error
        return job.result

    def _publish(self, name: str, staged: _Staged) -> LoadedAdapter:
        with self.lock:
            old = self.adapters.get(name)
            old_idle = old is not None and not self._users(old)
            freed = [old] if old_idle else []
            while len(self.adapters) + len(self.retired) - len(freed) >= self.max_adapters:
                freed.append(self._lru_idle(exclude=freed + [old]))
            if staged.kind == "prefix":
                blocks = self._pin(staged.prefix_kv.shape[2], freed)
            for adapter in freed:
                if adapter is not old:
                    logger.warning("unloaded the least recently used idle adapter %r to make room for %r "
                                   "(max_adapters=%d)", adapter.name, name, self.max_adapters)
                del self.adapters[adapter.name]
                self._release(adapter)
            if old is not None and not old_idle:
                del self.adapters[name]
                self.retired.append(old)
            version = self._versions.get(name, 0) + 1
            self._versions[name] = version
            adapter = LoadedAdapter(name, version, staged.kind, staged.path, next(self._cache_keys), rank=staged.rank)
            try:
                if staged.kind == "lora":
                    adapter.slot = self._free_slots.pop()
                    self._write_slot(adapter.slot, staged.lora)
                else:
                    adapter.kv_blocks = blocks
                    adapter.prefix_kv = staged.prefix_kv.to(self.device, self.dtype)
                    write_pinned_blocks(adapter.prefix_kv, self.kv_cache, blocks)
            except BaseException:  # (the first LoRA's buffers out of memory, say): its slot or blocks come back
                self._release(adapter)
                raise
            self.adapters[name] = adapter
            return adapter

    def _lru_idle(self, exclude: list) -> LoadedAdapter:
        idle = [a for a in self.adapters.values() if all(a is not e for e in exclude) and not self._users(a)]
        if not idle:
            busy = {a.name: len(self._users(a)) for a in list(self.adapters.values()) + self.retired}
            raise AdapterError(f"all max_adapters={self.max_adapters} adapter places (--max-loras) are taken by "
                               f"adapters in use (adapter -> requests: {busy}); unload one or wait for its requests "
                               "to finish")
        return min(idle, key=lambda a: a.last_used)

    def _pin(self, num_virtual: int, freed: list[LoadedAdapter]) -> list[int]:
        block_size = self.block_manager.block_size
        num_blocks = num_virtual // block_size
        if num_virtual >= self.max_model_len:
            raise AdapterError(f"{num_virtual} virtual tokens leave no room in max_model_len={self.max_model_len}")
        # A request must still fit alone beside the other adapters' pinned blocks (its own count as its
        # own), or preemption could never make room for it.
        kept = [len(a.kv_blocks) for a in list(self.adapters.values()) + self.retired
                if a.kind == "prefix" and all(a is not f for f in freed)] + [num_blocks]
        usable = self.block_manager.num_blocks - sum(kept) + min(kept)
        blocks_per_request = -(-self.max_model_len // block_size)
        if usable < blocks_per_request:
            raise AdapterError(f"the KV cache cannot pin {num_blocks} more blocks: a max_model_len request needs "
                               f"{blocks_per_request} blocks and only {usable} would remain usable")
        if self.block_manager.num_free_blocks + sum(len(a.kv_blocks) for a in freed) < num_blocks:
            raise AdapterError(f"the KV cache has fewer than {num_blocks} free blocks for the virtual tokens right "
                               "now; retry when running requests finish")
        for adapter in freed:  # the caller releases them; their blocks must be free before we pin
            self.block_manager.unpin_blocks(adapter.kv_blocks)
            adapter.kv_blocks = []
        return self.block_manager.pin_blocks(num_blocks)

    def _write_lora(self, slot: int, weights: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]) -> None:
        if not self._lora_modules:
            self._lora_modules = install_lora(self.model, self._targets, self.max_adapters, self.max_rank)
        for path, module in self._lora_modules.items():
            module.write_slot(slot, weights.get(path, []))

    def _unload(self, name: str) -> None:
        with self.lock:
            adapter = self.adapters.get(name)
            if adapter is None:
                raise AdapterNotFound(f"unknown adapter {name!r}; loaded: {sorted(self.adapters) or 'none'}")
            del self.adapters[name]
            if self._users(adapter):  # they finish on it; new requests cannot name it (freed when they are done)
                self.retired.append(adapter)
            else:
                self._release(adapter)

    def _users(self, adapter: LoadedAdapter) -> list[str]:
        return [rid for rid, seq in list(self.requests.items()) if seq.adapter is adapter]

    def _release(self, adapter: LoadedAdapter) -> None:
        if adapter.slot >= 0:
            self._free_slots.append(adapter.slot)
        self.block_manager.unpin_blocks(adapter.kv_blocks)
        adapter.kv_blocks = []
