"""Writing a GGUF file (v3) from metadata entries and tensors of other GGUF files, bytes as they are:
`lowmoe pack` keeps a GGUF model's dense tensors and metadata in one (see tier/pack.py).

The layout is load/gguf.py's: magic, version 3, tensor count u64, metadata count u64, the metadata
entries, the tensor infos (name, n_dims, ne innermost first, ggml type, offset from the data start),
zero padding to the alignment, then each tensor's data from a multiple of the alignment.
"""

import struct

from .checkpoint import copy_range
from .gguf import DEFAULT_ALIGNMENT, MAGIC


def _string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def write_gguf(out, entries, tensors, alignment=DEFAULT_ALIGNMENT):
    """Writes into the open binary file `out`: `entries` [(key, stored bytes)] (load.gguf.read_file's)
    and `tensors` [(name, TensorInfo)], copied from their files. Returns the bytes written."""
    infos, offset = [], 0
    for name, t in tensors:
        offset = -(-offset // alignment) * alignment
        ne = tuple(reversed(t.shape))
        infos.append(_string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t.ggml_type, offset))
        offset += t.nbytes
    head = MAGIC + struct.pack("<IQQ", 3, len(tensors), len(entries)) + b"".join(e for _, e in entries) + b"".join(infos)
    head += bytes(-len(head) % alignment)
    out.write(head)
    pos = 0
    for _, t in tensors:
        pad = -pos % alignment
        out.write(bytes(pad))
        copy_range(t.file, t.offset, t.nbytes, out)
        pos += pad + t.nbytes
    return len(head) + pos
