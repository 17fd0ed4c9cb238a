"""A model folder's tokenizer as GGUF `tokenizer.ggml.*` metadata, the inverse of
load/gguf_tokenizer.py, so that the file carries its own tokenizer as llama.cpp's do:

- byte-level BPE (GPT-2, Qwen2 / Qwen3, Qwen3.5): model "gpt2", the vocabulary and merges as
  they are, `pre` named from the pre-tokenizer's split regex ("gpt-2", "qwen2", "qwen35");
- SentencePiece-style BPE (Metaspace "▁", byte fallback: Mixtral): model "llama", each token
  scored by its merge's rank (the reader ranks merges by score), byte tokens <0xNN> typed BYTE.
Added tokens are typed CONTROL (special) or USER_DEFINED. The chat template and BOS / EOS ids
come from tokenizer_config.json and config.json. Any other tokenizer (word-level, unigram) gets
no metadata: `note` says so, and lowmoe then reads the tokenizer.json beside the file.
"""

import json
import os

from ..load.gguf_tokenizer import SPLITS

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # llama.cpp's token types


def _json(path):
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _pre(pre_tokenizer):
    """The tokenizer.ggml.pre of a byte-level pre-tokenizer, or None if lowmoe cannot name it."""
    if pre_tokenizer is None:
        return None
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    steps = pre_tokenizer.get("pretokenizers", [])
    if pre_tokenizer.get("type") == "Sequence" and len(steps) == 2 and steps[1].get("type") == "ByteLevel":
        regex = steps[0].get("pattern", {}).get("Regex")
        return next((name for name, split in SPLITS.items() if split is not None and split == regex), None)
    return None


def _sentencepiece(model, pre_tokenizer):
    return (model.get("byte_fallback") and pre_tokenizer is not None
            and pre_tokenizer.get("type") == "Metaspace")


def add_vocab(writer, model_dir, vocab_size):
    """Writes the tokenizer metadata of `model_dir` -> a note for the user, or None when written."""
    tok = _json(os.path.join(model_dir, "tokenizer.json"))
    model, pre_tok = tok.get("model", {}), tok.get("pre_tokenizer")
    if model.get("type") != "BPE":
        return "no tokenizer.json" if not tok else f"its tokenizer ({model.get('type')}) has no GGUF form"
    pre = _pre(pre_tok)
    spm = _sentencepiece(model, pre_tok)
    if pre is None and not spm:
        return "its pre-tokenizer has no GGUF name lowmoe knows"
    tokens = [None] * vocab_size
    for t, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = t
    types = [NORMAL] * vocab_size
    for a in tok.get("added_tokens", []):
        if a["id"] < vocab_size:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:  # a padded vocabulary (embedding rows past the tokenizer's)
            tokens[i], types[i] = f"[PAD{i}]", USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if spm:
        writer.add_tokenizer_model("llama")
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        writer.add_token_scores([-float(rank.get(t, 0)) for t in tokens])
        for i, t in enumerate(tokens):
            if types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = BYTE
        if model.get("unk_token") in model["vocab"]:
            writer.add_unk_token_id(model["vocab"][model["unk_token"]])
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    cfg = _json(os.path.join(model_dir, "config.json"))
    gen = _json(os.path.join(model_dir, "generation_config.json"))
    tcfg = _json(os.path.join(model_dir, "tokenizer_config.json"))
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = gen.get(key, cfg.get(key))
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < vocab_size:
            add(value)
    writer.add_add_bos_token(bool(tcfg.get("add_bos_token", spm)))
    template = tcfg.get("chat_template")
    path = os.path.join(model_dir, "chat_template.jinja")
    if template is None and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            template = f.read()
    if template:
        writer.add_chat_template(template)
    return None
