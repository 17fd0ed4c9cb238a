"""One conversation's sequence state, kept between turns and requests, so that each prefills only
what is new.

`Session.prefill(ids)` keeps the longest prefix of `ids` that the cache already holds and runs the
rest through the model. Attention layers can be cut back to any prefix (the cache's length is
set back; later positions are overwritten). Linear-attention layers (Gated DeltaNet) hold one
running state, which cannot be cut back: on a hybrid model the cache is reused only when it holds
a prefix of `ids` whole, else it starts over. The logits of the last prompt token are needed to
sample, so a prompt the cache already holds whole has its last token run again (attention only;
a hybrid starts over then too).

`generate` samples from there (Engine.stream_from) and runs each sampled token through the model
except the last, so the cache ends up holding the prompt and every generated token but the final
one, which the next turn's prompt (the template renders the reply back) brings in again.
"""

import numpy as np

from ..engine import Context
from ..tier import vram


def common_prefix(a, b):
    n = min(len(a), len(b))
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if len(diff) else n


class Session:
    def __init__(self, engine):
        self.engine = engine
        self.linear = "linear" in engine.config.layer_mixers
        self.reset()

    def reset(self):
        self.kv = None
        self.ids = []  # the ids whose state the cache holds, in order
        self.logits = None  # f32[V] after the last prompt token prefill ran

    def prefill(self, ids):
        """Makes the cache hold `ids` (a non-empty list) -> how many of them it held already."""
        keep = 0 if self.kv is None else common_prefix(self.ids, ids)
        if keep == len(ids):
            keep -= 1  # the last token runs again: its logits are what the next token is sampled from
        if self.linear and keep < len(self.ids):
            keep = 0  # a recurrent state cannot be cut back
        if keep == 0:
            self.kv, self.ids = self.engine.kv_cache(len(ids)), []
        self.kv.length, self.ids = keep, self.ids[:keep]
        self._run(ids[keep:])
        return keep

    def _run(self, ids):
        """Runs `ids` after the cache's contents, vram.PREFILL_CHUNK at a time."""
        model, kv = self.engine.model, self.kv
        need = len(self.ids) + len(ids)
        self.engine._check_context(need)
        kv.reserve(need + 256)  # room ahead: decoding then grows the cache every 256 steps, not every step
        for i in range(0, len(ids), vram.PREFILL_CHUNK):
            self.logits = model.forward(np.asarray(ids[i : i + vram.PREFILL_CHUNK], np.int64), kv)[-1]
        self.ids = self.ids + list(ids)

    def generate(self, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop_ids=(), stats=None):
        """Yields sampled token ids after what prefill gave the cache (Engine.stream_from, `stats`
        as there), ending after a stop id (yielded) or max_new_tokens. A token has been run
        through the model, and joins `ids`, by the time the next one is yielded."""
        context = Context(self.kv, self.logits, len(self.ids))  # no saved recurrent state: the cache's is live
        previous = None
        for token in self.engine.stream_from(context, max_new_tokens, temperature, top_p, top_k, seed, False, stats):
            if previous is not None:
                self.ids.append(previous)
            yield token
            if token in stop_ids:
                return
            previous = token


class TextStream:
    """Token ids in, text out as soon as it is whole: the decoded text grows, and a suffix that
    ends in an incomplete UTF-8 sequence (decoded as U+FFFD) waits for the next token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new

    def rest(self):
        """What push held back (an incomplete UTF-8 sequence at the end), once no token follows."""
        text = self.tokenizer.decode(self.ids)
        new, self.sent = text[self.sent :], len(text)
        return new

    def text(self):
        return self.tokenizer.decode(self.ids)


def context_limit(engine):
    """The longest sequence the model was made for: config.json's max_position_embeddings (a
    GGUF's {arch}.context_length), else 4096."""
    meta = engine.gguf_metadata
    if meta is not None:
        value = meta.get(f"{meta.get('general.architecture')}.context_length")
    else:
        import json
        import os

        with open(os.path.join(engine.model_dir, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        value = raw.get("text_config", raw).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else 4096
