"""FP8 accuracy against float32, on any host (a CPU emulates the e4m3 products), in one run on one checkpoint.

    python bench/fp8_accuracy.py [--size tiny|deep|mid] [--checkpoint DIR] [--docs 160] [--queries 160]

Builds the float32 model, the bfloat16 model and several FP8 variants (weight scales per output channel or per
tensor; activation scales dynamic per token or static from calibration; diagnostics with only one tower in FP8) from
the same weights, then prints:
  1. the cosine of each variant's vectors with float32's on the parity suite's kinds of input (query, passages up
     to ~2,000 tokens, images of 1, 3+1, 4+1 and 6+1 tiles, image+text);
  2. retrieval: on a synthetic corpus (text passages, images, image+text pages; queries made of words of a passage),
     whether each query's rank-1 document is the same with FP8 documents and bfloat16 queries as with bfloat16 on
     both sides (and with FP8 on both sides), with the bfloat16 score margins of the queries that change.

Checkpoints: `--size` writes a random one (conversion/random_checkpoint.py: matrices N(0, 1/fan_in), i.e. std 0.022
in the real decoder, 0.029 in the real vision tower; norms 1 + 0.1 N; embeddings N(0, 1)). `deep` is this bench's
own preset: the real depth (27 vision + 16 decoder layers) at reduced width, so errors accumulate through as many
layers as in the real model. `--checkpoint` takes any checkpoint the Embedder loads (Hugging Face layout or
converted), e.g. the real model's weights where they are available.
Static activation scales are calibrated on inputs other than the measured ones (other seeds).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from common import ROOT, checkpoint, machine, picture  # noqa: F401  (ROOT puts the project on sys.path)

from conversion import random_checkpoint
from model import Embedder, fp8

# The real depth at a width a 2-core CPU runs in minutes: 27 vision + 16 decoder layers, GQA 4:1 with 64-wide heads
# as in the real decoder; 64 px tiles as `tiny`.
random_checkpoint.SIZES.setdefault("deep", dict(
    vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=27, num_attention_heads=2,
                       patch_size=16, image_size=64),
    llm_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=64, vocab_size=1040),
))

WORDS = ("the of and a to in is that for it as with was on be by this are or from at an which have not but were "
         "page table chart figure revenue quarter growth report summary method result dataset benchmark latency "
         "throughput memory index vector retrieval query passage model image text scanned invoice receipt manual "
         "river mountain forest desert ocean island valley music painting poetry theatre dance film doctor teacher "
         "farmer pilot lawyer artist scientist student city red orange yellow green blue violet black white grey "
         "monday tuesday january february march april one two three four five ten hundred thousand paris france "
         "jupiter saturn planet sunlight water carbon flour sugar butter eggs bake golden server request batch "
         "engineer test profile kernel library entrance noon weather cloudy sunny wind").split()


def words(n: int, rng) -> str:
    return " ".join(rng.choice(WORDS, n))


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def input_kinds(tile: int, seed: int = 0) -> dict[str, dict]:
    """The parity suite's kinds of input; image sizes scaled to the checkpoint's tile so the tile counts match."""
    rng = np.random.default_rng(seed)
    k = tile / 64
    size = lambda w, h: (max(int(w * k), 8), max(int(h * k), 8))  # noqa: E731
    return {
        "query": {"text": "how are b-trees balanced? " + words(6, rng), "input_type": "query"},
        "passage ~80 tok": {"text": words(60, rng), "input_type": "passage"},
        "passage ~2k tok": {"text": words(1800, rng), "input_type": "passage"},
        "image+text": {"text": "Figure 3: " + words(8, rng), "image": picture(*size(640, 480), seed + 9),
                       "input_type": "passage"},
        "image 1 tile": {"image": picture(*size(300, 300), seed + 1), "input_type": "passage"},
        "image 3+1 tiles": {"image": picture(*size(600, 200), seed + 2), "input_type": "passage"},
        "image 4+1 tiles": {"image": picture(*size(100, 400), seed + 3), "input_type": "passage"},
        "image 6+1 tiles": {"image": picture(*size(3000, 2000), seed + 4), "input_type": "passage"},
    }


def corpus(n_docs: int, n_queries: int, tile: int, seed: int = 1) -> tuple[list[dict], list[dict]]:
    """Documents (60% text passages, 25% images, 15% image+text pages) and queries made of words of a text
    document (the rest of the queries: random words), so that some queries have clear winners and some near-ties."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        kind = rng.random()
        if kind < 0.6:
            docs.append({"text": words(int(rng.integers(30, 90)), rng), "input_type": "passage"})
        else:
            w, h = (int(tile * rng.uniform(0.8, 2.5)), int(tile * rng.uniform(0.8, 2.5)))
            item = {"image": picture(w, h, 1000 + i), "input_type": "passage"}
            if kind > 0.85:
                item["text"] = words(int(rng.integers(5, 20)), rng)
            docs.append(item)
    texts = [d["text"] for d in docs if "image" not in d]
    queries = []
    for i in range(n_queries):
        if texts and i % 4:
            source = texts[int(rng.integers(len(texts)))].split()
            picked = rng.choice(source, min(len(source), int(rng.integers(4, 10))), replace=False)
            queries.append({"text": " ".join(picked) + "?", "input_type": "query"})
        else:
            queries.append({"text": words(int(rng.integers(4, 10)), rng) + "?", "input_type": "query"})
    return docs, queries


