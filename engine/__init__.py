"""gorgon's decoding engine. Public API: LLM, SamplingParams, EngineConfig, RequestOutput, ContextLengthError."""
from engine.config import ContextLengthError, EngineConfig, SamplingParams
from engine.llm_engine import LLM
from engine.outputs import RequestOutput

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "ContextLengthError"]
