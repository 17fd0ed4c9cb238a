"""Safetensors checkpoints, read by byte range.

The reader parses each file's header itself so it knows, for every tensor, its file, absolute
byte offset, shape and dtype. That lets one expert's weights be read alone (later, from the slow
tier) without touching the rest of the file. Files are opened read-only and never modified.

Layout of a safetensors file: u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the data; offsets are relative to
the end of the header.
"""

import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError

# safetensors dtype -> (numpy dtype of the raw array, bytes per element). F16/BF16 stay uint16:
# Numba kernels take them as uint16 views and convert in registers.
DTYPES = {"F32": (np.float32, 4), "F16": (np.uint16, 2), "BF16": (np.uint16, 2)}
_ALL_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    offset: int  # absolute byte offset in `file`
    nbytes: int
    shape: tuple
    dtype: str  # safetensors name: F32, F16, BF16, ...


def to_f32(raw, dtype):
    """Raw array as read (float32, or uint16 holding F16/BF16 bits) -> float32 copy."""
    if dtype == "F32":
        return np.array(raw, dtype=np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_header(path):
    """Returns {name: TensorInfo} for one safetensors file, validating every offset."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64))
            ok = dtype in _ALL_SIZES and 0 <= begin <= end and end - begin == count * _ALL_SIZES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}'")
        if base + end > size:
            raise CheckpointError(
                f"{path}: data of tensor '{name}' (bytes {base + begin}..{base + end}) runs past the end of the file ({size} bytes)"
            )
        out[name] = TensorInfo(name, path, base + begin, end - begin, shape, dtype)
    return out


class Checkpoint:
    """All tensors of a model folder: `model.safetensors`, or shards listed by the index."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.tensors = {}
        for path in self._files(model_dir):
            self.tensors.update(read_header(path))

    @staticmethod
    def _files(model_dir):
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index}: invalid index (expected JSON with a 'weight_map' object)") from None
            paths = [os.path.join(model_dir, n) for n in names]
            for p in paths:
                if not os.path.isfile(p):
                    raise CheckpointError(f"{p}: shard listed in {os.path.basename(index)} is missing")
            return paths
        paths = sorted(
            os.path.join(model_dir, n) for n in os.listdir(model_dir) if n.endswith(".safetensors")
        )
        if not paths:
            raise CheckpointError(f"{model_dir}: no *.safetensors files")
        return paths

    def __contains__(self, name):
        return name in self.tensors

    def info(self, name, shape=None):
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.model_dir}: missing tensor '{name}'")
        if shape is not None and t.shape != tuple(shape):
            raise CheckpointError(f"{t.file}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        if t.dtype not in DTYPES:
            raise CheckpointError(f"{t.file}: tensor '{name}' has dtype {t.dtype}; supported: F32, F16, BF16")
        return t

    def read(self, name, shape=None):
        """The tensor as stored: float32, or uint16 bits for F16/BF16. Returns (array, dtype)."""
        t = self.info(name, shape)
        np_dtype, size = DTYPES[t.dtype]
        out = np.empty(t.nbytes // size, dtype=np_dtype)
        try:
            with open(t.file, "rb") as f:
                got = os.preadv(f.fileno(), [memoryview(out).cast("B")], t.offset)
        except OSError as e:
            raise CheckpointError(f"{t.file}: cannot read tensor '{name}' ({e.strerror})") from None
        if got != t.nbytes:
            raise CheckpointError(f"{t.file}: short read of tensor '{name}' at offset {t.offset}")
        return out.reshape(t.shape), t.dtype

    def read_f32(self, name, shape=None):
        raw, dtype = self.read(name, shape)
        return to_f32(raw, dtype)


CHUNK = 16 << 20  # bytes per read of copy_range


def copy_range(src, offset, nbytes, out):
    """Copies bytes offset..offset + nbytes of the file `src` into the open binary file `out`, a chunk
    at a time (a tensor of any size in little memory)."""
    with open(src, "rb") as f:
        done = 0
        while done < nbytes:
            chunk = os.pread(f.fileno(), min(CHUNK, nbytes - done), offset + done)
            if not chunk:
                raise CheckpointError(f"{src}: short read at offset {offset + done}")
            out.write(chunk)
            done += len(chunk)
