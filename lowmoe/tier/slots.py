"""Expert slots: the fast tier's memory, one preallocated, 4 KiB-aligned slab.

Every routed expert of a model has the same shapes and formats, so one slot holds any expert as one
contiguous block: gate [I, D] at byte 0, then up [I, D], then down [D, I] (`ExpertLayout.spans`; in
a GGUF block format each may differ in size), padded to a multiple of 4 KiB. A read from the slow tier lands straight in a slot (one `preadv` of the
whole block for a packed store, with O_DIRECT), and the kernels compute from views of it: nothing
is copied after the read. Slot ids are plain ints; the cache policy decides what each holds.
"""

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from ..backend.quant import FORMATS
from ..load.weights import FFN

ALIGN = 4096
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
_NP = {"f32": np.float32, "f16": np.uint16, "bf16": np.uint16}


def element_dtype(fmt):
    """The element dtype of an array of weights in `fmt`: a float dtype's, or bytes (uint8) for a
    GGUF block format."""
    return _NP.get(fmt, np.uint8)


def row_bytes(fmt, n):
    """Bytes of a row of n weights in `fmt`: a float dtype, or a GGUF block format."""
    if fmt in _ITEMSIZE:
        return n * _ITEMSIZE[fmt]
    elems, block = FORMATS[fmt]
    return n // elems * block


@dataclass(frozen=True)
class ExpertLayout:
    dtype: object  # "f32", "f16", "bf16" or a GGUF format name; or a tuple (gate's, up's, down's)
    inter: int  # I
    hidden: int  # D
    # ((layer, dtype), ...) where the layers' formats differ (llama.cpp's Q4_K_M puts some layers'
    # down in Q6_K): `dtype` is then the largest layer's, which sizes the slots, and `of` the others'
    per_layer: tuple = ()

    def of(self, layer):
        """The layout of `layer`'s experts."""
        return _layer_layout(self, layer) if self.per_layer else self

    @cached_property  # read for every expert the kernels compute
    def formats(self):
        return self.dtype if isinstance(self.dtype, tuple) else (self.dtype,) * 3

    @cached_property
    def sizes(self):
        """Bytes of gate [I, D], up [I, D] and down [D, I]."""
        g, u, d = self.formats
        return self.inter * row_bytes(g, self.hidden), self.inter * row_bytes(u, self.hidden), self.hidden * row_bytes(d, self.inter)

    @cached_property
    def spans(self):
        """(start, end) of gate, up and down in a block."""
        a, b, c = self.sizes
        return (0, a), (a, a + b), (a + b, a + b + c)

    @cached_property
    def nbytes(self):
        """Bytes of one expert: its three matrices."""
        return sum(self.sizes)

    @property
    def part(self):
        """Bytes of one of gate, up, down, for the float layouts whose three parts are alike."""
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"expert layout {self.dtype}: its parts differ in size")
        return self.sizes[0]

    @cached_property
    def role_sizes(self):
        """Bytes of gate, up and down, each the largest of any layer's: what a GPU slot holds of each."""
        layouts = [self] + [self.of(layer) for layer, _ in self.per_layer]
        return tuple(max(L.sizes[r] for L in layouts) for r in range(3))

    @cached_property
    def block(self):
        """Bytes of one slot: the three matrices, padded to a multiple of ALIGN."""
        return -(-self.nbytes // ALIGN) * ALIGN


@lru_cache(maxsize=None)
def _layer_layout(layout, layer):
    # One ExpertLayout per layer, made once: its cached sizes then serve every token.
    dtype = dict(layout.per_layer).get(layer, layout.dtype)
    return ExpertLayout(dtype, layout.inter, layout.hidden)


def aligned_empty(nbytes):
    """uint8[nbytes] whose address is a multiple of ALIGN (O_DIRECT needs aligned buffers)."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes]


class Slab:
    """n slots of `layout.block` bytes each."""

    def __init__(self, layout, n):
        self.layout = layout
        self.n = n
        self.buf = aligned_empty(n * layout.block).reshape(n, layout.block)

    @property
    def nbytes(self):
        return self.buf.nbytes

    def block(self, slot):
        """The slot's bytes, uint8[layout.block], aligned: the destination of a read."""
        return self.buf[slot]

    def ffn(self, slot, layout=None):
        """Views of the expert held in `slot` (block_ffn), in its layer's `layout` (layout.of) where
        the layers differ."""
        return block_ffn(layout or self.layout, self.buf[slot])


def block_ffn(layout, b):
    """Views of the expert in the block b uint8[layout.block]: gate, up [I, D], down [D, I] in the
    stored dtype, or for a GGUF format their block bytes uint8 [rows, row bytes]."""
    I, D = layout.inter, layout.hidden
    views = [b[lo:hi].view(element_dtype(fmt)).reshape(rows, -1)
             for fmt, rows, (lo, hi) in zip(layout.formats, (I, I, D), layout.spans)]
    return FFN(*views, layout.dtype)
