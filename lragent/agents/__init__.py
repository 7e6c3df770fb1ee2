"""AutoAct-style multi-agent pipeline (plan / action / reflect LoRA roles) over offline tools."""

from lragent.agents.episode import Episode, EpisodeConfig, EpisodeResult
from lragent.agents.pipeline import PipelineConfig, detect_task, make_episode, run_pipeline
from lragent.agents.tools import ToolBox, ToolConfig

__all__ = [
    "Episode",
    "EpisodeConfig",
    "EpisodeResult",
    "PipelineConfig",
    "ToolBox",
    "ToolConfig",
    "detect_task",
    "make_episode",
    "run_pipeline",
]
