"""The slow tier: where routed experts live until a read brings one into a slot.

Every store has `layout` (the ExpertLayout shared by all routed experts), `layers` (the MoE layer
ids), `experts` (E per layer), `read(layer, expert, dest)` and `close()`. `read` fills `dest`
(uint8[layout.block], 4 KiB-aligned: `Slab.block(slot)`) with gate at byte 0, up at `part`, down
at `2 * part` (bytes past `3 * part` are left as they are) and returns the bytes it read. Reads
are `os.preadv` on descriptors opened once: positionless, so reader threads share them, and the
GIL is released while the kernel copies.

- CheckpointStore: three reads straight from the safetensors byte ranges (buffered, no copies).
- PackedStore: the expert-major file written by `lowmoe pack` (see pack.py), one `preadv` of the
  whole block with O_DIRECT, so the page cache neither hides the slow tier nor fills with it.
- GGUFStore: three reads from a GGUF model's stacked expert tensors, one expert a slice of each.
- RamStore: every block held in host memory, read once at open.
"""

import errno
import json
import os
from dataclasses import replace

import numpy as np

from ..errors import CheckpointError, InputError
from ..backend.quant import FORMATS
from .slots import ALIGN, ExpertLayout, aligned_empty
from ..load.gguf import GGUF
from ..load.weights import KERNEL_DTYPE

FORMAT, VERSION = "lowmoe-packed", 1
INDEX = "experts.json"
ROLES = ("gate", "up", "down")
GGUF_EXPERTS = "blk.{layer}.ffn_{role}_exps.weight"  # a GGUF's stacked experts of one role


def is_packed(model_dir):
    return os.path.isfile(os.path.join(model_dir, INDEX))


def _read_into(fd, buf, offset, path):
    """preadv of exactly len(buf) bytes at `offset`, or CheckpointError naming file and offset."""
    try:
        got = os.preadv(fd, [buf], offset)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {len(buf)} bytes at offset {offset} ({e.strerror})") from None
    if got != len(buf):
        raise CheckpointError(f"{path}: short read at offset {offset} ({got} of {len(buf)} bytes)")
    return got


