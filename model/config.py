"""Model configuration, read from the checkpoint's own `config.json`.

No size is hard-coded anywhere else in the project: every width, depth, id and limit comes from here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP2 vision tower."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> VisionConfig:
        act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"vision_config.hidden_act {act!r} is not supported (expected gelu_pytorch_tanh)")
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            patch_size=cfg["patch_size"],
            image_size=cfg["image_size"],
            num_channels=cfg.get("num_channels", 3),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
        )


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Bidirectional Llama decoder."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> TextConfig:
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"llm_config.hidden_act {act!r} is not supported (expected silu)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("llm_config: attention/mlp biases are not supported")
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        rope_scaling = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                )
            elif kind not in (None, "default"):
                raise ValueError(f"llm_config.rope_scaling type {kind!r} is not supported")
        heads = cfg["num_attention_heads"]
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(cfg.get("rope_theta", 500000.0)),
            rope_scaling=rope_scaling,
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole embedder: vision tower, pixel-shuffle projector, decoder, pooling and prompts."""

    vision: VisionConfig
    text: TextConfig
    downsample_ratio: float
    img_context_token_id: int
    force_image_size: int
    use_thumbnail: bool
    max_dynamic_patch: int
    query_prefix: str
    passage_prefix: str
    projector_layer_norm_eps: float = 1e-5

    @property
    def shuffle_factor(self) -> int:
        """Patches merged per side by the pixel shuffle (2 for ratio 0.5)."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        return self.vision.num_patches // self.shuffle_factor**2

    @property
    def projector_in_features(self) -> int:
        return self.vision.hidden_size * self.shuffle_factor**2

    @property
    def embedding_size(self) -> int:
        return self.text.hidden_size

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        if cfg.get("ps_version", "v2") != "v2":
            raise ValueError(f"ps_version {cfg['ps_version']!r} is not supported (expected v2)")
        if cfg.get("select_layer", -1) != -1:
            raise ValueError("select_layer other than -1 is not supported")
        if cfg.get("pooling", "avg") != "avg":
            raise ValueError(f"pooling {cfg['pooling']!r} is not supported (expected avg)")
        vision = VisionConfig.from_hf_config(cfg["vision_config"])
        image_size = cfg.get("force_image_size") or vision.image_size
        if image_size != vision.image_size:
            raise ValueError(f"force_image_size {image_size} differs from vision image_size {vision.image_size}")
        ratio = float(cfg.get("downsample_ratio", 0.5))
        factor = round(1 / ratio)
        if vision.patches_per_side % factor:
            raise ValueError(f"downsample_ratio {ratio} does not divide the {vision.patches_per_side}-patch grid")
        return cls(
            vision=vision,
            text=TextConfig.from_hf_config(cfg["llm_config"]),
            downsample_ratio=ratio,
            img_context_token_id=int(cfg["img_context_token_id"]),
            force_image_size=image_size,
            use_thumbnail=bool(cfg.get("use_thumbnail", True)),
            max_dynamic_patch=int(cfg.get("max_dynamic_patch", 6)),
            query_prefix=cfg.get("query_prefix", "query:"),
            passage_prefix=cfg.get("passage_prefix", "passage:"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf_config(json.loads((Path(path) / "config.json").read_text()))
