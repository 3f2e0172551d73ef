"""`gorgon bench decode --baseline llama.cpp`: which measurements it makes, with a stand-in for llama-cpp-python
(the optional `bench` extra, which a plain install lacks). Its speeds are not checked here."""
from __future__ import annotations

import json

from test_gguf import write_gguf

import bench.decode as decode

from conftest import hf_model, save_tiny_model


class StandInLlamaCpp:
    """bench.llamacpp.LlamaCpp's interface: 'decodes' token 0, recording how many sequences each call took."""

    batch_sizes: list[int] = []

    def __init__(self, file: str, threads: int, max_seqs: int, n_ctx: int = 4096) -> None:
        self.max_seqs, self.build = max_seqs, {"llama_cpp_python": "stand-in"}

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        assert len(prompts) <= self.max_seqs
        StandInLlamaCpp.batch_sizes.append(len(prompts))
        return [[0] * new_tokens for _ in prompts]

    def close(self) -> None:
        pass


def test_every_batch_size_asked_for_is_measured_on_both_engines(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "LlamaCpp", StandInLlamaCpp)
    monkeypatch.setattr(decode, "require_llama_cpp", lambda command: None)
    monkeypatch.setattr(StandInLlamaCpp, "batch_sizes", [])
    file = write_gguf(hf_model(save_tiny_model(tmp_path / "hf")), tmp_path / "m.gguf")
    out = tmp_path / "decode.json"
    decode.main(["--model", str(file), "--baseline", "llama.cpp", "--batch-sizes", "1", "4", "3", "--new-tokens", "3",
                 "--repeats", "1", "--prefill-len", "16", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["tok_s"]) == {"decode_bs1", "prefill_16", "decode_bs1_after_16", "decode_bs3", "decode_bs4"}
    assert {key for key in result["summary"] if key.startswith("throughput")} == {
        "throughput_speedup_vs_llamacpp_bs3", "throughput_speedup_vs_llamacpp_bs4"}
    assert set(StandInLlamaCpp.batch_sizes) == {1, 3, 4}
