"""`lowmoe quantize`: a Hugging Face checkpoint to a GGUF file in one of mix.TYPES.

Tensors are planned from the checkpoint's headers (hf_gguf.plan), given their formats (mix.choose),
then read, quantized (kquants) and written one at a time with gguf's GGUFWriter, so memory holds
one tensor (a layer's stacked experts of one projection at most). The file is written under a
temporary name beside OUT and renamed at the end: an interrupt or a failure leaves no OUT and no
partial file.
"""

import json
import os
from collections import Counter

import numpy as np

from ..errors import InputError
from ..load.checkpoint import Checkpoint
from ..load.config import load_model_config
from ..tier.store import is_packed
from . import hf_gguf, kquants, mix
from .gguf_vocab import add_vocab

def nbytes(fmt, shape):
    """Bytes of a tensor of `shape` in format `fmt` (gguf's sizes of each type's blocks)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    elements, size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.upper()]]
    return int(np.prod(shape)) // elements * size


def check_paths(model_dir, out, force):
    """InputError for a model that is not a safetensors folder, or an OUT that exists (without
    `force`), is a folder, or lies in a folder that cannot be written."""
    if os.path.isfile(model_dir) and model_dir.endswith(".gguf"):
        raise InputError(f"{model_dir}: already a GGUF file; lowmoe quantize reads a Hugging Face model folder")
    if is_packed(model_dir):
        raise InputError(f"{model_dir}: a folder `lowmoe pack` wrote; quantize the model folder it was packed from")
    if os.path.isdir(out):
        raise InputError(f"{out}: is a folder; give the path of the .gguf file to write")
    if os.path.exists(out) and not force:
        raise InputError(f"{out}: exists; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InputError(f"{out}: cannot write there ({parent} does not exist)")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out}: cannot write there ({parent} is not writable)")


def quantize_model(model_dir, out, kind, importance=None, force=False, on_tensor=None):
    """Writes `model_dir` as the GGUF `out` in `kind` (a key of mix.TYPES). importance: {GGUF name:
    f32[cols] or, for stacked experts, f32[E, cols]} (imatrix.collect), or None. on_tensor(name,
    done, total) after each tensor. -> summary {"tensors": {format: count}, "bytes", "weights",
    "note"}."""
    if kind not in mix.TYPES:
        raise InputError(f"unknown type {kind!r}; choose one of {', '.join(mix.TYPES)}")
    check_paths(model_dir, out, force)
    cfg = load_model_config(model_dir)
    ckpt = Checkpoint(model_dir)
    tensors = hf_gguf.plan(ckpt, cfg)
    formats = mix.choose([(t.name, t.shape) for t in tensors], kind, cfg.num_layers, cfg.num_experts)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.partial-{os.getpid()}")
    import gguf

    writer = gguf.GGUFWriter(tmp, hf_gguf.ARCH[cfg.model_type])
    try:
        hf_gguf.add_metadata(writer, cfg, raw, os.path.basename(os.path.normpath(model_dir)))
        writer.add_file_type(mix.TYPES[kind][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        note = add_vocab(writer, model_dir, cfg.vocab_size)
        for t in tensors:
            fmt = formats[t.name]
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(fmt, t.shape),
                                   raw_dtype=gguf.GGMLQuantizationType[fmt.upper()])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for n, t in enumerate(tensors):
            writer.write_tensor_data(_encode(t.load(), formats[t.name], (importance or {}).get(t.name)))
            if on_tensor is not None:
                on_tensor(t.name, n + 1, len(tensors))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"tensors": dict(Counter(formats.values())), "bytes": os.path.getsize(out),
            "weights": sum(int(np.prod(t.shape)) for t in tensors), "note": note}


def _encode(x, fmt, weights):
    """float32 tensor x [..., cols] -> its bytes in `fmt` (uint8). Stacked experts [E, R, C] are
    quantized expert by expert, each with its own importance row where there is one."""
    x = np.ascontiguousarray(x, np.float32)
    if fmt == "f32":
        return x.reshape(-1).view(np.uint8)
    if x.ndim == 3:
        rows = [_encode(x[e], fmt, None if weights is None else weights[e]) for e in range(x.shape[0])]
        return np.concatenate(rows)
    return kquants.quantize(x.reshape(-1, x.shape[-1]), fmt, weights).reshape(-1)
