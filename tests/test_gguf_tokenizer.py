"""The tokenizer built from GGUF metadata (lowmoe/load/gguf_tokenizer.py) against the model's own
tokenizer.json: llama.cpp's converter wrote the bundled model's vocabulary into
tests/data/gguf/default-tokenizer.gguf, and text encodes to the same ids and decodes to the same
text; a tokenizer.json beside a GGUF file wins; one lowmoe cannot build is a one-line error when
text is given. The Qwen pre-tokenizer splits and SentencePiece vocabularies (Mixtral's) against
transformers' tokenizers for GGUF files."""

import os
import shutil

import pytest
from tokenizers import Tokenizer

import lowmoe
from lowmoe.errors import ConfigError
from lowmoe.load.gguf import GGUF
from lowmoe.load.gguf_tokenizer import gguf_tokenizer

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gguf")
TEXT = ("In the beginning God created the heaven and the earth.\n\nAnd the earth was without form, and void;"
        " and darkness was upon the face of the deep. 1:2 3,456 \u201cquoted\u201d \u2019tis<|endoftext|>  two  spaces\ttab\n")


def test_the_metadata_tokenizer_is_the_models_own():
    ours = gguf_tokenizer(GGUF(os.path.join(DATA, "default-tokenizer.gguf")).metadata, "default-tokenizer.gguf")
    ref = Tokenizer.from_file(os.path.join(lowmoe.DEFAULT_MODEL, "tokenizer.json"))
    ids = ours.encode(TEXT).ids
    assert ids == ref.encode(TEXT).ids and 0 in ids  # <|endoftext|> matched whole, as a special token
    assert ours.decode(ids) == ref.decode(ids)


def test_a_tokenizer_json_beside_a_gguf_file_wins(tmp_path):
    shutil.copy(os.path.join(DATA, "mixtral_bf16_sharded-bf16.gguf"), tmp_path / "m.gguf")
    shutil.copy(os.path.join(lowmoe.DEFAULT_MODEL, "tokenizer.json"), tmp_path / "tokenizer.json")
    with lowmoe.Engine.from_pretrained(str(tmp_path / "m.gguf")) as e:
        assert e.encode("In the beginning") == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(
            "In the beginning").ids


@pytest.mark.parametrize("meta,message", [
    ({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "cannot build the tokenizer 'bert'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm", "tokenizer.ggml.tokens": ["a"]},
     "pre-tokenizer 'deepseek-llm'"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.scores": [0.0]},
     "'tokenizer.ggml.scores' is missing or not one per token"),
    ({"tokenizer.ggml.model": "gpt2"}, "missing metadata 'tokenizer.ggml.tokens'"),
])
def test_a_tokenizer_lowmoe_cannot_build_is_a_one_line_error(meta, message):
    with pytest.raises(ConfigError, match=message) as err:
        gguf_tokenizer(meta, "m.gguf")
    assert str(err.value).startswith("m.gguf: ") and "\n" not in str(err.value)


# ---------------------------------------- other tokenizers, against transformers' GGUF tokenizers

def _kv(key, value):
    """One GGUF metadata entry as stored: a string, a bool, a u32, or a list of strings / f32 / i32."""
    import struct

    def string(s):
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    if isinstance(value, str):
        body = struct.pack("<I", 8) + string(value)
    elif isinstance(value, bool):
        body = struct.pack("<I?", 7, value)
    elif isinstance(value, int):
        body = struct.pack("<II", 4, value)
    elif isinstance(value[0], str):
        body = struct.pack("<IIQ", 9, 8, len(value)) + b"".join(string(s) for s in value)
    elif isinstance(value[0], float):
        body = struct.pack(f"<IIQ{len(value)}f", 9, 6, len(value), *value)
    else:
        body = struct.pack(f"<IIQ{len(value)}i", 9, 5, len(value), *value)
    return key, string(key) + body


def _write(path, meta):
    from lowmoe.load.gguf_write import write_gguf

    with open(path, "wb") as f:
        write_gguf(f, [_kv(k, v) for k, v in meta.items()], [])
    return str(path)


def _transformers_tokenizer(path):
    pytest.importorskip("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, _ = get_gguf_tokenizer(path)
    return convert_gguf_tokenizer(arch, tokenizer_dict)[0]


UNICODE = ("Numbers 12345 and 3.14159, café, naïve, Ünïcödé; 北京欢迎你 — emojis 🙂👍🏽, tabs\tand\r\nCRLF, "
           "'s 're 'LL I'M, ...!!! ???\n\n\n  trailing   ")


@pytest.mark.parametrize("pre", ["qwen2", "qwen35", "gpt-2"])
def test_byte_level_splits_are_transformers(tmp_path, pre):
    """The bundled model's byte-level vocabulary under each pre-tokenizer split a GGUF may name: the ids
    of transformers' tokenizer for the same file (NFC text: the Qwen tokenizers also normalise to NFC)."""
    meta = {k: v for k, v in GGUF(os.path.join(DATA, "default-tokenizer.gguf")).metadata.items()
            if k.startswith("tokenizer.") and k != "tokenizer.ggml.pre"}
    path = _write(tmp_path / "t.gguf", {"general.architecture": "qwen3moe", "tokenizer.ggml.pre": pre, **meta})
    ours, ref = gguf_tokenizer(GGUF(path).metadata, path), _transformers_tokenizer(path)
    for text in (TEXT, UNICODE):
        ids = ours.encode(text).ids
        assert ids == ref.encode(text).ids, text
        assert ours.decode(ids) == ref.decode(ids)


def _sentencepiece_meta():
    """A small SentencePiece-style BPE vocabulary, as a Mixtral or Llama 2 GGUF stores one: <unk>, <s>,
    </s>, the 256 byte tokens, then pieces learned on English text with "▁" for spaces, each scored by
    its merge order (SentencePiece's BPE scores); one user-defined token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=[])
    tok.train_from_iterator([TEXT.replace("<|endoftext|>", "")] * 3 + ["the and of to in that he shall unto"] * 5, trainer)
    pieces = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<think>"]
    tokens += [p for p, _ in pieces if p not in tokens]
    scores = [0.0] * 260 + [-float(i) for i in range(len(tokens) - 260)]
    types = [2, 3, 3] + [6] * 256 + [4] + [1] * (len(tokens) - 260)
    return {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def test_sentencepiece_is_transformers(tmp_path):
    """A "llama" (SentencePiece) vocabulary: BOS first (as llama.cpp adds it; transformers' backend
    tokenizer leaves it to the wrapper's add_bos_token), "▁" for spaces, characters outside the
    vocabulary as byte tokens, <think> whole; the ids and decoded text of transformers' tokenizer."""
    path = _write(tmp_path / "spm.gguf", _sentencepiece_meta())
    ours, ref = gguf_tokenizer(GGUF(path).metadata, path), _transformers_tokenizer(path)
    for text in (TEXT.replace("<|endoftext|>", "</s>"), UNICODE, " leading space", "<think>why</think>"):
        ids = ours.encode(text).ids
        assert ids[0] == 1 and ids[1:] == ref.encode(text).ids, text
        assert ours.decode(ids) == ref.decode(ids[1:])
    assert ours.encode("🙂").ids[-4:] == [3 + b for b in "🙂".encode()]  # no piece: its UTF-8 bytes, <0x00> id 3
