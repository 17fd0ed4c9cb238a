"""A model's chat template, rendered as transformers' `apply_chat_template(..., tokenize=False)`
renders it, and the tokens that end a turn.

The template comes from the checkpoint (`chat_template` in tokenizer_config.json, a string or a list
of named templates of which "default" is taken, or chat_template.jinja) or from a GGUF's
`tokenizer.chat_template`. It runs in jinja2's immutable sandbox with transformers' settings:
trim_blocks and lstrip_blocks, the loopcontrols extension and a `{% generation %}` tag that renders
its body, `tojson` without HTML escaping (ensure_ascii off, indent, separators, sort_keys),
`raise_exception`, `strftime_now`; the variables are the messages (a message's `reasoning_content`
also given as `thinking`, and the reverse), `tools`, `documents`, `add_generation_prompt` and the
special tokens' strings (bos_token, eos_token, unk_token, pad_token).

A turn ends at any EOS id of generation_config.json / config.json (or the GGUF's eos and eot ids)
and at the template's own end-of-turn token where the vocabulary has one (`<|im_end|>`,
`<|eot_id|>`, `<|end|>`, `</s>`), since base checkpoints often name only `<|endoftext|>` as EOS.
"""

import json
import os
from datetime import datetime

from ..errors import ConfigError, InputError

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<|end_of_text|>")
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None


def _content(token):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


class ChatTemplate:
    def __init__(self, source, special, stop_ids, origin):
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):
            """{% generation %}...{% endgeneration %} (transformers marks assistant text with it)."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ConfigError(f"{origin}: the chat template does not parse ({e})") from None
        self.special = special  # {"bos_token": "<s>", ...}
        self.stop_ids = stop_ids  # token ids that end an assistant turn
        self.origin = origin

    def render(self, messages, add_generation_prompt=True, tools=None, documents=None, **kwargs):
        """The prompt text of `messages` [{"role", "content", ...}]."""
        import jinja2

        chat = []
        for m in messages:
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
            chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
        try:
            return self.template.render(messages=chat, tools=tools, documents=documents,
                                        add_generation_prompt=add_generation_prompt, **{**self.special, **kwargs})
        except jinja2.TemplateError as e:
            raise InputError(f"{self.origin}: the chat template refused the conversation ({e})") from None


def _stop_ids(tokenizer, eos_ids):
    ids = set(eos_ids)
    if tokenizer is not None:
        for t in END_OF_TURN:
            i = tokenizer.token_to_id(t)
            if i is not None:
                ids.add(i)
    return frozenset(ids)


def load_template(model_path, tokenizer, eos_ids, gguf_metadata=None):
    """The ChatTemplate of a model folder or GGUF file; ConfigError when it has none."""
    if gguf_metadata is not None:
        source = gguf_metadata.get("tokenizer.chat_template")
        tokens = gguf_metadata.get("tokenizer.ggml.tokens", [])
        special = {}
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                          ("pad_token", "padding_token_id")):
            i = gguf_metadata.get(f"tokenizer.ggml.{key}")
            if isinstance(i, int) and 0 <= i < len(tokens):
                special[name] = tokens[i]
        eos_ids = set(eos_ids) | {gguf_metadata[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
                                  if isinstance(gguf_metadata.get(k), int)}
        origin = model_path
    else:
        cfg = _read_json(os.path.join(model_path, "tokenizer_config.json"))
        source = cfg.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja = os.path.join(model_path, "chat_template.jinja")
        if source is None and os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                source = f.read()
        special = {k: _content(cfg[k]) for k in _SPECIAL if _content(cfg.get(k)) is not None}
        gen = _read_json(os.path.join(model_path, "generation_config.json"))
        extra = gen.get("eos_token_id", [])
        eos_ids = set(eos_ids) | set(extra if isinstance(extra, list) else [extra])
        origin = os.path.join(model_path, "tokenizer_config.json")
    if not source:
        raise ConfigError(f"{model_path}: the model has no chat template (no chat_template in tokenizer_config.json, "
                          "no chat_template.jinja, no tokenizer.chat_template); use `lowmoe decode` for raw text")
    return ChatTemplate(source, special, _stop_ids(tokenizer, eos_ids), origin)
