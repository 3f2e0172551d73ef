"""`gorgon bench serving`: gorgon's HTTP server vs a baseline server, both started here as subprocesses on
loopback, one after the other, and driven by the same streaming client load.

Baselines: `transformers` (the default; `bench/baseline_server.py`, transformers `generate`, one request at a
time, on an HF folder) or `llama.cpp` (`--model X.gguf`: llama.cpp's own `llama-server` on the same file, with
the same threads, continuous batching and one slot per stream of the largest level).

At each concurrency level, that many clients send streaming completions (greedy, `ignore_eos`, the same
`max_tokens`, distinct prompts) until the level's request count is done or its time is up. Reported per
server and level: output tokens/s over the level's wall time (tokens as each server's `usage` counts them),
time to first token (the first chunk with text) and request latency (p50/p99), and errors (a failed request,
or one that ends short of max_tokens). With `--repeats R` the servers take turns R times (gorgon, baseline,
gorgon, ...), each started afresh; tokens/s is pooled over the repeats (all tokens over all wall time)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from tqdm import tqdm

from bench.common import (
    add_out_flag,
    baseline_dtype,
    cpu_isa,
    machine_info,
    print_table,
    random_checkpoint,
    write_json,
)
from models import DEFAULT_MODEL_DIR
from models.loader import default_dtype
from models.named import resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT_SNIPPETS = ["def parse_args(argv):\n", "import os\nimport sys\n\n", "class Cache:\n    def __init__(self",
                   "for line in open(path):\n", "    return sorted(items, key=", "try:\n    import json\nexcept"]
LLAMA_SERVER_ENV = "GORGON_LLAMA_SERVER"
PROMPT_TOKENS_BUDGET = 64  # KV room per llama-server slot for the prompt (ours are about 10 to 20 tokens)
LLAMA_SERVER_HOWTO = f"""\
llama-server not found: pass --llama-server PATH, set {LLAMA_SERVER_ENV}, or put llama-server on PATH.
To build it from the llama.cpp inside llama-cpp-python's source distribution (no network needed once downloaded),
with the shared libllama that llama-cpp-python (bench decode's and bench medusa's baseline) can load, so that
llama.cpp compiles once (about 10 min on 2 cores, against 15 for llama-cpp-python alone and 25 for the server):
  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp
  tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
  cmake -S /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/llama-server-build -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=ON
  cmake --build /tmp/llama-server-build --target llama-server llama -j   # then /tmp/llama-server-build/bin/llama-server
  # llama-cpp-python without compiling llama.cpp again, loading the libraries built above:
  CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install /tmp/lcp/llama_cpp_python-0.3.36.tar.gz
  export LLAMA_CPP_LIB_PATH=/tmp/llama-server-build/bin"""


@dataclass
class RequestResult:
    ok: bool
    tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon bench serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF checkpoint folder, or a .gguf file (or a named model: smollm2) with "
                                        "--baseline llama.cpp (default: "
                                        "the shipped model if present, else a random model of its size)")
    parser.add_argument("--baseline", choices=["transformers", "llama.cpp"], default="transformers")
    parser.add_argument("--llama-server", help=f"the llama-server binary (default: ${LLAMA_SERVER_ENV}, else "
                                               "llama-server on PATH)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of each server (default: torch's choice here, passed to both)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="gorgon serve's --dtype (default: its own choice for the model)")
    parser.add_argument("--medusa", default="none",
                        help="gorgon serve's --medusa: none (default: plain decoding, engine against engine), auto "
                             "(the model's own heads, as gorgon serve speculates on the CPU), lookup, a heads folder")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="concurrent streams, one level after another (default: 1 8 32)")
    parser.add_argument("--requests-per-stream", type=int, default=1,
                        help="requests per level = this x the level's concurrency (at least 4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens a stream asks for (default: 32)")
    parser.add_argument("--level-timeout", type=float, default=120.0,
                        help="seconds a level may take: no new request starts after it")
    parser.add_argument("--repeats", type=int, default=1, help="turns each server takes, alternating")
    add_out_flag(parser, "serving")
    parser.add_argument("--plot", help="PNG file: throughput and TTFT p99 against concurrency")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_llama_server(path: str | None) -> str:
    """--llama-server, else $GORGON_LLAMA_SERVER, else llama-server on PATH; SystemExit saying how to build it."""
    candidate = path or os.environ.get(LLAMA_SERVER_ENV) or shutil.which("llama-server")
    if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
        return str(Path(candidate).resolve())
    where = f" ({candidate} is not an executable file)" if candidate else ""
    raise SystemExit(LLAMA_SERVER_HOWTO.replace("not found:", f"not found{where}:", 1))


def llama_server_command(binary: str, model: str | Path, threads: int, slots: int, max_tokens: int) -> list[str]:
    """llama-server on `model` with `threads` for decode and prompt alike, `slots` parallel slots, continuous
    batching, and a context of `slots` x (prompt budget + max_tokens), rounded up to 256 per slot."""
    context = slots * -(-(PROMPT_TOKENS_BUDGET + max_tokens) // 256) * 256
    return [binary, "--model", str(model), "--host", "127.0.0.1", "--threads", str(threads), "--threads-batch",
            str(threads), "--parallel", str(slots), "--cont-batching", "--ctx-size", str(context), "--no-webui"]


def server_commands(args: argparse.Namespace, model: Path, threads: int) -> dict[str, list[str]]:
    """name -> command line, less `--port` (ServerProcess adds a free one): gorgon first, then the baseline."""
    slots = max(args.concurrency)
    python = [sys.executable, "-m"]
    gorgon = [*python, "server", "--model", str(model), "--max-num-seqs", str(slots), "--threads", str(threads),
              "--log-level", "warning", "--host", "127.0.0.1", "--medusa", args.medusa,
              *(["--dtype", args.dtype] if args.dtype else [])]
    if args.baseline == "llama.cpp":
        binary = find_llama_server(args.llama_server)
        return {"gorgon": gorgon, "llama.cpp": llama_server_command(binary, model, threads, slots, args.max_tokens)}
    # the baseline in the dtype gorgon runs (its default for the model unless --dtype says), at its best on this CPU
    dtype = baseline_dtype(args.dtype or default_dtype(model, "cpu"), "cpu")
    return {"gorgon": gorgon, "transformers": [*python, "bench.baseline_server", "--model", str(model), "--threads",
                                               str(threads), "--host", "127.0.0.1", "--dtype", dtype]}


class ServerProcess:
    """A server subprocess on a free loopback port, stopped (SIGTERM, then kill) on exit."""

    def __init__(self, name: str, command: list[str]) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([*command, "--port", str(self.port)], env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} server exited:\n{self.log.read().decode(errors='replace')[-3000:]}")
            try:  # llama-server answers 503 while it loads the model
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server did not come up in {timeout:.0f} s")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                return RequestResult(ok=False)
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(ok=False)
                if ttft is None and any(choice.get("text") for choice in chunk.get("choices") or []):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return RequestResult(ok=False)
    ok = done and ttft is not None and tokens == max_tokens
    return RequestResult(ok, tokens, ttft or 0.0, time.perf_counter() - start)


async def run_level(url: str, concurrency: int, num_requests: int, max_tokens: int,
                    timeout: float) -> tuple[list[RequestResult], float]:
    """`concurrency` clients share `num_requests` requests; none starts after `timeout` seconds."""
    next_request = iter(range(num_requests))
    start = time.perf_counter()
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        async def stream_client() -> None:
            for i in next_request:
                if time.perf_counter() - start > timeout:
                    return
                prompt = f"# request {i}\n{PROMPT_SNIPPETS[i % len(PROMPT_SNIPPETS)]}"
                results.append(await one_request(client, url, prompt, max_tokens))

        await asyncio.gather(*(stream_client() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def summarize(server: str, concurrency: int, results: list[RequestResult], wall_s: float) -> dict:
    good = [r for r in results if r.ok]
    ttft_ms = np.array([r.ttft_s for r in good]) * 1e3
    latency_ms = np.array([r.latency_s for r in good]) * 1e3

    def pct(values: np.ndarray, q: float) -> float | None:
        return float(np.percentile(values, q)) if len(values) else None

    return {"server": server, "concurrency": concurrency, "requests": len(results),
            "errors": len(results) - len(good), "tok/s": sum(r.tokens for r in good) / wall_s,
            "ttft_p50_ms": pct(ttft_ms, 50), "ttft_p99_ms": pct(ttft_ms, 99),
            "latency_p50_ms": pct(latency_ms, 50), "latency_p99_ms": pct(latency_ms, 99), "wall_s": wall_s}


def requests_at(concurrency: int, args: argparse.Namespace) -> int:
    return max(4, args.requests_per_stream * concurrency)


def plot(rows: list[dict], servers: list[str], title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for server in servers:
        mine = [r for r in rows if r["server"] == server]
        levels = [r["concurrency"] for r in mine]
        ax_tput.plot(levels, [r["tok/s"] for r in mine], marker="o", label=server)
        ax_ttft.plot(levels, [r["ttft_p99_ms"] for r in mine], marker="o", label=server)
    for ax, label in ((ax_tput, "output tokens/s"), (ax_ttft, "TTFT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.legend()
    ax_ttft.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model:
        try:
            args.model = str(resolve_model(args.model))  # a named model (smollm2) is the file its package ships
        except ValueError as e:
            sys.exit(f"gorgon bench serving: error: {e}")
    if args.baseline == "llama.cpp":
        if not args.model or Path(args.model).suffix != ".gguf" or not Path(args.model).is_file():
            sys.exit("gorgon bench serving: --baseline llama.cpp needs --model FILE.gguf (both servers run that file)")
        find_llama_server(args.llama_server)  # fail before anything starts
        run(args, Path(args.model), args.model)
        return
    with tempfile.TemporaryDirectory(prefix="gorgon-bench-") as tmp:
        if args.model:
            folder, source = Path(args.model), args.model
        elif (DEFAULT_MODEL_DIR / "config.json").is_file():
            folder, source = DEFAULT_MODEL_DIR, "the shipped default model"
        else:
            folder, source = random_checkpoint("small", "float32", Path(tmp)), \
                "random weights, small shape (the shipped default model is absent)"
        run(args, folder, source)


def pool(server: str, concurrency: int, runs: list[tuple[list[RequestResult], float]]) -> dict:
    """One row over every repeat: all requests' percentiles, all tokens over all wall time."""
    row = summarize(server, concurrency, [r for results, _ in runs for r in results], sum(w for _, w in runs))
    row["tok/s per repeat"] = [summarize(server, concurrency, results, wall)["tok/s"] for results, wall in runs]
    return row


