"""Write a safetensors file one tensor at a time, so conversion never holds two copies of the weights.

`safetensors.numpy.save_file` needs every tensor in memory at once; the format itself only needs the header
(names, dtypes, shapes, byte ranges) up front, which is known from the source's metadata before any data is read.
Files written here are read back with `safetensors.safe_open` in the tests.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
ITEM_SIZE = {"F32": 4, "BF16": 2, "F16": 2}


def write_streaming(path: Path, specs: Iterable[tuple[str, tuple[int, ...], str]],
                    load: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
    """specs: (name, shape, safetensors dtype) in file order; `load(name)` returns that tensor when it is written,
    or an iterable of its consecutive slices along axis 0 (a stacked tensor written one layer at a time).

    Returns the number of bytes of tensor data written.
    """
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * ITEM_SIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            loaded = load(name)
            sliced = not isinstance(loaded, np.ndarray)
            rows = 0
            for part in loaded if sliced else (loaded,):
                if sliced and rows == shape[0]:
                    raise ValueError(f"{name}: more than the {shape[0]} slices the header says")
                array = np.ascontiguousarray(part)
                part_shape = tuple(shape[1:]) if sliced else tuple(shape)
                if tuple(array.shape) != part_shape or DTYPE_NAMES[array.dtype.name] != dtype:
                    what = f" slice {rows}" if sliced else ""
                    raise ValueError(f"{name}{what}: got {array.dtype.name}{list(array.shape)}, header says "
                                     f"{dtype}{list(part_shape)}")
                if array.dtype.byteorder == ">":
                    array = array.astype(array.dtype.newbyteorder("<"))
                f.write(array.reshape(-1).view(np.uint8).data)  # no bytes copy of the tensor
                rows += 1
                del array, part
            del loaded
            if sliced and rows != shape[0]:
                raise ValueError(f"{name}: got {rows} slices, header says {shape[0]}")
    return offset
