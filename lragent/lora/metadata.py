"""Which adapter each token of a flattened batch uses, grouped once per step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (slot, token indices or None for "all tokens"); slot 0 (no adapter) is left out.
Segments = list[tuple[int, torch.Tensor | None]]


def group_by_slot(token_slots: list[int], device: torch.device) -> Segments:
    """Group token positions by adapter slot so each adapter's matmuls run once over its tokens."""
    distinct = sorted(set(token_slots))
    if len(distinct) == 1:
        return [] if distinct[0] == 0 else [(distinct[0], None)]
    slots = torch.tensor(token_slots)
    segments: Segments = []
    for slot in distinct:
        if slot != 0:
            segments.append((slot, torch.nonzero(slots == slot).flatten().to(device)))
    return segments


@dataclass
class LoRAMetadata:
    segments: Segments  # over all tokens computed this step
    base_segments: Segments  # over the tokens whose keys/base values are written (a subset in LR prefill)