def _fused_experts(ckpt, cfg, layer):
    """[(gate, up, down) TensorInfo] of `layer`'s experts when they are stored fused, as the Qwen3.5 /
    3.6 hub checkpoints hold them (experts.gate_up_proj [E, 2I, D], gate rows first; experts.down_proj
    [E, D, I]): each expert's three parts are byte ranges of those two. None when not fused."""
    base = f"{cfg.prefix}layers.{layer}.{cfg.moe_prefix}.experts."
    if base + "gate_up_proj" not in ckpt:
        return None
    E, I, D = cfg.num_experts, cfg.expert_intermediate, cfg.hidden_size
    gu, down = ckpt.info(base + "gate_up_proj", (E, 2 * I, D)), ckpt.info(base + "down_proj", (E, D, I))
    part = gu.nbytes // (2 * E)  # bytes of one expert's gate (or up): [I, D]
    return [(replace(gu, offset=gu.offset + 2 * e * part, nbytes=part, shape=(I, D)),
             replace(gu, offset=gu.offset + (2 * e + 1) * part, nbytes=part, shape=(I, D)),
             replace(down, offset=down.offset + e * down.nbytes // E, nbytes=down.nbytes // E, shape=(D, I)))
            for e in range(E)]


def expert_tensors(ckpt, cfg):
    """(layout, {(layer, expert): (gate, up, down) TensorInfo}) with shapes and the one dtype checked;
    experts stored one tensor each, or fused (_fused_experts: the infos are then byte ranges of the
    fused tensors, under their names)."""
    I, D = cfg.expert_intermediate, cfg.hidden_size
    shapes = ((I, D), (I, D), (D, I))
    tensors, first = {}, None
    for layer in cfg.moe_layers:
        fused = _fused_experts(ckpt, cfg, layer)
        for e in range(cfg.num_experts):
            if fused is None:
                infos = tuple(ckpt.info(n, s) for n, s in zip(cfg.expert_tensor_names(layer, e), shapes))
            else:
                infos = fused[e]
            first = first or infos[0]
            for t in infos:
                if t.dtype != first.dtype:
                    raise CheckpointError(
                        f"{t.file}: routed experts mix dtypes ({first.name}: {first.dtype}, {t.name}: {t.dtype}); "
                        "lowmoe needs one dtype for every expert"
                    )
            tensors[layer, e] = infos
    return ExpertLayout(KERNEL_DTYPE[first.dtype], I, D), tensors


class CheckpointStore:
    """Experts read from the checkpoint's own byte ranges: three reads per expert."""

    def __init__(self, ckpt, cfg):
        if is_packed(ckpt.model_dir):
            raise CheckpointError(
                f"{ckpt.model_dir}: a packed model keeps its experts in experts.bin; read it with the packed or ram store"
            )
        self.layout, tensors = expert_tensors(ckpt, cfg)
        self.layers, self.experts = list(cfg.moe_layers), cfg.num_experts
        self._fds = {}  # file -> fd
        for infos in tensors.values():
            for t in infos:
                if t.file not in self._fds:
                    try:
                        self._fds[t.file] = os.open(t.file, os.O_RDONLY)
                    except OSError as e:
                        raise CheckpointError(f"{t.file}: cannot open ({e.strerror})") from None
        # (layer, expert) -> ((fd, offset, file) of gate, up, down)
        self._ranges = {k: tuple((self._fds[t.file], t.offset, t.file) for t in infos) for k, infos in tensors.items()}

    def read(self, layer, expert, dest):
        for (fd, offset, path), (lo, hi) in zip(self._ranges[layer, expert], self.layout.spans):
            _read_into(fd, dest[lo:hi], offset, path)
        return self.layout.nbytes

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class GGUFStore:
    """Experts read from a GGUF model's stacked expert tensors (load.gguf.GGUF): blk.N.ffn_gate_exps,
    ffn_up_exps [E, I, D] and ffn_down_exps [E, D, I], expert e the e-th slice of each, so three
    reads per expert as from a safetensors checkpoint. Each of the three may have its own format
    (Q4_K_M: gate and up Q4_K, down Q6_K), and the layers may differ (ExpertLayout.per_layer)."""

    def __init__(self, model, cfg):
        I, D, E = cfg.expert_intermediate, cfg.hidden_size, cfg.num_experts
        self.layers, self.experts = list(cfg.moe_layers), E
        ranges, formats = {}, []
        for layer in self.layers:
            for role, shape in zip(ROLES, ((E, I, D), (E, I, D), (E, D, I))):
                name = GGUF_EXPERTS.format(layer=layer, role=role)
                t = model.tensors.get(name)
                if t is None:
                    raise CheckpointError(f"{model.path}: missing tensor '{name}'")
                if t.shape != shape:
                    raise CheckpointError(f"{t.file}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
                formats.append(t.format)
                ranges[layer, role] = t
        dtypes = {}  # layer -> its experts' dtype: one format, or (gate's, up's, down's)
        for layer, i in zip(self.layers, range(0, len(formats), 3)):
            roles = tuple(formats[i : i + 3])
            dtypes[layer] = roles[0] if len(set(roles)) == 1 else roles
        largest = max(dtypes.values(), key=lambda d: ExpertLayout(d, I, D).nbytes)
        per_layer = () if len(set(dtypes.values())) == 1 else tuple(dtypes.items())
        self.layout = ExpertLayout(largest, I, D, per_layer)
        self._fds = {}
        for t in ranges.values():
            if t.file not in self._fds:
                try:
                    self._fds[t.file] = os.open(t.file, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{t.file}: cannot open ({e.strerror})") from None
        self._ranges = ranges

    def read(self, layer, expert, dest):
        L = self.layout.of(layer)
        for role, (lo, hi) in zip(ROLES, L.spans):
            t = self._ranges[layer, role]
            _read_into(self._fds[t.file], dest[lo:hi], t.offset + expert * (hi - lo), t.file)
        return L.nbytes

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _open_direct(path):
    """(fd, True) with O_DIRECT, or (buffered fd, False) where the file system refuses O_DIRECT:
    EINVAL at open or at the first read (tmpfs, some FUSE and network file systems)."""
    flag = getattr(os, "O_DIRECT", 0)  # Linux only
    if flag:
        try:
            fd = os.open(path, os.O_RDONLY | flag)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        else:
            try:
                os.preadv(fd, [aligned_empty(ALIGN)], 0)  # probe now, not in a reader thread mid-decode
                return fd, True
            except OSError as e:
                os.close(fd)
                if e.errno != errno.EINVAL:
                    raise
    return os.open(path, os.O_RDONLY), False


def _dtype(value):
    """An experts.json dtype (a format name, or [gate's, up's, down's]) as ExpertLayout takes it; None
    when it is neither."""
    known = ("f32", "f16", "bf16", *FORMATS)
    if isinstance(value, str):
        return value if value in known else None
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) and v in known for v in value):
        return tuple(value)
    return None


def _load_index(folder):
    path = os.path.join(folder, INDEX)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt packed index (not valid JSON)") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a packed index (format is not '{FORMAT}')")
    if index.get("version") != VERSION:
        raise CheckpointError(f"{path}: packed format version {index.get('version')!r}; this lowmoe reads version {VERSION}")
    try:
        ok = (
            _dtype(index["dtype"]) is not None
            and all(type(index[k]) is int and index[k] > 0 for k in ("inter", "hidden", "experts", "block"))
            and isinstance(index["layers"], list)
            and all(type(l) is int for l in index["layers"])
            and isinstance(index["file"], str)
            and isinstance(index.get("per_layer", []), list)
            and all(isinstance(p, list) and len(p) == 2 and p[0] in index["layers"] and _dtype(p[1]) is not None
                    for p in index.get("per_layer", []))
        )
    except KeyError:
        ok = False
    layout = None
    if ok:
        per_layer = tuple((layer, _dtype(d)) for layer, d in index.get("per_layer", []))
        layout = ExpertLayout(_dtype(index["dtype"]), index["inter"], index["hidden"], per_layer)
    if not ok or index["block"] != layout.block:
        raise CheckpointError(f"{path}: corrupt packed index (dtype, per_layer, inter, hidden, block, layers, "
                              "experts or file)")
    return layout, index


class PackedStore:
    """Experts read from a packed folder's experts.bin: block i = (layer, expert) in order of
    (moe layer, expert), at byte offset i * block; one aligned preadv per expert."""

    def __init__(self, folder):
        self.layout, index = _load_index(folder)
        self.layers, self.experts = index["layers"], index["experts"]
        self.path = os.path.join(folder, index["file"])
        block = self.layout.block
        keys = [(l, e) for l in self.layers for e in range(self.experts)]
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open the packed experts listed in {INDEX} ({e.strerror})") from None
        if size < len(keys) * block:
            i = size // block
            raise CheckpointError(
                f"{self.path}: truncated: block {i} (layer {keys[i][0]}, expert {keys[i][1]}) at byte offset {i * block} "
                f"runs past the end of the file ({size} bytes; {len(keys)} blocks of {block} expected)"
            )
        self._offset = {k: i * block for i, k in enumerate(keys)}
        try:
            self._fd, self.direct = _open_direct(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None

    def read(self, layer, expert, dest):
        return _read_into(self._fd, dest, self._offset[layer, expert], self.path)

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class RamStore:
    """Every expert held in host memory as its block, copied from `source` (another store) once."""

    def __init__(self, source):
        self.layout, self.layers, self.experts = source.layout, source.layers, source.experts
        keys = [(l, e) for l in self.layers for e in range(self.experts)]
        self._index = {k: i for i, k in enumerate(keys)}
        # blocks[i]: uint8[block] of key i; zeroed so the padding is defined
        self.blocks = aligned_empty(len(keys) * self.layout.block).reshape(len(keys), self.layout.block)
        self.blocks[:] = 0
        for i, k in enumerate(keys):
            source.read(*k, self.blocks[i])

    @property
    def nbytes(self):
        return self.blocks.nbytes

    def read(self, layer, expert, dest):
        n = self.layout.of(layer).nbytes
        np.copyto(dest[:n], self.blocks[self._index[layer, expert], :n])
        return n

    def close(self):
        self.blocks = None


def open_store(kind, model_dir, ckpt, cfg):
    """The store of `kind` ("checkpoint", "packed", "ram") for the model in `model_dir`. "ram" loads
    from experts.bin when the folder is packed, else from the checkpoint."""
    if kind == "checkpoint":
        return GGUFStore(ckpt, cfg) if isinstance(ckpt, GGUF) else CheckpointStore(ckpt, cfg)
    if kind not in ("packed", "ram"):
        raise InputError(f"unknown expert store {kind!r}; choose checkpoint, packed or ram")
    if not is_packed(model_dir):
        if kind == "ram":
            return _ram(open_store("checkpoint", model_dir, ckpt, cfg))
        raise CheckpointError(
            f"{model_dir}: not a packed model (no {INDEX}); write one with `lowmoe pack {model_dir} OUT` and load OUT"
        )
    packed = PackedStore(model_dir)
    want = (list(cfg.moe_layers), cfg.num_experts, cfg.expert_intermediate, cfg.hidden_size)
    have = (packed.layers, packed.experts, packed.layout.inter, packed.layout.hidden)
    if have != want:
        packed.close()
        raise CheckpointError(
            f"{os.path.join(model_dir, INDEX)}: packed experts (layers, experts, inter, hidden) = {have} "
            f"do not match config.json {want}"
        )
    return _ram(packed) if kind == "ram" else packed


def _ram(source):
    try:
        return RamStore(source)
    finally:
        source.close()
