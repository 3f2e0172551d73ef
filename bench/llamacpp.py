"""llama.cpp as a benchmark baseline, through llama-cpp-python's low-level API (the optional `bench` extra):
greedy decoding of several sequences in one batch per step, and prefill, on a GGUF file."""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np


def _ignore_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    pass


try:  # llama.cpp logs every tensor it loads; the callback must outlive the process's llama.cpp calls
    from llama_cpp import llama_log_callback

    _QUIET = llama_log_callback(_ignore_log)
except (ImportError, OSError):  # not installed, or its library does not load: benchmarks without it still run
    _QUIET = None


def require_llama_cpp(command: str) -> None:
    """Stop now, before gorgon's side of a benchmark runs, where llama-cpp-python is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit(f"gorgon bench {command}: --baseline llama.cpp needs llama-cpp-python, which a plain install "
                         "lacks: pip install -e '.[bench]' in gorgon's checkout (it compiles llama.cpp: ~15 min)")


class LlamaCpp:
    """One llama.cpp model and context. Invariant: the KV cache is empty between calls."""

    def __init__(self, file: str | Path, threads: int, max_seqs: int, n_ctx: int = 4096, n_batch: int = 512) -> None:
        import llama_cpp  # optional: pip install -e ".[bench]"

        self.lib = llama_cpp
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(file).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise ValueError(f"llama.cpp could not load {file}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_batch, n_batch, max_seqs
        params.n_threads = params.n_threads_batch = threads
        # one cache for all sequences, as a continuous-batching server keeps it: with a stream per sequence (the
        # default of newer llama.cpp), batched steps fail with "failed to find a memory slot"
        params.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_batch, self.max_seqs = n_batch, max_seqs
        # which llama.cpp, built for which instructions (a build without AMX, say, runs slower on a Xeon that has it)
        self.build = {"llama_cpp_python": llama_cpp.__version__,
                      "system_info": llama_cpp.llama_print_system_info().decode().strip()}
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, max_seqs)

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        logits = self.lib.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy decoding of every prompt together: prompts prefilled (in n_batch chunks), then one batched
        llama_decode per step with one token per sequence, as a continuous-batching server runs them."""
        assert len(prompts) <= self.max_seqs
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        entries = [(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, t in enumerate(p)]
        outputs: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start:start + self.n_batch]
            self._decode(chunk)
            for i, (_, _, seq, wants) in enumerate(chunk):
                if wants:
                    outputs[seq].append(self._argmax(i))
        for step in range(new_tokens - 1):
            self._decode([(out[-1], len(p) + step, seq, True) for seq, (p, out) in enumerate(zip(prompts, outputs))])
            for seq, out in enumerate(outputs):
                out.append(self._argmax(seq))
        return outputs

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)
