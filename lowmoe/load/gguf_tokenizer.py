"""A `tokenizers.Tokenizer` from a GGUF model's `tokenizer.ggml.*` metadata: byte-level BPE
(`tokenizer.ggml.model` "gpt2": `tokens`, `merges`, `token_type`), with the pre-tokenizer split that
`tokenizer.ggml.pre` names. Special tokens (token type 3, control) are matched whole and skipped when
decoding, as in the model's own tokenizer.json.

Pre-tokenizers known so far: "gpt-2" (GPT-2's split), checked against the bundled model's own
tokenizer.json. Another one (Qwen's "qwen2" needs its split and a Qwen tokenizer to check it
against), or a SentencePiece vocabulary ("llama"), is a one-line error asking for the model's
tokenizer.json beside the file, which wins whenever it is there.
"""

from ..errors import ConfigError

CONTROL = 3  # llama.cpp's token type of special tokens
PRE = ("gpt-2",)  # tokenizer.ggml.pre values built here


def gguf_tokenizer(meta, path):
    """The tokenizer of the GGUF metadata `meta` (of the file `path`); ConfigError when lowmoe cannot
    build it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2" or pre not in PRE:
        raise ConfigError(f"{path}: lowmoe cannot build the tokenizer '{kind}' (pre-tokenizer '{pre}') from the GGUF "
                          "metadata; put the model's tokenizer.json beside the file")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConfigError(f"{path}: missing metadata 'tokenizer.ggml.tokens'")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    return tok
