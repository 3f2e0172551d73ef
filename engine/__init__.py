"""gorgon's decoding engine. Public API: LLM, SamplingParams, EngineConfig, RequestOutput."""
from engine.config import EngineConfig, SamplingParams
from engine.outputs import RequestOutput

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput"]


def __getattr__(name: str):
    # LLM is imported lazily: models/ imports engine.context, and an eager import of the engine
    # (which imports models/) would make that a cycle.
    if name == "LLM":
        from engine.llm_engine import LLM
        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
