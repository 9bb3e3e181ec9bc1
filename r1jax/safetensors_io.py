"""Lazy safetensors reading (memory-mapped, bf16 included) and streaming writing.

The `safetensors` package's numpy backend has no bfloat16, and its writers want every
tensor in memory at once; the format is simple enough (8-byte header length, JSON
header, raw little-endian data) to read and write directly.
"""
import json
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsFolder:
    """Every tensor of a folder's `*.safetensors` files (single or index-sharded),
    read on demand from memory maps."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        self._where: dict[str, tuple[np.memmap, dict]] = {}
        for name in files:
            mm = np.memmap(os.path.join(path, name), dtype=np.uint8, mode="r")
            (n,) = struct.unpack("<Q", mm[:8].tobytes())
            header = json.loads(mm[8 : 8 + n].tobytes())
            header.pop("__metadata__", None)
            for key, info in header.items():
                info["base"] = 8 + n
                self._where[key] = (mm, info)

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> np.ndarray:
        mm, info = self._where[key]
        begin, end = info["data_offsets"]
        raw = mm[info["base"] + begin : info["base"] + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(
    path: str,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    fetch: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write one file, fetching each tensor only when its bytes are written.

    `specs` lists (name, shape, dtype) up front, since the header comes first.
    """
    specs = list(specs)
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec aligns data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(fetch(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: got shape {array.shape}, header says {tuple(shape)}")
            f.write(array.tobytes())
