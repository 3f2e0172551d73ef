"""What the routes share: the server's configuration, the engine, and the metrics, reached through the app."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from engine import LLM
from engine.medusa.speculator import PREDICTION_ONLY
from server.async_engine import AsyncEngine
from server.errors import APIError
from server.metrics import ServerMetrics
from server.reasoning import REASONING_FORMATS, ReasoningFormat


@dataclass
class ServerConfig:
    """What the HTTP layer needs besides the engine. `model_name` is the base model's id in the API."""

    model_name: str
    model_root: str  # the base model's folder, reported as its `root`
    # when set, every route but /health, /ping, /version, /metrics and the playground's page requires
    # "Authorization: Bearer <key>"
    api_key: str | None = None
    max_request_bytes: int = 1 << 20
    max_waiting_requests: int | None = None  # beyond it, new requests get a 429 (None: no limit)
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API
    # requests must be addressed to a loopback name (server.guards.HostGuard): `gorgon serve` sets it when it
    # listens on a loopback address without an API key
    loopback_hosts_only: bool = False
    reasoning_parser: str | None = None  # server.reasoning.REASONING_FORMATS: chat answers' reasoning split off


@dataclass
class ServerState:
    llm: LLM
    engine: AsyncEngine
    metrics: ServerMetrics
    config: ServerConfig
    created: int = field(default_factory=lambda: int(time.time()))  # the model cards' (the same on every call)

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def reasoning(self) -> ReasoningFormat | None:
        """How chat answers reason (--reasoning-parser), None where they are not split."""
        return REASONING_FORMATS.get(self.config.reasoning_parser)

    @property
    def speculates(self) -> bool:
        """Whether a request's `use_medusa` speculates: the engine drafts with heads or by prompt lookup (a
        prediction-only engine drafts only from the predicted output a request gives; heads whose measured trees
        do not pay here leave the engine without speculation)."""
        return self.llm.medusa is not None and self.llm.config.medusa != PREDICTION_ONLY

    def resolve_adapter(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base model)."""
        if model in (None, "", self.config.model_name):
            return None
        if any(a["name"] == model for a in self.engine.list_adapters()):
            return model
        raise APIError(404, f"the model {model!r} does not exist", "not_found_error", "model", "model_not_found")

    def context_length(self, adapter: str | None) -> int:
        """The tokens a request may span, prompt and output: a prefix adapter's virtual tokens take their part."""
        virtual = next((a["num_virtual_tokens"] for a in self.engine.list_adapters() if a["name"] == adapter), 0)
        return self.llm.max_model_len - virtual


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]
