"""Independent PyTorch reference for llama-nemotron-embed-vl-1b-v2 (see /work/shared/MODEL_SPEC.md).

Built only from transformers' own modules (SiglipVisionModel, LlamaModel) plus a hand-written
InternVL pixel shuffle, projector, tiling and prompt logic. It must never import the project's `model`.

    ref = ReferenceModel.from_pretrained(ckpt_dir, dtype=torch.float32)
    vecs = ref.embed([{"text": "hi", "image": None, "input_type": "query"}])   # float32 [n, Dl]
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel
try:
    from transformers.initialization import no_init_weights
except ImportError:  # transformers < 5.20
    from transformers.modeling_utils import no_init_weights

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


# ----------------------------------------------------------------------------------------- tiling
def target_ratios(max_num: int = 6) -> list[tuple[int, int]]:
    """Candidate (cols, rows) grids, built exactly like InternVL's `dynamic_preprocess`."""
    return sorted(
        set((i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if 1 <= i * j <= max_num),
        key=lambda x: x[0] * x[1],
    )


def find_grid(width: int, height: int, image_size: int, max_num: int = 6) -> tuple[int, int]:
    """First strictly best (cols, rows) by min(area ratio, 0.6) * min(r/a, a/r) (Eagle2 `_v2` scoring)."""
    aspect, area = width / height, width * height
    best, best_score = (1, 1), float("-inf")
    for cols, rows in target_ratios(max_num):
        r = cols / rows
        score = min((cols * rows * image_size * image_size) / area, 0.6) * min(r / aspect, aspect / r)
        if score > best_score:
            best, best_score = (cols, rows), score
    return best


def tile_image(image: Image.Image, image_size: int, max_num: int = 6, use_thumbnail: bool = True) -> list[Image.Image]:
    image = image.convert("RGB")
    cols, rows = find_grid(image.width, image.height, image_size, max_num)
    resized = image.resize((cols * image_size, rows * image_size), Image.BICUBIC)
    tiles = [
        resized.crop(((k % cols) * image_size, (k // cols) * image_size, (k % cols + 1) * image_size, (k // cols + 1) * image_size))
        for k in range(cols * rows)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def tiles_to_tensor(tiles: list[Image.Image]) -> torch.Tensor:
    """[N, 3, S, S] float32: (x/255 - 0.5)/0.5, rounded through bfloat16 like the reference processor."""
    x = torch.stack([torch.from_numpy(np.asarray(t, dtype=np.uint8).copy()).permute(2, 0, 1) for t in tiles])
    x = x.to(torch.float32).div(255).sub(0.5).div(0.5)
    return x.to(torch.bfloat16).to(torch.float32)


# ---------------------------------------------------------------------------------- pixel shuffle
def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """[N, P, C] -> [N, P*s^2, C/s^2]: InternVL/Eagle `extract_feature` + `pixel_shuffle` (ps_version v2), verbatim."""
    n_tiles, p, _ = x.shape
    h = w = int(p**0.5)
    x = x.reshape(n_tiles, h, w, -1)
    n, w, h, c = x.size()  # InternVL's own (mis)naming: dim 1 is the patch row
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    x = x.permute(0, 2, 1, 3).contiguous()  # ps_version "v2"
    return x.reshape(n, -1, x.shape[-1])


# ---------------------------------------------------------------------------------- checkpoint io
def load_safetensors_dir(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (ckpt_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {ckpt_dir}")
    state = {}
    for f in files:
        state.update(load_file(str(ckpt_dir / f)))
    return state


def split_state(state: dict[str, torch.Tensor]):
    vision, proj, llm, unexpected = {}, {}, {}, []
    for k, v in state.items():
        if k.startswith("vision_model."):
            k = k[len("vision_model."):]
            vision[k[len("vision_model."):] if k.startswith("vision_model.") else k] = v
        elif k.startswith("mlp1."):
            proj[k[len("mlp1."):]] = v
        elif k.startswith("language_model."):
            k = k[len("language_model."):]
            llm[k[len("model."):] if k.startswith("model.") else k] = v
        else:
            unexpected.append(k)
    if unexpected:
        raise KeyError(f"unexpected checkpoint tensors: {unexpected[:10]}")
    return vision, proj, llm


def llama_config(c: dict, attn_implementation: str) -> LlamaConfig:
    theta = c.get("rope_theta", 10000.0)
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {"rope_type": "default"})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", theta)
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "hidden_act",
            "attention_bias", "mlp_bias"]
    cfg = LlamaConfig(**{k: c[k] for k in keys if k in c}, rope_parameters=rope, attn_implementation=attn_implementation)
    cfg.is_causal = False  # create_causal_mask -> create_bidirectional_mask if ever given a 2D mask
    return cfg


def siglip_config(c: dict, use_head: bool, attn_implementation: str) -> SiglipVisionConfig:
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps"]
    return SiglipVisionConfig(**{k: c[k] for k in keys if k in c}, vision_use_head=use_head,
                              attn_implementation=attn_implementation)


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{name}: missing {missing[:10]}, unexpected {unexpected[:10]}")


# ------------------------------------------------------------------------------------------ model
class ReferenceModel(torch.nn.Module):
    def __init__(self, config: dict, tokenizer, vision: SiglipVisionModel, mlp1: torch.nn.Sequential, llm: LlamaModel):
        super().__init__()
        self.config, self.tokenizer, self.vision_model, self.mlp1, self.language_model = config, tokenizer, vision, mlp1, llm
        vc = config["vision_config"]
        self.image_size = int(config.get("force_image_size") or vc["image_size"])
        self.patch_size = int(vc["patch_size"])
        self.downsample_ratio = float(config.get("downsample_ratio", 0.5))
        self.use_thumbnail = bool(config.get("use_thumbnail", True))
        self.tokens_per_tile = int(round((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2))
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        if "img_context_token_id" in config and config["img_context_token_id"] != self.img_context_token_id:
            raise ValueError(f"tokenizer {IMG_CONTEXT}={self.img_context_token_id} != config {config['img_context_token_id']}")
        self._casts: dict[torch.dtype, ReferenceModel] = {}

    @classmethod
    def from_pretrained(cls, ckpt_dir, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> "ReferenceModel":
        ckpt_dir = Path(ckpt_dir)
        config = json.loads((ckpt_dir / "config.json").read_text())
        vstate, pstate, lstate = split_state(load_safetensors_dir(ckpt_dir))

        dv, dl = config["vision_config"]["hidden_size"], config["llm_config"]["hidden_size"]
        dp = int(round(dv / config.get("downsample_ratio", 0.5) ** 2))
        with no_init_weights():  # every parameter is overwritten by the strict loads below (buffers are unaffected)
            vision = SiglipVisionModel(siglip_config(config["vision_config"], any(k.startswith("head.") for k in vstate), attn_implementation))
            mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(dp, eps=1e-5), torch.nn.Linear(dp, dl), torch.nn.GELU(), torch.nn.Linear(dl, dl))
            llm = LlamaModel(llama_config(config["llm_config"], attn_implementation))
        load_strict(vision, vstate, "vision_model")
        load_strict(mlp1, pstate, "mlp1")
        load_strict(llm, lstate, "language_model")
        for m in llm.modules():  # bidirectional: no causal mask anywhere (sdpa/flash also read module.is_causal)
            if hasattr(m, "is_causal"):
                m.is_causal = False

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
        return cls(config, tokenizer, vision, mlp1, llm).to(dtype).eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    def cast(self, dtype: torch.dtype) -> "ReferenceModel":
        """A (cached) copy of the whole model in another dtype, weights and activations."""
        if dtype == self.dtype:
            return self
        if dtype not in self._casts:
            clone = copy.deepcopy(self)
            clone._casts = {}
            self._casts[dtype] = clone.to(dtype)
        return self._casts[dtype]

    # ---- blocks (torch in / torch out) ----
    @torch.no_grad()
    def vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] normalised pixels -> [N, P, Dv] last hidden state after post_layernorm."""
        return self.vision_model(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle(x, self.downsample_ratio)

    @torch.no_grad()
    def projector(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp1(x.to(self.device, self.dtype))

    @torch.no_grad()
    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids.to(self.device))

    @torch.no_grad()
    def decoder(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional Llama: [B, T, Dl] embeddings + [B, T] padding mask (1 = token) -> final-normed states."""
        b, t, _ = inputs_embeds.shape
        x = inputs_embeds.to(self.device, self.dtype)
        keep = torch.ones(b, t, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool)
        keep = keep.to(self.device)
        # explicit 4D additive mask over keys only (no causal part); create_causal_mask returns 4D masks as-is
        mask4d = torch.zeros(b, 1, 1, t, dtype=x.dtype, device=self.device).masked_fill(
            ~keep[:, None, None, :], torch.finfo(x.dtype).min)
        mask4d = mask4d.expand(b, 1, t, t)  # a view: same padding row for every query
        pos = torch.arange(t, device=self.device)[None].expand(b, t)
        return self.language_model(inputs_embeds=x, attention_mask=mask4d, position_ids=pos, use_cache=False).last_hidden_state

    def preprocess_image(self, image: Image.Image, max_tiles: int = 6) -> torch.Tensor:
        """[tiles, 3, S, S] float32 normalised (bf16-rounded) pixels, thumbnail last."""
        return tiles_to_tensor(tile_image(image, self.image_size, max_tiles, self.use_thumbnail))

    def image_features(self, image: Image.Image, max_tiles: int = 6) -> torch.Tensor:
        """[tiles * tokens_per_tile, Dl] projector outputs for one image (thumbnail last)."""
        feats = self.projector(self.pixel_shuffle(self.vision(self.preprocess_image(image, max_tiles))))
        return feats.reshape(-1, feats.shape[-1])

    def prompt(self, text: str | None, n_tiles: int, input_type: str) -> str:
        prefix = "query: " if input_type == "query" else "passage: "
        image = f"{IMG_START}{IMG_CONTEXT * (self.tokens_per_tile * n_tiles)}{IMG_END} " if n_tiles else ""
        return prefix + image + (text or "")

    # ---- end to end ----
    @torch.no_grad()
    def embed(self, items: list[dict], max_tiles: int = 6, dtype: torch.dtype | None = None) -> np.ndarray:
        if dtype is not None and dtype != self.dtype:
            return self.cast(dtype).embed(items, max_tiles)
        ids, feats = [], []
        for item in items:
            image, text = item.get("image"), item.get("text")
            if image is None and text is None:
                raise ValueError("item needs text or image")
            f = self.image_features(image, max_tiles) if image is not None else None
            n_tiles = 0 if f is None else f.shape[0] // self.tokens_per_tile
            tok = self.tokenizer(self.prompt(text, n_tiles, item.get("input_type", "passage")))["input_ids"]
            n_ctx = sum(i == self.img_context_token_id for i in tok)
            if n_ctx != (0 if f is None else f.shape[0]):
                raise ValueError(f"{n_ctx} {IMG_CONTEXT} tokens for {0 if f is None else f.shape[0]} image features")
            ids.append(tok)
            feats.append(f)
        t = max(len(x) for x in ids)  # right padding
        input_ids = torch.tensor([x + [0] * (t - len(x)) for x in ids], device=self.device)
        mask = torch.tensor([[1] * len(x) + [0] * (t - len(x)) for x in ids], device=self.device)
        emb = self.token_embeddings(input_ids).clone()
        for b, f in enumerate(feats):
            if f is not None:
                emb[b, input_ids[b] == self.img_context_token_id] = f.to(emb.dtype)
        hidden = self.decoder(emb, mask).to(torch.float32)
        m = mask.to(torch.float32)[..., None]
        pooled = (hidden * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
