"""`gorgon bench serving`'s pure parts: the llama-server command line, finding the binary, and the client's
reading of a llama-server style stream. Nothing here needs llama-server or llama-cpp-python."""
from __future__ import annotations

import asyncio
import json
import stat

import httpx
import pytest

from bench import serving


def test_llama_server_runs_the_file_with_our_threads_and_one_slot_per_stream():
    cmd = serving.llama_server_command("/opt/llama-server", "/m/x.gguf", threads=2, slots=32, max_tokens=64)
    assert cmd[0] == "/opt/llama-server"
    flags = {flag: value for flag, value in zip(cmd, cmd[1:]) if flag.startswith("--")}
    assert flags["--model"] == "/m/x.gguf"
    assert flags["--threads"] == flags["--threads-batch"] == "2"
    assert flags["--parallel"] == "32"
    assert "--cont-batching" in cmd
    assert int(flags["--ctx-size"]) // 32 >= serving.PROMPT_TOKENS_BUDGET + 64  # each slot: prompt + max_tokens
    assert "--port" not in cmd  # ServerProcess adds a free one


def test_gorgon_serves_plainly_unless_asked_to_speculate(tmp_path):
    """Engine against engine: gorgon serve speculates on the CPU by default, the baselines never do."""
    for given, want in (([], "none"), (["--medusa", "auto"], "auto")):
        args = serving.parse_args(["--model", str(tmp_path), *given])
        gorgon = serving.server_commands(args, tmp_path, threads=1)["gorgon"]
        assert gorgon[gorgon.index("--medusa") + 1] == want


@pytest.mark.parametrize("bf16_gemm", [True, False])
def test_the_transformers_baseline_runs_in_gorgons_dtype(tmp_path, monkeypatch, bf16_gemm):
    """A bf16 checkpoint: gorgon runs it in bf16 by default, and so must the baseline (it loaded fp32, always);
    but in fp32 on a CPU without bf16 GEMM, where torch's bf16 matmuls crawl (gorgon widens bf16 weights there)."""
    import bench.common

    monkeypatch.setattr(bench.common, "bf16_gemm", lambda: bf16_gemm)
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    for given, want in (([], "bfloat16" if bf16_gemm else "float32"), (["--dtype", "float32"], "float32")):
        commands = serving.server_commands(serving.parse_args(["--model", str(tmp_path), *given]), tmp_path, 1)
        baseline = commands["transformers"]
        assert baseline[baseline.index("--dtype") + 1] == want


def test_a_missing_llama_server_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.delenv(serving.LLAMA_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit, match="llama-server not found") as e:
        serving.find_llama_server(None)
    assert "cmake" in str(e.value) and serving.LLAMA_SERVER_ENV in str(e.value)
    not_executable = tmp_path / "llama-server-copy"
    not_executable.write_text("")
    with pytest.raises(SystemExit, match="is not an executable file"):
        serving.find_llama_server(str(not_executable))


def test_llama_server_is_found_by_flag_then_env_then_path(monkeypatch, tmp_path):
    binaries = {}
    for name in ("flag", "env", "path"):
        (tmp_path / name).mkdir()
        binaries[name] = tmp_path / name / "llama-server"
        binaries[name].write_text("#!/bin/sh\n")
        binaries[name].chmod(binaries[name].stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    monkeypatch.setenv(serving.LLAMA_SERVER_ENV, str(binaries["env"]))
    assert serving.find_llama_server(str(binaries["flag"])) == str(binaries["flag"])
    assert serving.find_llama_server(None) == str(binaries["env"])
    monkeypatch.delenv(serving.LLAMA_SERVER_ENV)
    assert serving.find_llama_server(None) == str(binaries["path"])


def test_the_llama_cpp_baseline_needs_a_gguf_file(tmp_path):
    with pytest.raises(SystemExit, match="needs --model FILE.gguf"):
        serving.main(["--baseline", "llama.cpp", "--model", str(tmp_path), "--out", str(tmp_path / "o.json")])


def _stream(chunks: list[dict]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("tokens, ok", [(3, True), (2, False)])
def test_the_client_counts_usage_tokens_of_a_llama_server_stream(tokens, ok):
    # llama-server's /v1/completions stream: one chunk per token, then a final chunk with the finish reason,
    # empty text and the usage, then [DONE]
    chunks = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in ("", "a", "b")]
    chunks.append({"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                   "usage": {"completion_tokens": tokens, "prompt_tokens": 5, "total_tokens": 5 + tokens}})
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=_stream(chunks)))

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            return await serving.one_request(client, "http://server", "prompt", max_tokens=3)

    result = asyncio.run(go())
    assert result.ok is ok and result.tokens == tokens
    assert 0 < result.ttft_s <= result.latency_s


def test_repeats_pool_all_tokens_over_all_wall_time():
    R = serving.RequestResult
    runs = [([R(True, 64, 0.1, 1.0)] * 2, 2.0), ([R(True, 64, 0.2, 1.0), R(False)], 1.0)]
    row = serving.pool("gorgon", 2, runs)
    assert row["tok/s"] == pytest.approx(3 * 64 / 3.0)
    assert row["tok/s per repeat"] == pytest.approx([64.0, 64.0])
    assert row["requests"] == 4 and row["errors"] == 1
