"""`gorgon bench serving`: gorgon's HTTP server vs a baseline server (transformers `generate`, one request
at a time), both started here as subprocesses on loopback and driven by the same streaming client load.

At each concurrency level, that many clients send streaming completions (greedy, `ignore_eos`, the same
`max_tokens`, distinct prompts) until the level's request count is done or its time is up. Reported per
server and level: output tokens/s over the level's wall time, time to first token and request latency
(p50/p99), and errors (a failed request, or one that ends short of max_tokens)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from bench.common import machine_info, print_table, random_checkpoint, write_json
from models import DEFAULT_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT_SNIPPETS = ["def parse_args(argv):\n", "import os\nimport sys\n\n", "class Cache:\n    def __init__(self",
                   "for line in open(path):\n", "    return sorted(items, key=", "try:\n    import json\nexcept"]


@dataclass
class RequestResult:
    ok: bool
    tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gorgon bench serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF checkpoint folder (default: the shipped model if present, else a "
                                        "random model of its size)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-stream", type=int, default=1,
                        help="requests per level = this x the level's concurrency (at least 4)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--level-timeout", type=float, default=120.0,
                        help="seconds a level may take: no new request starts after it")
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--plot", help="PNG file: throughput and TTFT p99 against concurrency")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess on a loopback port, stopped (SIGTERM, then kill) on exit."""

    def __init__(self, name: str, module: str, args: list[str]) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, "-m", module, *args, "--host", "127.0.0.1",
                                         "--port", str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} server exited:\n{self.log.read().decode(errors='replace')[-3000:]}")
            try:
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
                if ttft is None and chunk["choices"]:
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return RequestResult(ok=False)
    ok = done and ttft is not None and tokens == max_tokens
    return RequestResult(ok, tokens, ttft or 0.0, time.perf_counter() - start)


async def run_level(url: str, concurrency: int, num_requests: int, max_tokens: int, timeout: float,
                    bar: tqdm) -> tuple[list[RequestResult], float]:
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
                bar.update()

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


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for server in ("gorgon", "baseline"):
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
    fig.suptitle("gorgon serve vs transformers generate (one request at a time)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gorgon-bench-") as tmp:
        if args.model:
            folder, source = Path(args.model), args.model
        elif (DEFAULT_MODEL_DIR / "config.json").is_file():
            folder, source = DEFAULT_MODEL_DIR, "the shipped default model"
        else:
            folder, source = random_checkpoint("small", "float32", Path(tmp)), \
                "random weights, small shape (the shipped default model is absent)"
        run(args, folder, source)


def run(args: argparse.Namespace, folder: Path, source: str) -> None:
    print(f"model: {source}")
    levels = sorted(args.concurrency)
    servers = {
        "gorgon": ("server", ["--model", str(folder), "--max-num-seqs", str(max(levels)), "--log-level", "warning"]),
        "baseline": ("bench.baseline_server", ["--model", str(folder)]),
    }
    rows = []
    total = 2 * sum(requests_at(c, args) for c in levels)
    with tqdm(total=total, desc="bench serving") as bar:
        for name, (module, server_args) in servers.items():
            with ServerProcess(name, module, server_args) as server:
                server.wait_ready()
                warmup, _ = asyncio.run(run_level(server.url, 1, 1, args.max_tokens, args.level_timeout,
                                                  tqdm(disable=True)))
                if not warmup[0].ok:
                    raise RuntimeError(f"the {name} server failed its warm-up request")
                for c in levels:
                    results, wall_s = asyncio.run(run_level(server.url, c, requests_at(c, args),
                                                            args.max_tokens, args.level_timeout, bar))
                    rows.append(summarize(name, c, results, wall_s))

    baseline = {r["concurrency"]: r["tok/s"] for r in rows if r["server"] == "baseline"}
    for r in rows:
        r["vs baseline"] = r["tok/s"] / baseline[r["concurrency"]] if baseline[r["concurrency"]] else None
    print(f"\n{source}; greedy streams of {args.max_tokens} tokens; baseline = transformers generate, one request "
          "at a time")
    print_table(rows, ["server", "concurrency", "requests", "errors", "tok/s", "vs baseline", "ttft_p50_ms",
                       "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms"])
    ours = {r["concurrency"]: r for r in rows if r["server"] == "gorgon"}
    summary = {"errors": sum(r["errors"] for r in rows)}
    for c in levels:
        summary[f"throughput_ratio_c{c}"] = ours[c]["vs baseline"]
        summary[f"ttft_p99_ms_c{c}"] = ours[c]["ttft_p99_ms"]
    write_json(args.out, {"benchmark": "serving", "model": source, "max_tokens": args.max_tokens,
                          "requests_per_stream": args.requests_per_stream, "results": rows,
                          "machine": machine_info(), "summary": summary})
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
