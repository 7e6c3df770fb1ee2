"""lragent: multi-LoRA agents on one base model with a KV cache shared across agents (LRAgent)."""

from lragent.cache.sharing import SharingMode
from lragent.config import EngineConfig
from lragent.engine.llm_engine import CompletionOutput, LLMEngine, RequestOutput
from lragent.llm import LLM
from lragent.lora.adapter import AdapterError
from lragent.lora.request import LoRARequest
from lragent.sampling import SamplingParams

__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "SamplingParams",
    "SharingMode",
    "RequestOutput",
    "CompletionOutput",
    "AdapterError",
    "LoRARequest",
]
__version__ = "0.1.0"