def run(args: argparse.Namespace, model: Path, source: str) -> None:
    threads = args.threads or torch.get_num_threads()
    levels = sorted(args.concurrency)
    commands = server_commands(args, model, threads)
    names = list(commands)
    baseline = names[1]
    isa = cpu_isa()
    print(f"model: {source}; {threads} thread(s) per server; CPU: {isa}")
    measured: dict[tuple[str, int], list[tuple[list[RequestResult], float]]] = {}
    # one tick a level: --level-timeout ends a level long before its requests are done, so they make no ETA
    with tqdm(total=args.repeats * len(names) * len(levels), desc="bench serving", unit="level") as bar:
        for _ in range(args.repeats):
            for name in names:
                with ServerProcess(name, commands[name]) as server:
                    server.wait_ready()
                    top = max(levels)  # warm-up: every stream of the largest level, a few tokens each
                    warmup, _ = asyncio.run(run_level(server.url, top, top, min(8, args.max_tokens),
                                                      args.level_timeout))
                    if not all(r.ok for r in warmup):
                        raise RuntimeError(f"the {name} server failed its warm-up requests")
                    for c in levels:
                        bar.set_postfix(server=name, concurrency=c)
                        measured.setdefault((name, c), []).append(asyncio.run(run_level(
                            server.url, c, requests_at(c, args), args.max_tokens, args.level_timeout)))
                        bar.update()

    rows = [pool(name, c, measured[name, c]) for name in names for c in levels]
    theirs = {r["concurrency"]: r["tok/s"] for r in rows if r["server"] == baseline}
    for r in rows:
        r["vs baseline"] = r["tok/s"] / theirs[r["concurrency"]] if theirs[r["concurrency"]] else None
    # (a server without batching: the ratio grows with the streams, as batching does; a level of 1 compares engines)
    baseline_command = commands[baseline]
    described = {"transformers": f"transformers generate in {baseline_command[baseline_command.index('--dtype') + 1]}"
                                 ", one request at a time, no batching",
                 "llama.cpp": f"llama-server, {max(levels)} slots, continuous batching, same file"}[baseline]
    print(f"\n{source}; gorgon dtype {args.dtype or 'default'}, speculation --medusa {args.medusa}; {threads} "
          f"thread(s) per server; CPU: {isa}; greedy "
          f"streams of {args.max_tokens} tokens; {args.repeats} turn(s) each; baseline = {described}")
    print_table(rows, ["server", "concurrency", "requests", "errors", "tok/s", "vs baseline", "ttft_p50_ms",
                       "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms"])
    ours = {r["concurrency"]: r for r in rows if r["server"] == "gorgon"}
    key = "throughput_ratio_vs_llamacpp" if baseline == "llama.cpp" else "throughput_ratio"
    summary = {"errors": sum(r["errors"] for r in rows)}
    for c in levels:
        summary[f"{key}_c{c}"] = ours[c]["vs baseline"]
        summary[f"ttft_p99_ms_c{c}"] = ours[c]["ttft_p99_ms"]
    result = {"benchmark": "serving", "baseline": baseline, "model": source, "max_tokens": args.max_tokens,
              "requests_per_stream": args.requests_per_stream, "level_timeout_s": args.level_timeout,
              "repeats": args.repeats, "gorgon_dtype": args.dtype, "gorgon_medusa": args.medusa, "threads": threads,
              "cpu_isa": isa, "results": rows, "commands": commands,
              "machine": machine_info(), "summary": summary}
    if baseline == "llama.cpp":
        result["llama_server"] = {"binary": commands[baseline][0], "command": commands[baseline],
                                  "version": llama_server_version(commands[baseline][0])}
    write_json(args.out, result)
    if args.plot:
        plot(rows, names, f"gorgon serve vs {described}", args.plot)


def llama_server_version(binary: str) -> str | None:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return " ".join((done.stdout + done.stderr).split()) or None


if __name__ == "__main__":
    main()
