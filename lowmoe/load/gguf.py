"""GGUF files parsed by hand: the metadata, and each tensor's file, byte offset, shape and format, so
a tensor (or one expert's slice of a stacked tensor) is read by its byte range without loading the
rest. Split models (`name-00001-of-00003.gguf`) are read as one.

The layout (GGUF v2 and v3, little-endian): magic "GGUF", version u32, tensor count u64, metadata
count u64; the metadata as (key string, value type u32, value); the tensor infos as (name string,
n_dims u32, ne u64[n_dims] innermost first, ggml type u32, offset u64 from the data start); the
tensor data from the first multiple of `general.alignment` (default 32) after the infos. A string
is a u64 length and UTF-8 bytes; an array a value type u32, a count u64 and the values.

Formats are lowmoe's names: "f32", "f16", "bf16", and the GGUF block types "q8_0", "q4_0", "q4_1",
"q5_0", "q5_1", "q4_k", "q5_k", "q6_k". A tensor of any other ggml type is a one-line error naming
it and the type.
"""

import mmap
import os
import re
import struct
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# ggml type id -> (lowmoe format name, elements per block, bytes per block): the formats lowmoe computes.
FORMATS = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 30: ("bf16", 1, 2),
    2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20), 6: ("q5_0", 32, 22), 7: ("q5_1", 32, 24), 8: ("q8_0", 32, 34),
    12: ("q4_k", 256, 144), 13: ("q5_k", 256, 176), 14: ("q6_k", 256, 210),
}
# The other ggml types, by name, for the error that refuses them.
OTHER_TYPES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# Metadata value type -> struct format of one scalar (8: string, 9: array are read apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    file: str
    offset: int  # absolute byte offset in `file`
    nbytes: int
    shape: tuple  # outermost first, as PyTorch and safetensors order it (GGUF's ne reversed)
    ggml_type: int

    @property
    def format(self):
        return FORMATS[self.ggml_type][0]


class _Cursor:
    """Reads the header of `path` from `data` (bytes-like), naming the file in every error."""

    def __init__(self, path, data):
        self.path, self.data, self.pos = path, data, 0

    def take(self, n, what):
        if self.pos + n > len(self.data):
            raise CheckpointError(f"{self.path}: truncated GGUF header (reading {what} at byte {self.pos})")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt, what):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what):
        n = self.scalar("<Q", what)
        try:
            return str(self.take(n, what), "utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} is not UTF-8") from None

    def value(self, kind, key):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], f"metadata '{key}'")
        if kind == _STRING:
            return self.string(f"metadata '{key}'")
        if kind == _ARRAY:
            item, n = self.scalar("<I", f"metadata '{key}'"), self.scalar("<Q", f"metadata '{key}'")
            if item == _ARRAY:
                raise CheckpointError(f"{self.path}: metadata '{key}' is an array of arrays, which lowmoe does not read")
            if item in _SCALARS:  # at once: a tokenizer's token types are 150k of them
                dtype = np.dtype(_SCALARS[item])
                return np.frombuffer(self.take(n * dtype.itemsize, f"metadata '{key}'"), dtype).tolist()
            return [self.value(item, key) for _ in range(n)]
        raise CheckpointError(f"{self.path}: metadata '{key}' has unknown value type {kind}")


def read_file(path, entries=None):
    """-> (metadata dict, {name: TensorInfo}) of one GGUF file; CheckpointError on bad input.
    `entries`, a list, receives (key, bytes) of each metadata entry as stored (key, value type and
    value), in order: what a GGUF written from this one copies unchanged."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # Mapped, not read: the header is small next to the weights, but a tokenizer's metadata
            # can be tens of MB, and only the pages parsed are touched.
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return _parse(path, _Cursor(path, memoryview(data)), size, entries)


def _parse(path, c, size, entries):
    if bytes(c.take(4, "the magic")) != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    version = c.scalar("<I", "the version")
    if version not in VERSIONS:
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (only {VERSIONS})")
    n_tensors, n_kv = c.scalar("<Q", "the tensor count"), c.scalar("<Q", "the metadata count")
    meta = {}
    for _ in range(n_kv):
        start = c.pos
        key = c.string("a metadata key")
        meta[key] = c.value(c.scalar("<I", f"metadata '{key}'"), key)
        if entries is not None:
            entries.append((key, bytes(c.data[start : c.pos])))
    infos = []
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        dims = c.scalar("<I", f"tensor '{name}'")
        ne = [c.scalar("<Q", f"tensor '{name}'") for _ in range(dims)]
        infos.append((name, ne, c.scalar("<I", f"tensor '{name}'"), c.scalar("<Q", f"tensor '{name}'")))
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise CheckpointError(f"{path}: general.alignment {align!r} is not a power of two")
    start = -(-c.pos // align) * align
    tensors = {}
    for name, ne, kind, offset in infos:
        tensors[name] = _tensor(path, size, start, align, name, ne, kind, offset)
    return meta, tensors


def _tensor(path, size, start, align, name, ne, kind, offset):
    if kind not in FORMATS:
        what = OTHER_TYPES.get(kind, f"type {kind}")
        raise CheckpointError(f"{path}: tensor '{name}' is {what}, which lowmoe does not support "
                              f"(supported: {', '.join(f.upper() for f, _, _ in FORMATS.values())})")
    fmt, elems, block = FORMATS[kind]
    if not ne or ne[0] % elems:
        raise CheckpointError(f"{path}: tensor '{name}' has rows of {ne[0] if ne else 0} values, not a multiple "
                              f"of {fmt}'s {elems}")
    count = 1
    for n in ne:
        count *= n
    nbytes = count // elems * block
    if offset % align:
        raise CheckpointError(f"{path}: tensor '{name}' starts at {offset}, not a multiple of the alignment {align}")
    if start + offset + nbytes > size:
        raise CheckpointError(f"{path}: tensor '{name}' ends at byte {start + offset + nbytes}, past the end of the "
                              f"file ({size} bytes): truncated?")
    return TensorInfo(path, start + offset, nbytes, tuple(reversed(ne)), kind)


def split_files(path):
    """The files of a model: `path` itself, or every split of `name-0000k-of-0000n.gguf` in order."""
    m = _SPLIT.match(os.path.basename(path))
    if m is None:
        return [path]
    folder, n = os.path.dirname(path), int(m.group(3))
    files = [os.path.join(folder, f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise CheckpointError(f"{missing[0]}: not found ({path} is split into {n} files)")
    return files


class GGUF:
    """A GGUF model, split or not: `files`, `metadata` (the first file's) and `tensors` {name:
    TensorInfo} over every split."""

    def __init__(self, path):
        self.path = path
        self.files = files = split_files(path)
        self.metadata, self.tensors = read_file(files[0])
        for f in files[1:]:
            _, tensors = read_file(f)
            for name in tensors.keys() & self.tensors.keys():
                raise CheckpointError(f"{f}: tensor '{name}' is also in {self.tensors[name].file}")
            self.tensors.update(tensors)
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and expected != len(self.tensors):
            raise CheckpointError(f"{path}: the splits hold {len(self.tensors)} tensors, the metadata says {expected}")

    def read(self, name, out=None):
        """The tensor's bytes, uint8[nbytes] (into `out` when given)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        buf = np.empty(info.nbytes, np.uint8) if out is None else out
        try:
            with open(info.file, "rb") as f:
                got = os.preadv(f.fileno(), [memoryview(buf)[: info.nbytes]], info.offset)
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor '{name}' ({e.strerror})") from None
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor '{name}' is truncated")
        return buf
