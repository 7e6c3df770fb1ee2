"""OpenAI-compatible HTTP server: `create_app(engine)`, or `lragent serve` (see `lragent.server.cli`)."""

from lragent.server.app import ServerSettings, create_app
from lragent.server.engine_loop import AsyncEngine

__all__ = ["AsyncEngine", "ServerSettings", "create_app"]
