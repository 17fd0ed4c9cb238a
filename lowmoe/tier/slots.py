"""Expert slots: the fast tier's memory, one preallocated, 4 KiB-aligned slab.

Every routed expert of a model has the same shape and dtype, so one slot holds any expert as one
contiguous block: gate [I, D] at byte 0, up [I, D] at `part`, down [D, I] at `2 * part`, padded to
a multiple of 4 KiB. A read from the slow tier lands straight in a slot (one `preadv` of the
whole block for a packed store, with O_DIRECT), and the kernels compute from views of it: nothing
is copied after the read. Slot ids are plain ints; the cache policy decides what each holds.
"""

from dataclasses import dataclass

import numpy as np

from ..load.weights import FFN

ALIGN = 4096
_ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
_NP = {"f32": np.float32, "f16": np.uint16, "bf16": np.uint16}


@dataclass(frozen=True)
class ExpertLayout:
    dtype: str  # kernel dtype: "f32", "f16", "bf16"
    inter: int  # I
    hidden: int  # D

    @property
    def part(self):
        """Bytes of one of gate, up, down."""
        return self.inter * self.hidden * _ITEMSIZE[self.dtype]

    @property
    def block(self):
        """Bytes of one slot: the three parts, padded to a multiple of ALIGN."""
        return -(-3 * self.part // ALIGN) * ALIGN


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

    def ffn(self, slot):
        """Views of the expert held in `slot` (block_ffn)."""
        return block_ffn(self.layout, self.buf[slot])


def block_ffn(layout, b):
    """Views of the expert in the block b uint8[layout.block]: gate, up [I, D], down [D, I] in the
    stored dtype."""
    dt, I, D, p = _NP[layout.dtype], layout.inter, layout.hidden, layout.part
    return FFN(
        b[:p].view(dt).reshape(I, D),
        b[p : 2 * p].view(dt).reshape(I, D),
        b[2 * p : 3 * p].view(dt).reshape(D, I),
        layout.dtype,
    )
