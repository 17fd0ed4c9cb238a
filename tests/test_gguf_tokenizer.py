"""The tokenizer built from GGUF metadata (lowmoe/load/gguf_tokenizer.py) against the model's own
tokenizer.json: llama.cpp's converter wrote the bundled model's vocabulary into
tests/data/gguf/default-tokenizer.gguf, and text encodes to the same ids and decodes to the same
text; a tokenizer.json beside a GGUF file wins; one lowmoe cannot build is a one-line error when
text is given."""

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
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, "cannot build the tokenizer 'llama'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": ["a"]},
     "pre-tokenizer 'qwen2'"),
    ({"tokenizer.ggml.model": "gpt2"}, "missing metadata 'tokenizer.ggml.tokens'"),
])
def test_a_tokenizer_lowmoe_cannot_build_is_a_one_line_error(meta, message):
    with pytest.raises(ConfigError, match=message) as err:
        gguf_tokenizer(meta, "m.gguf")
    assert str(err.value).startswith("m.gguf: ") and "\n" not in str(err.value)
