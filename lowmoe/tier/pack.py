"""Writing the packed, expert-major copy of a model (`lowmoe pack MODEL OUT`).

The packed folder is itself a loadable model:
- config.json (and tokenizer.json, generation_config.json, the learned predictor's
  moe_predictor.safetensors when present), copied;
- dense.safetensors: every tensor that is not a routed expert, bytes as stored (dtype kept);
- experts.bin: one block per (moe layer, expert) in that order, block i at byte i * block:
  gate | up | down at 0, part, 2 * part, zero-padded to `block` (a multiple of 4 KiB), so one
  O_DIRECT preadv reads an expert straight into a slot;
- experts.json: {"format": "lowmoe-packed", "version": 1, "dtype", "inter", "hidden", "block",
  "layers": [moe layer ids], "experts": E, "file": "experts.bin"}.

Everything is written into a temporary folder beside OUT, then renamed: an interrupted pack never
leaves a half-written OUT. Copies stream one expert or one tensor chunk at a time, so memory stays
small for models of any size. The input folder is only read.
"""

import json
import os
import shutil
import struct
import tempfile

from ..load.checkpoint import Checkpoint
from ..load.config import load_model_config
from ..errors import CheckpointError, InputError
from .slots import aligned_empty
from .store import FORMAT, INDEX, VERSION, CheckpointStore, is_packed

COPIED = ("config.json", "tokenizer.json", "generation_config.json", "moe_predictor.safetensors")
DENSE, BLOB = "dense.safetensors", "experts.bin"
CHUNK = 16 << 20  # bytes per read while copying a dense tensor


def pack_model(model_dir, out_dir, progress=None):
    """Packs `model_dir` into `out_dir` (absent or empty). `progress(done, total)` is called after
    each expert block. Returns (blocks, bytes written)."""
    cfg = load_model_config(model_dir)
    if is_packed(model_dir):
        raise InputError(f"{model_dir}: already packed (it has {INDEX})")
    if os.path.lexists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise InputError(f"{out_dir}: already exists and is not an empty folder")
    ckpt = Checkpoint(model_dir)
    store = CheckpointStore(ckpt, cfg)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".partial", dir=os.path.dirname(out_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT gets the usual permissions
    try:
        for name in COPIED:
            if os.path.isfile(os.path.join(model_dir, name)):
                shutil.copyfile(os.path.join(model_dir, name), os.path.join(tmp, name))
        experts = {n for l in store.layers for e in range(store.experts) for n in cfg.expert_tensor_names(l, e)}
        dense = [t for name, t in sorted(ckpt.tensors.items()) if name not in experts]
        nbytes = write_safetensors(os.path.join(tmp, DENSE), dense)
        blocks = _write_experts(store, os.path.join(tmp, BLOB), progress)
        nbytes += blocks * store.layout.block
        L = store.layout
        index = {"format": FORMAT, "version": VERSION, "dtype": L.dtype, "inter": L.inter, "hidden": L.hidden,
                 "block": L.block, "layers": store.layers, "experts": store.experts, "file": BLOB}
        with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f)
            f.write("\n")
        for name in os.listdir(tmp):  # on disk before the rename: a crash must not leave OUT half-written
            _fsync(os.path.join(tmp, name))
        os.rename(tmp, out_dir)  # rename(2) replaces an empty folder atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        store.close()
    return blocks, nbytes


def _write_experts(store, path, progress):
    keys = [(l, e) for l in store.layers for e in range(store.experts)]
    buf = aligned_empty(store.layout.block)
    buf[:] = 0  # the padding after 3 * part stays zero: reads overwrite only the three parts
    with open(path, "wb") as f:
        for i, key in enumerate(keys):
            store.read(*key, buf)
            f.write(buf)
            if progress is not None:
                progress(i + 1, len(keys))
    return len(keys)


def write_safetensors(path, tensors):
    """Writes the TensorInfos' bytes, as stored, into one safetensors file at `path`; returns its size.

    Layout: u64 LE header length, JSON {name: {dtype, shape, data_offsets}} padded with spaces to a
    multiple of 8 (so the data is aligned), then the tensors back to back in the order given.
    """
    header, end = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [end, end + t.nbytes]}
        end += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            _copy_range(t.file, t.offset, t.nbytes, out)
    return 8 + len(raw) + end


def _copy_range(src, offset, nbytes, out):
    with open(src, "rb") as f:
        done = 0
        while done < nbytes:
            chunk = os.pread(f.fileno(), min(CHUNK, nbytes - done), offset + done)
            if not chunk:
                raise CheckpointError(f"{src}: short read at offset {offset + done}")
            out.write(chunk)
            done += len(chunk)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
