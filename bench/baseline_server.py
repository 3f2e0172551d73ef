"""The baseline of `gorgon bench serving`: transformers `generate`, one request at a time, behind the same
streaming `/v1/completions` shape as gorgon's server (SSE chunks, usage at the end, `data: [DONE]`).

Run: python -m bench.baseline_server --model DIR --port PORT [--threads N]"""
from __future__ import annotations

import argparse
import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class BaselineRequest(BaseModel):
    prompt: str
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    ignore_eos: bool = False


class _QueueStreamer(BaseStreamer):
    """Hands each new token id from generate's thread to the event loop; None marks the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        for token_id in value.flatten().tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token_id)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def create_baseline_app(model_dir: str, dtype: str = "float32") -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    one_at_a_time = ThreadPoolExecutor(max_workers=1)
    app = FastAPI(title="gorgon bench baseline")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.post("/v1/completions")
    async def completions(req: BaselineRequest) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        prompt_ids = tokenizer(req.prompt, return_tensors="pt")["input_ids"]

        def generate() -> None:
            sampling = {"do_sample": req.temperature > 0}
            if req.temperature > 0:
                sampling["temperature"] = req.temperature
            with torch.inference_mode():
                model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=req.max_tokens,
                               min_new_tokens=req.max_tokens if req.ignore_eos else 0, top_k=None, top_p=None,
                               pad_token_id=tokenizer.pad_token_id or 0,
                               streamer=_QueueStreamer(loop, tokens), **sampling)

        job = loop.run_in_executor(one_at_a_time, generate)

        async def events():
            generated = []
            while (token_id := await tokens.get()) is not None:
                generated.append(token_id)
                chunk = {"object": "text_completion", "choices": [
                    {"index": 0, "text": tokenizer.decode([token_id]), "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            await job
            finish = "length" if len(generated) == req.max_tokens else "stop"
            usage = {"prompt_tokens": prompt_ids.shape[1], "completion_tokens": len(generated),
                     "total_tokens": prompt_ids.shape[1] + len(generated)}
            yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': finish}]})}\n\n"
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(create_baseline_app(args.model, args.dtype), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
