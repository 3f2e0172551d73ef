"""gorgon's decoding engine. Public API: LLM, SamplingParams, EngineConfig, RequestOutput."""
from engine.config import EngineConfig, SamplingParams
from engine.llm_engine import LLM
from engine.outputs import RequestOutput

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput"]
