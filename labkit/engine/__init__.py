"""The engine: requests in, a scheduler, a model runner, tokens out."""

from labkit.engine.config import EngineConfig
from labkit.engine.engine import Engine
from labkit.engine.scheduler import SchedulerConfig

__all__ = ["Engine", "EngineConfig", "SchedulerConfig"]
