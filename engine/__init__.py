"""Batching policy between the service and the model: buckets, packing, warm-up, overlap."""

from engine.buckets import BucketPlan
from engine.engine import Engine, EngineConfig, EngineItem, EngineStats, configure_compilation_cache

__all__ = ["BucketPlan", "Engine", "EngineConfig", "EngineItem", "EngineStats", "configure_compilation_cache"]
