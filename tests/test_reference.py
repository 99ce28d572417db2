"""Tests of the independent PyTorch reference itself (tests/reference.py), on a tiny random checkpoint."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

try:
    from tests import reference as R
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import reference as R

SPEC_RATIOS_6 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1), (6, 1), (2, 3), (1, 6),
                 (3, 2)]


@pytest.fixture(scope="module")
def ref(tiny_checkpoint):
    return R.ReferenceModel.from_pretrained(tiny_checkpoint, dtype=torch.float32)


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ids(ref, n, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 1000, (1, n)))


def _cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------------ tiling
def test_target_ratios_order_matches_spec():
    assert R.target_ratios(6) == SPEC_RATIOS_6


@pytest.mark.parametrize("size, grid, n_tiles", [
    ((512, 512), (1, 1), 1),     # (1,1) and (2,2) tie at 0.6: the first strictly best wins
    ((1536, 512), (3, 1), 4),    # 3:1 -> 3 tiles + thumbnail
    ((512, 2048), (1, 4), 5),    # 1:4 -> 4 tiles + thumbnail
    ((20, 20), (1, 1), 1),
    ((1024, 1024), (2, 2), 5),   # (1,1) scores 0.25, (2,2) 0.6
    ((2048, 1536), (3, 2), 7),   # 4:3 page: (3,2) scores 0.5 * 0.889 = 0.444, the best
])
def test_tile_counts(size, grid, n_tiles):
    w, h = size
    assert R.find_grid(w, h, 512, 6) == grid
    tiles = R.tile_image(_image(w, h), 512, 6, use_thumbnail=True)
    assert len(tiles) == n_tiles
    assert all(t.size == (512, 512) and t.mode == "RGB" for t in tiles)


def test_tiles_are_row_major_crops_and_thumbnail_last():
    img = _image(300, 200, seed=3)  # -> some multi-tile grid at S=64
    cols, rows = R.find_grid(300, 200, 64, 6)
    assert cols * rows > 1
    tiles = R.tile_image(img, 64, 6)
    big = np.asarray(img.resize((cols * 64, rows * 64), Image.BICUBIC))
    for k in range(cols * rows):
        r, c = divmod(k, cols)
        np.testing.assert_array_equal(np.asarray(tiles[k]), big[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64])
    np.testing.assert_array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((64, 64), Image.BICUBIC)))
    assert len(R.tile_image(img, 64, 6, use_thumbnail=False)) == cols * rows


def test_pixels_normalised_and_rounded_to_bf16():
    img = Image.fromarray(np.array([[[0, 128, 255]] * 2] * 2, dtype=np.uint8))
    x = R.tiles_to_tensor([img])
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    assert x[0, 0].eq(-1).all() and x[0, 2].eq(1).all()
    exact = torch.tensor((128 / 255 - 0.5) / 0.5)
    assert x[0, 1, 0, 0] == exact.to(torch.bfloat16).float() and x[0, 1, 0, 0] != exact


# ----------------------------------------------------------------------------------- pixel shuffle
@pytest.mark.parametrize("grid, c", [(4, 3), (8, 5), (32, 2)])
def test_pixel_shuffle_matches_spec_formula(grid, c):
    """Spec: out[i, j] = concat(x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]), row-major (i = patch row)."""
    x = torch.randn(2, grid * grid, c)
    out = R.pixel_shuffle(x, 0.5)
    xg = x.reshape(2, grid, grid, c)  # tokens are row-major: token index = row * grid + col
    h = grid // 2
    want = torch.stack([
        torch.cat([xg[:, 2 * i, 2 * j], xg[:, 2 * i, 2 * j + 1], xg[:, 2 * i + 1, 2 * j], xg[:, 2 * i + 1, 2 * j + 1]], -1)
        for i in range(h) for j in range(h)
    ], 1)
    assert out.shape == (2, h * h, 4 * c)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- loading
def test_config_mapping(ref, tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert ref.img_context_token_id == cfg["img_context_token_id"]
    assert ref.tokens_per_tile == (cfg["force_image_size"] // cfg["vision_config"]["patch_size"]) ** 2 // 4
    lc = ref.language_model.config
    for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps"):
        assert getattr(lc, k) == cfg["llm_config"][k]
    assert ref.vision_model.config.hidden_act == "gelu_pytorch_tanh"
    assert isinstance(ref.mlp1[2], torch.nn.GELU) and ref.mlp1[2].approximate == "none"


def test_llama3_rope_scaling_applied(ref, tiny_checkpoint):
    """inv_freq must follow the llama3 formula, written out here from the scaling parameters."""
    lc = json.loads((tiny_checkpoint / "config.json").read_text())["llm_config"]
    rs, d = lc["rope_scaling"], lc["head_dim"]
    inv = 1.0 / lc["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    low_wl = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    high_wl = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    want = []
    for f in inv.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            want.append(f)
        elif wl > low_wl:
            want.append(f / rs["factor"])
        else:
            s = (rs["original_max_position_embeddings"] / wl - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
            want.append((1 - s) * f / rs["factor"] + s * f)
    got = ref.language_model.rotary_emb.inv_freq.double()
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert not torch.allclose(got, inv, rtol=1e-3)  # the scaling really changes something


def _rewrite(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            dst.joinpath(f.name).write_bytes(f.read_bytes())
    state = R.load_safetensors_dir(src)
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_strict_loading(tiny_checkpoint, tmp_path):
    extra = _rewrite(tiny_checkpoint, tmp_path / "extra", lambda s: s.update({"language_model.lm_head.weight": torch.zeros(2)}))
    with pytest.raises(KeyError):
        R.ReferenceModel.from_pretrained(extra)
    stray = _rewrite(tiny_checkpoint, tmp_path / "stray", lambda s: s.update({"something.else": torch.zeros(2)}))
    with pytest.raises(KeyError):
        R.ReferenceModel.from_pretrained(stray)
    missing = _rewrite(tiny_checkpoint, tmp_path / "missing", lambda s: s.pop("mlp1.3.bias"))
    with pytest.raises(KeyError):
        R.ReferenceModel.from_pretrained(missing)


ITEMS = [
    {"text": "What is the capital of France?", "image": None, "input_type": "query"},
    {"text": "Paris is the capital of France.", "image": None, "input_type": "passage"},
    {"text": None, "image": _image(192, 64, 1), "input_type": "passage"},
    {"text": "a chart of rivers", "image": _image(100, 150, 2), "input_type": "passage"},
]


def test_prefix_and_shard_variants_and_no_head(ref, tiny_checkpoint, tmp_path):
    from conversion.random_checkpoint import write_random_checkpoint

    want = ref.embed(ITEMS)
    alt = write_random_checkpoint(tmp_path / "alt", "tiny", seed=0, dtype="float32", shards=3,
                                  vision_prefix="vision_model.", llm_prefix="language_model.model.")
    np.testing.assert_array_equal(R.ReferenceModel.from_pretrained(alt).embed(ITEMS), want)
    no_head = _rewrite(tiny_checkpoint, tmp_path / "nohead",
                       lambda s: [s.pop(k) for k in [k for k in s if k.startswith("vision_model.vision_model.head.")]])
    m = R.ReferenceModel.from_pretrained(no_head)
    assert not m.vision_model.use_head
    np.testing.assert_array_equal(m.embed(ITEMS), want)


# ---------------------------------------------------------------------------------------- decoder
def test_decoder_is_bidirectional(ref):
    ids = _ids(ref, 12, 0)
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % 1000
    h1 = ref.decoder(ref.token_embeddings(ids))
    h2 = ref.decoder(ref.token_embeddings(ids2))
    assert (h1[0, 0] - h2[0, 0]).abs().max() > 1e-3  # the last token reaches position 0
    # contrast: the stock (causal) LlamaModel with the same weights does not let it through
    from transformers import LlamaModel

    cfg = R.llama_config(ref.config["llm_config"], "sdpa")
    cfg.is_causal = True
    causal = LlamaModel(cfg)
    causal.load_state_dict(ref.language_model.state_dict())
    with torch.no_grad():
        c1 = causal(input_ids=ids).last_hidden_state
        c2 = causal(input_ids=ids2).last_hidden_state
    torch.testing.assert_close(c1[0, :-1], c2[0, :-1], rtol=0, atol=0)
    assert (c1[0, -1] - c2[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("lengths", [(5, 11), (7, 7, 30), (2100, 40)])
def test_decoder_padding_invariance(ref, lengths):
    seqs = [ref.token_embeddings(_ids(ref, n, k))[0] for k, n in enumerate(lengths)]
    t = max(lengths)
    alone = [ref.decoder(s[None])[0] for s in seqs]
    for side in ("right", "left"):
        x = torch.randn(len(seqs), t, seqs[0].shape[-1]) * 3  # garbage in the pad slots: must not leak
        mask = torch.zeros(len(seqs), t, dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
            x[b, sl], mask[b, sl] = s, 1
        h = ref.decoder(x, mask)
        for b, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
            # right padding keeps the positions: bit-for-bit up to kernel blocking; left shifts RoPE offsets
            tol = 1e-5 if side == "right" else 1e-4
            torch.testing.assert_close(h[b, sl], alone[b], rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------- end to end
def test_blocks_shapes(ref):
    px = R.tiles_to_tensor(R.tile_image(_image(64, 64), ref.image_size))
    v = ref.vision(px)
    dv = ref.vision_model.config.hidden_size
    assert v.shape == (1, (ref.image_size // ref.patch_size) ** 2, dv)
    s = ref.pixel_shuffle(v)
    assert s.shape == (1, ref.tokens_per_tile, 4 * dv)
    assert ref.projector(s).shape == (1, ref.tokens_per_tile, ref.language_model.config.hidden_size)


def test_prompts_and_image_token_counts(ref):
    tok = ref.tokenizer
    n = ref.tokens_per_tile
    assert ref.prompt("hi", 0, "query") == "query: hi"
    assert ref.prompt("hi", 0, "passage") == "passage: hi"
    assert ref.prompt(None, 2, "passage") == "passage: <img>" + "<IMG_CONTEXT>" * (2 * n) + "</img> "
    assert ref.prompt("t", 1, "passage") == "passage: <img>" + "<IMG_CONTEXT>" * n + "</img> t"
    ids = tok(ref.prompt("t", 4, "passage"))["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert ids.count(ref.img_context_token_id) == 4 * n
    assert ids.count(tok.convert_tokens_to_ids("<img>")) == 1 and ids.count(tok.convert_tokens_to_ids("</img>")) == 1
    # 192x64 at S=64 is 3:1 -> 3 tiles + thumbnail
    assert ref.image_features(ITEMS[2]["image"]).shape == (4 * n, ref.language_model.config.hidden_size)


def test_embed_unit_norm_batch_invariant_and_image_matters(ref):
    e = ref.embed(ITEMS)
    assert e.shape == (len(ITEMS), ref.language_model.config.hidden_size) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    for k, item in enumerate(ITEMS):  # batching (and padding) does not change any vector
        np.testing.assert_allclose(ref.embed([item])[0], e[k], atol=1e-5)
    text_only = ref.embed([{**ITEMS[3], "image": None}])[0]
    other_image = ref.embed([{**ITEMS[3], "image": _image(100, 150, 9)}])[0]
    assert _cos(text_only, e[3]) < 0.999 and _cos(other_image, e[3]) < 0.9999
    assert _cos(ref.embed([{**ITEMS[0], "input_type": "passage"}])[0], e[0]) < 0.9999  # the prefix matters


def test_embed_bf16_path(ref):
    e32 = ref.embed(ITEMS)
    e16 = ref.embed(ITEMS, dtype=torch.bfloat16)
    assert ref.cast(torch.bfloat16).language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert ref.dtype == torch.float32  # the original stays float32
    for a, b in zip(e32, e16):
        assert 0.999 < _cos(a, b) < 1 - 1e-7


def test_eager_and_sdpa_attention_agree(ref, tiny_checkpoint):
    eager = R.ReferenceModel.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    assert eager.language_model.config._attn_implementation == "eager"
    np.testing.assert_allclose(eager.embed(ITEMS), ref.embed(ITEMS), atol=2e-6)
