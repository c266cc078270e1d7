"""The engine: requests in, a scheduler, a model runner, tokens out."""

from labkit.engine.engine import Engine, EngineConfig

__all__ = ["Engine", "EngineConfig"]