def rank1(queries: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each query's best document, its score margin over the second)."""
    scores = queries @ docs.T
    top = np.argsort(-scores, axis=1)[:, :2]
    rows = np.arange(len(queries))
    return top[:, 0], scores[rows, top[:, 0]] - scores[rows, top[:, 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="deep", choices=sorted(random_checkpoint.SIZES))
    parser.add_argument("--checkpoint", help="a checkpoint directory instead of a random one")
    parser.add_argument("--docs", type=int, default=160)
    parser.add_argument("--queries", type=int, default=160)
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the one-tower-only variants")
    parser.add_argument("--skip", action="append", default=[], help="leave out a variant (by its name); repeatable")
    args = parser.parse_args()

    start = time.perf_counter()
    path = args.checkpoint or checkpoint(args.size, dtype="float32")[1]
    print(f"# FP8 accuracy: {'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'random ' + args.size}")
    print(f"machine: {machine()}; run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    base = Embedder(path, dtype="float32")
    cfg = base.config
    print(f"vision {cfg.vision.num_hidden_layers} layers x {cfg.vision.hidden_size}, decoder "
          f"{cfg.text.num_hidden_layers} layers x {cfg.text.hidden_size}, tiles {cfg.force_image_size} px\n")
    tile = cfg.force_image_size
    kinds = input_kinds(tile)
    docs, queries = corpus(args.docs, args.queries, tile)
    static = [name for name in ("fp8 channel/static", "fp8 tensor/static") if name not in args.skip]
    calibration = list(input_kinds(tile, seed=50).values()) + corpus(16, 8, tile, seed=51)[0]
    amax = fp8.calibrate_embedder(base, calibration) if static else None

    variants: dict[str, dict] = {
        "bfloat16": dict(dtype="bfloat16"),
        "fp8 channel/token (served)": dict(dtype="fp8"),
        "fp8 channel/token, bf16 product": dict(dtype="fp8", fp8_recipe=fp8.Recipe(product_dtype="bfloat16")),
        "fp8 tensor/token": dict(dtype="fp8", fp8_recipe=fp8.Recipe(weight="tensor")),
    }
    if static:
        variants["fp8 channel/static"] = dict(dtype="fp8", fp8_recipe=fp8.Recipe(activation="static", input_amax=amax))
        variants["fp8 tensor/static"] = dict(dtype="fp8", fp8_recipe=fp8.Recipe(weight="tensor", activation="static",
                                                                                 input_amax=amax))
    if not args.no_diagnostics:
        variants["fp8 decoder only (diag.)"] = dict(dtype="fp8", fp8_recipe=fp8.Recipe(
            prefixes=("language_model.layers.",)))
        variants["fp8 vision only (diag.)"] = dict(dtype="fp8", fp8_recipe=fp8.Recipe(
            prefixes=("vision_model.encoder.",)))

    variants = {name: kwargs for name, kwargs in variants.items() if name not in args.skip}
    reference = base.embed(list(kinds.values()))
    vectors, doc_vectors, query_vectors = {}, {}, {}
    for name, kwargs in variants.items():
        e = Embedder(path, **kwargs)
        vectors[name] = e.embed(list(kinds.values()))
        doc_vectors[name] = e.embed(docs)
        query_vectors[name] = e.embed(queries)
        del e

    names = list(variants)
    print("## Cosine with float32, per input kind\n")
    print("| input | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for i, kind in enumerate(kinds):
        print(f"| {kind} | " + " | ".join(f"{cosine(vectors[n][i], reference[i]):.5f}" for n in names) + " |")
    print("| **least** | " + " | ".join(f"**{cosine(vectors[n], reference).min():.5f}**" for n in names) + " |")

    print(f"\n## Retrieval: rank-1 agreement with bfloat16 on both sides ({len(queries)} queries, {len(docs)} "
          "documents)\n")
    base_top, base_margin = rank1(query_vectors["bfloat16"], doc_vectors["bfloat16"])
    print(f"bfloat16 rank-1 margins: median {np.median(base_margin):.4f}, 10th percentile "
          f"{np.percentile(base_margin, 10):.4f}, least {base_margin.min():.5f}\n")
    print("| documents / queries | agreement | changed (their bfloat16 margins) |")
    print("|---|---:|---|")
    for name in names[1:]:
        for label, q in ((f"{name} / bfloat16", query_vectors["bfloat16"]), (f"{name} / same", query_vectors[name])):
            top, _ = rank1(q, doc_vectors[name])
            changed = np.flatnonzero(top != base_top)
            print(f"| {label} | {100 * (1 - len(changed) / len(top)):.1f}% | "
                  f"{', '.join(f'{base_margin[i]:.4f}' for i in changed) or '-'} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
