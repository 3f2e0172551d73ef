"""gorgon's decoding engine. Public API: LLM, SamplingParams, StructuredOutput, ReasoningTags, EngineConfig,
RequestOutput, ContextLengthError, own_medusa_heads (where a model's own Medusa heads are) and SAMPLING_FIELDS (the
sampling parameters a model may recommend: LLM.sampling_defaults)."""
from engine.config import ContextLengthError, EngineConfig, ReasoningTags, SamplingParams, StructuredOutput
from engine.llm_engine import LLM
from engine.outputs import RequestOutput
from models.loader import SAMPLING_FIELDS
from models.named import own_medusa_heads

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "ReasoningTags", "EngineConfig", "RequestOutput",
           "ContextLengthError", "own_medusa_heads", "SAMPLING_FIELDS"]
