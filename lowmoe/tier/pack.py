"""Writing the packed, expert-major copy of a model (`lowmoe pack MODEL OUT`).

The packed folder is itself a loadable model:
- from a model folder: config.json (and tokenizer.json, tokenizer_config.json and
  chat_template.jinja for the chat template, generation_config.json, the learned predictor's
  moe_predictor.safetensors when present), copied; dense.safetensors: every tensor
  that is not a routed expert, bytes as stored (dtype kept);
- from a GGUF file (or its splits): dense.gguf, one GGUF with the model's metadata and every tensor
  that is not a routed expert, bytes as stored (block formats kept); a tokenizer.json and the
  file's learned predictor (learned.predictor_file) from beside it;
- experts.bin: one block per (moe layer, expert) in that order, block i at byte i * block: gate |
  up | down back to back (ExpertLayout.spans: in a block format each its own size), zero-padded
  to `block` (a multiple of 4 KiB), so one O_DIRECT preadv reads an expert straight into a slot;
- experts.json: {"format": "lowmoe-packed", "version": 1, "dtype", "inter", "hidden", "block",
  "layers": [moe layer ids], "experts": E, "file": "experts.bin"}; dtype a format or [gate's,
  up's, down's], and "per_layer": [[layer, dtype], ...] where the layers' formats differ (the
  block is then the largest layer's).

Everything is written into a temporary folder beside OUT, then renamed: an interrupted pack never
leaves a half-written OUT. Copies stream one expert or one tensor chunk at a time, so memory stays
small for models of any size. The input folder is only read.
"""

import json
import os
import shutil
import struct
import tempfile

from ..errors import InputError
from ..load.checkpoint import copy_range
from ..load.gguf import DEFAULT_ALIGNMENT, GGUF, read_file
from ..load.gguf_write import write_gguf
from ..load.model import DENSE_GGUF, open_model
from ..predict.learned import FILENAME, predictor_file
from .slots import aligned_empty
from .store import FORMAT, GGUF_EXPERTS, INDEX, ROLES, VERSION, expert_tensors, is_packed, open_store

COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", FILENAME)
DENSE, BLOB = "dense.safetensors", "experts.bin"


def pack_model(model_dir, out_dir, progress=None):
    """Packs the model at `model_dir` (a folder, or a GGUF file) into `out_dir` (absent or empty).
    `progress(done, total)` is called after each expert block. Returns (blocks, bytes written)."""
    if is_packed(model_dir):
        raise InputError(f"{model_dir}: already packed (it has {INDEX})")
    if os.path.lexists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise InputError(f"{out_dir}: already exists and is not an empty folder")
    ckpt, cfg = open_model(model_dir)
    store = open_store("checkpoint", model_dir, ckpt, cfg)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".partial", dir=os.path.dirname(out_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT gets the usual permissions
    try:
        gguf = isinstance(ckpt, GGUF)
        # from beside a GGUF: a tokenizer.json (it wins over the file's own) and its learned predictor
        copied = {os.path.join(os.path.dirname(model_dir), "tokenizer.json"): "tokenizer.json",
                  predictor_file(model_dir): FILENAME} if gguf else {os.path.join(model_dir, n): n for n in COPIED}
        for src, name in copied.items():
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, name))
        if gguf:
            experts = {GGUF_EXPERTS.format(layer=l, role=r) for l in store.layers for r in ROLES}
            nbytes = _write_dense_gguf(ckpt, experts, os.path.join(tmp, DENSE_GGUF))
        else:
            experts = {t.name for infos in expert_tensors(ckpt, cfg)[1].values() for t in infos}
            dense = [t for name, t in sorted(ckpt.tensors.items()) if name not in experts]
            nbytes = write_safetensors(os.path.join(tmp, DENSE), dense)
        blocks = _write_experts(store, os.path.join(tmp, BLOB), progress)
        nbytes += blocks * store.layout.block
        L = store.layout
        index = {"format": FORMAT, "version": VERSION, "dtype": L.dtype, "inter": L.inter, "hidden": L.hidden,
                 "block": L.block, "layers": store.layers, "experts": store.experts, "file": BLOB}
        if L.per_layer:
            index["per_layer"] = [[layer, dtype] for layer, dtype in L.per_layer]
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


def _write_dense_gguf(model, experts, path):
    """The GGUF model's metadata (without the split keys: one file) and every tensor not in `experts`
    into a GGUF at `path`; returns its size."""
    entries = []
    read_file(model.files[0], entries)
    entries = [(k, b) for k, b in entries if not k.startswith("split.")]
    dense = [(name, t) for name, t in model.tensors.items() if name not in experts]
    with open(path, "wb") as out:
        return write_gguf(out, entries, dense, model.metadata.get("general.alignment", DEFAULT_ALIGNMENT))


def _write_experts(store, path, progress):
    keys = [(l, e) for l in store.layers for e in range(store.experts)]
    buf = aligned_empty(store.layout.block)
    with open(path, "wb") as f:
        for i, key in enumerate(keys):
            n = store.read(*key, buf)
            buf[n:] = 0  # the padding, and the end of a larger layer's expert: zero
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
            copy_range(t.file, t.offset, t.nbytes, out)
    return 8 + len(raw) + end


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
