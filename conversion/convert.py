"""Convert a Hugging Face checkpoint directory into Flax parameters, streaming one tensor at a time.

Output directory: `flax_params.safetensors` (Flax names), `config.json`, the tokenizer files and
`manifest.json` (written last: its presence marks a complete conversion).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from conversion.mapping import MappingError, map_tensor, transformed_shape
from conversion.safetensors_stream import DTYPE_NAMES, write_streaming
from model import stacked
from model.config import ModelConfig
from model.network import param_shapes
from model.weights import FORMAT, PARAMS_FILE

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SOURCE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class ConversionError(ValueError):
    pass


def tool_version() -> str:
    try:
        return metadata.version("nemotron-embed-vl-jax")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def is_converted(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file() and (path / PARAMS_FILE).is_file()


def converted_format(path: Path) -> str | None:
    """The format recorded in a converted directory's manifest (None when there is none)."""
    try:
        return json.loads((path / MANIFEST_FILE).read_text()).get("format")
    except (OSError, ValueError):
        return None


def is_hf_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())


def weight_files(src: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or shards named by the index)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: src / file for name, file in weight_map.items()}
    single = src / "model.safetensors"
    if not single.is_file():
        raise ConversionError(f"{src}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, "numpy") as f:
        return {name: single for name in f.keys()}


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert(src: str | Path, out: str | Path, *, dtype: str | None = None, source: str | None = None,
            revision: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Convert `src` (a Hugging Face layout directory) into `out`. Returns the manifest.

    dtype: the stored parameter dtype (default: the checkpoint's own). Fails, before writing anything, naming
    every missing, unexpected or mis-shaped tensor.
    """
    src, out = Path(src), Path(out)
    cfg = ModelConfig.from_dir(src)
    expected = param_shapes(cfg)
    files = weight_files(src)

    with contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(p, "numpy")) for p in sorted(set(files.values()))}
        plan: list[tuple[str, str, Path, Any, tuple[int, ...], str]] = []
        problems: list[str] = []
        skipped = 0
        for name in sorted(files):
            tensor = handles[files[name]].get_slice(name)
            shape, src_dtype = tuple(tensor.get_shape()), tensor.get_dtype()
            try:
                mapped = map_tensor(name, len(shape), expected)
            except MappingError as e:
                problems.append(str(e))
                continue
            if mapped is None:
                skipped += int(np.prod(shape, dtype=np.int64))
                continue
            flax_name, transform = mapped
            got = transformed_shape(shape, transform)
            if got != expected[flax_name]:
                problems.append(f"mis-shaped tensor {name!r}: {list(shape)} gives {list(got)} for {flax_name!r}, "
                                f"expected {list(expected[flax_name])}")
            if src_dtype not in SOURCE_DTYPES:
                problems.append(f"tensor {name!r} has unsupported dtype {src_dtype}")
                continue
            out_dtype = dtype or SOURCE_DTYPES[src_dtype]
            plan.append((flax_name, name, files[name], transform, got, out_dtype))
        mapped_names = [p[0] for p in plan]
        duplicates = sorted({n for n in mapped_names if mapped_names.count(n) > 1})
        problems += [f"several tensors map to {n!r}" for n in duplicates]
        problems += [f"missing tensor for {n!r} {list(expected[n])}" for n in sorted(set(expected) - set(mapped_names))]
        if problems:
            shown = "\n  ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise ConversionError(f"{src} does not match the model described by its config.json:\n  {shown}")

        # Each tower's layers are stored stacked on a leading axis, as the network holds them: the per-layer
        # tensors of one stacked parameter are written one after the other (a C-order [L, …] array is its layers'
        # bytes in turn), so only one layer's tensor is ever in memory.
        by_flax = {p[0]: p for p in plan}
        groups: dict[str, list[str]] = {}
        for flax_name in sorted(by_flax, key=lambda n: stacked.stacked_name(n)[1] or 0):
            groups.setdefault(stacked.stacked_name(flax_name)[0], []).append(flax_name)
        specs = []
        for target, members in sorted(groups.items()):
            dtypes = {by_flax[m][5] for m in members}
            if len(dtypes) > 1:
                raise ConversionError(f"{src}: the layers of {target!r} come in several dtypes {sorted(dtypes)}: "
                                      "pass --dtype to convert them to one")
            shape = by_flax[members[0]][4]
            specs.append((target, (len(members), *shape) if target not in by_flax else shape,
                          DTYPE_NAMES[dtypes.pop()]))

        out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(plan), desc="converting", unit="tensor", disable=not progress)

        def tensor(flax_name: str) -> np.ndarray:
            _, name, file, transform, _, out_dtype = by_flax[flax_name]
            array = transform(handles[file].get_tensor(name))
            bar.update()
            return array.astype(out_dtype, copy=False)

        def load(target: str):
            if target in by_flax:
                return tensor(target)
            return (tensor(m) for m in groups[target])  # layer 0, 1, … in turn

        tmp = out / (PARAMS_FILE + ".partial")
        write_streaming(tmp, specs, load, metadata={"format": FORMAT})
        bar.close()
        os.replace(tmp, out / PARAMS_FILE)

    copied = [CONFIG_FILE] + [f for f in TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        if (src / f).resolve() != (out / f).resolve():
            shutil.copyfile(src / f, out / f)
    dtypes = sorted({p[5] for p in plan})
    manifest = {
        "format": FORMAT,
        "source": source or str(src.resolve()),
        "revision": revision,
        "files": {str(p.relative_to(src)): sha256(p) for p in sorted(set(files.values()))}
        | {f: sha256(src / f) for f in copied},
        "parameters": {
            "converted": int(sum(np.prod(s, dtype=np.int64) for s in expected.values())),
            "skipped": skipped,
        },
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "config": {
            "vision_layers": cfg.vision.num_hidden_layers, "vision_width": cfg.vision.hidden_size,
            "decoder_layers": cfg.text.num_hidden_layers, "decoder_width": cfg.text.hidden_size,
            "tile_size": cfg.force_image_size, "tokens_per_tile": cfg.tokens_per_tile,
            "vocab_size": cfg.text.vocab_size, "embedding_size": cfg.embedding_size,
        },
        "tool": {"name": "nemotron-embed-vl-jax conversion", "version": tool_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["parameters"]["total"] = manifest["parameters"]["converted"] + skipped
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
