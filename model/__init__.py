"""JAX/Flax reimplementation of llama-nemotron-embed-vl-1b-v2."""

from model.batching import PreparedInput
from model.config import ModelConfig
from model.embedder import EmbedInput, Embedder
from model.processor import Processor
from model.tokenization import InputTooLongError, Truncate

__all__ = ["EmbedInput", "Embedder", "InputTooLongError", "ModelConfig", "PreparedInput", "Processor", "Truncate"]
