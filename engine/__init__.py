"""Batching policy between the service and the model: buckets, packing, warm-up, overlap."""

from engine.buckets import BucketPlan
from engine.compilation_cache import configure_compilation_cache
from engine.engine import Engine, EngineConfig, EngineItem, EngineStats

__all__ = ["BucketPlan", "Engine", "EngineConfig", "EngineItem", "EngineStats", "configure_compilation_cache"]
