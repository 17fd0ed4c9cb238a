"""A model's checkpoint, config and dense weights, from a Hugging Face folder or a GGUF file."""

import os

from .checkpoint import Checkpoint
from .config import load_model_config
from .gguf import GGUF
from .gguf_config import gguf_model_config
from .gguf_weights import load_dense_gguf
from .weights import load_dense


DENSE_GGUF = "dense.gguf"  # a packed GGUF model's metadata and dense tensors (tier/pack.py)


def open_model(path):
    """-> (checkpoint, ModelConfig): a GGUF file (`*.gguf`), or the dense.gguf of a GGUF model's
    packed folder, and its metadata's config; or a model folder's safetensors and config.json's."""
    if os.path.isfile(os.path.join(path, DENSE_GGUF)):
        path = os.path.join(path, DENSE_GGUF)
    if path.endswith(".gguf"):
        ckpt = GGUF(path)
        return ckpt, gguf_model_config(ckpt)
    cfg = load_model_config(path)
    return Checkpoint(path), cfg


def dense_weights(ckpt, cfg):
    """Every non-expert weight of the checkpoint open_model gave."""
    return load_dense_gguf(ckpt, cfg) if isinstance(ckpt, GGUF) else load_dense(ckpt, cfg)
