"""Chat templates: lowmoe renders a conversation exactly as transformers' apply_chat_template does
(the same files read by both), from tokenizer_config.json, chat_template.jinja and a GGUF's
metadata; a model without a template and a template's raise_exception are clear errors."""

import os

import pytest

from chat_templates import MIXTRAL, PLAIN, QWEN3, chat_model
from lowmoe.chat.template import load_template
from lowmoe.errors import ConfigError, InputError
from lowmoe.load.gguf import GGUF

transformers = pytest.importorskip("transformers")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, in °C",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CHATS = {
    "plain": [{"role": "user", "content": "In the beginning"}],
    "system and turns": [{"role": "system", "content": "Answer as the King James Bible would."},
                         {"role": "user", "content": "Who made the heaven?"},
                         {"role": "assistant", "content": "God made the heaven and the earth."},
                         {"role": "user", "content": "And the light?"}],
    "reasoning": [{"role": "user", "content": "Count to three."},
                  {"role": "assistant", "content": "<think>\nOne, two, three.\n</think>\n\n1, 2, 3"},
                  {"role": "user", "content": "Again, slower."},
                  {"role": "assistant", "content": "1... 2... 3", "reasoning_content": "Slowly this time."}],
    "tools": [{"role": "user", "content": "Weather in Jerusalem? Reply in ünïcödé."},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Jerusalem"}}}]},
              {"role": "tool", "content": "{\"temp\": 21}"}],
}


def _transformers(path, messages, **kwargs):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def _lowmoe(path):
    from tokenizers import Tokenizer

    return load_template(path, Tokenizer.from_file(os.path.join(path, "tokenizer.json")), (0,))


@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_qwen3_style_template_renders_as_transformers(tmp_path, chat, generation_prompt):
    path = chat_model(tmp_path / "m", QWEN3)
    tools = TOOLS if chat == "tools" else None
    for extra in ({}, {"enable_thinking": False}):
        want = _transformers(path, CHATS[chat], add_generation_prompt=generation_prompt, tools=tools, **extra)
        assert _lowmoe(path).render(CHATS[chat], add_generation_prompt=generation_prompt, tools=tools, **extra) == want


def test_mixtral_style_template_renders_as_transformers_and_raises_as_it(tmp_path):
    path = chat_model(tmp_path / "m", MIXTRAL, bos="<s>", eos="</s>")
    chat = CHATS["system and turns"][1:]
    assert _lowmoe(path).render(chat, add_generation_prompt=False) == _transformers(path, chat)
    assert _lowmoe(path).render(chat).startswith("<s>[INST] Who made the heaven? [/INST]God made")
    with pytest.raises(InputError, match="roles must alternate"):
        _lowmoe(path).render(CHATS["system and turns"])


def test_template_from_a_jinja_file_and_from_a_gguf_written_by_lowmoe(tmp_path):
    from lowmoe.quantize.write import quantize_model

    path = chat_model(tmp_path / "m", PLAIN, as_file=True)
    chat = CHATS["system and turns"]
    want = _transformers(path, chat, add_generation_prompt=True)
    assert _lowmoe(path).render(chat) == want
    gguf = str(tmp_path / "m.gguf")
    quantize_model(chat_model(tmp_path / "n", PLAIN), gguf, "q8_0")
    meta = GGUF(gguf).metadata
    assert meta["tokenizer.chat_template"] == PLAIN
    template = load_template(gguf, None, (), meta)
    assert template.render(chat) == want and 0 in template.stop_ids  # the file's eos: <|endoftext|>


def test_stop_ids_take_the_end_of_turn_token(tmp_path):
    """<|endoftext|> is the bundled vocabulary's end of turn: a stop id even where config.json
    names no EOS."""
    path = chat_model(tmp_path / "m", PLAIN)
    assert 0 in _lowmoe(path).stop_ids


def test_a_model_without_a_template_is_a_clear_error(tmp_path):
    import lowmoe

    with pytest.raises(ConfigError, match="no chat template"):
        load_template(lowmoe.DEFAULT_MODEL, None, ())
    path = chat_model(tmp_path / "m", "{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match="does not parse"):
        _lowmoe(path)
