"""The tensors of a safetensors checkpoint as memory-mapped NumPy views, read when touched.

A safetensors file is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}} and the raw little-endian data. Viewing each tensor's byte range of one
`np.memmap` costs no memory until an element is read, so an import can convert and place one
tensor (or one device's slice of one) at a time: the host holds the largest piece being
converted, never the model. bfloat16, which NumPy lacks, is ml_dtypes.bfloat16 (a JAX
dependency).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


def _file_views(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
    views = {}
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, not read here.")
        start, end = entry["data_offsets"]
        views[name] = data[start:end].view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return views


class LazyWeights(Mapping[str, np.ndarray]):
    """name -> a read-only memory-mapped view, over model.safetensors or the shards that
    model.safetensors.index.json lists."""

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(directory, WEIGHTS_FILE)):
            files = [WEIGHTS_FILE]
        else:
            raise FileNotFoundError(
                f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (a PyTorch .bin "
                "checkpoint must first be re-saved as safetensors)."
            )
        self._views: dict[str, np.ndarray] = {}
        for file in files:
            self._views.update(_file_views(os.path.join(directory, file)))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)
