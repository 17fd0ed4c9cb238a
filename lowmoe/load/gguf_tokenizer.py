"""A `tokenizers.Tokenizer` from a GGUF model's `tokenizer.ggml.*` metadata, built as the model's own
tokenizer.json builds it (and as transformers builds one from a GGUF file):

- "gpt2": byte-level BPE (`tokens`, `merges`), split by the regex that `tokenizer.ggml.pre` names:
  "gpt-2" GPT-2's own; "qwen2" (Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, with NFC normalisation as their
  tokenizer.json has it) and "qwen35" (Qwen3.5 / 3.6: letters with their combining marks);
- "llama": SentencePiece BPE (Mixtral, Llama 2): `tokens` and `scores`, the merges recovered from
  the scores (a token's merge ranks by its score), "▁" for spaces with one before the text, unknown
  characters as byte tokens <0xNN>; a BOS token before the text unless `add_bos_token` is false.

Special tokens (token type 3, control) are matched whole and skipped when decoding; user-defined
ones (type 4, e.g. <think>) are matched whole and decoded. Another tokenizer is a one-line error
asking for the model's tokenizer.json beside the file, which wins whenever it is there.
"""

from ..errors import ConfigError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"gpt-2": None, "qwen2": _QWEN2, "qwen35": _QWEN35}  # tokenizer.ggml.pre -> its split (None: GPT-2's)


def _byte_level(meta, pre):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}, merges, fuse_unk=False))
    if SPLITS[pre] is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _merges(tokens, scores):
    """SentencePiece BPE's merges from its vocabulary: every split of a token into two tokens, ranked
    by the token's score (higher first; ties: shorter left piece), so BPE merges the best-scoring
    pair first, as SentencePiece does."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t, score in zip(tokens, scores):
        for i in range(1, len(t)):
            left, right = t[:i], t[i:]
            if left in ids and right in ids:
                merges.append((-score, len(left), len(right), ids[left], ids[right], left, right))
    return [(m[5], m[6]) for m in sorted(merges)]


def _sentencepiece(meta, path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ConfigError(f"{path}: metadata 'tokenizer.ggml.scores' is missing or not one per token")
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, _merges(tokens, scores), fuse_unk=True,
                               byte_fallback=True, unk_token=tokens[unk] if unk is not None else None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token", True):
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B",
                                                           special_tokens=[(tokens[bos], bos)])
    return tok


def gguf_tokenizer(meta, path):
    """The tokenizer of the GGUF metadata `meta` (of the file `path`); ConfigError when lowmoe cannot
    build it."""
    from tokenizers import AddedToken

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if not (kind == "llama" or (kind == "gpt2" and pre in SPLITS)):
        raise ConfigError(f"{path}: lowmoe cannot build the tokenizer '{kind}' (pre-tokenizer '{pre}') from the GGUF "
                          "metadata; put the model's tokenizer.json beside the file")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConfigError(f"{path}: missing metadata 'tokenizer.ggml.tokens'")
    tok = _sentencepiece(meta, path) if kind == "llama" else _byte_level(meta, pre)
    types = meta.get("tokenizer.ggml.token_type", [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    return tok
