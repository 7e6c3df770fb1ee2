"""`LoRARequest`: vLLM's way of naming the adapter of a request (`vllm.lora.request.LoRARequest`)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name and folder, with vLLM's field names.

    `LLM.generate(..., lora_request=LoRARequest("plan", 1, "adapters/plan"))` loads the folder under that name when no
    adapter of that name is loaded, and uses it. A loaded adapter of the same name from another folder is an error
    (never silently the wrong weights). `lora_int_id` (>= 1) is kept for vLLM compatibility; adapters are keyed by name.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("LoRARequest.lora_name must be a non-empty string")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if isinstance(self.lora_path, os.PathLike):
            object.__setattr__(self, "lora_path", os.fspath(self.lora_path))
        if not isinstance(self.lora_path, str):
            raise ValueError("LoRARequest.lora_path must be a string (the adapter's folder)")
