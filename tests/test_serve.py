"""`lowmoe serve` through the official openai client, on 127.0.0.1: chat and completions, streamed
and not, greedy output equal to the engine's greedy decode of the rendered prompt, a second turn
that prefills only its new tokens, bad requests answered with 4xx and OpenAI's error body (and the
next request served), a full queue with 503, and a client that leaves mid-stream stopping its
generation. Each test's server is started and stopped here."""

import socket
import threading
import time

import pytest

import lowmoe
from chat_templates import PLAIN, chat_model
from lowmoe.chat.server import Api, make_app
from lowmoe.chat.template import load_template

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
CHAT = [{"role": "user", "content": "In the beginning"}]


class Server:
    """make_app(Api(...)) on a free port of 127.0.0.1, in a thread."""

    def __init__(self, path, queue=8):
        self.engine = lowmoe.Engine.from_pretrained(path)
        template = load_template(path, self.engine.tokenizer, self.engine.config.eos_token_ids)
        self.api = Api(self.engine, template, "m", queue)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(make_app(self.api), host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join()
        self.api.worker.close()
        self.engine.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(chat_model(tmp_path_factory.mktemp("serve") / "m", PLAIN))
    yield s
    s.stop()


def _greedy(server, prompt_text, n):
    """The engine's own greedy decode of the rendered prompt, as text (stopping at EOS)."""
    with lowmoe.Engine.from_pretrained(server.engine.model_dir) as e:
        return e.generate(e.encode(prompt_text), n).text


def test_chat_and_completions_streamed_or_not_equal_greedy_decode(server):
    c, n = server.client, 24
    want = _greedy(server, server.api.template.render(CHAT), n)
    r = c.chat.completions.create(model="m", messages=CHAT, max_tokens=n, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(server.engine.encode(server.api.template.render(CHAT)))
    parts = [ch.choices[0].delta.content or "" for ch in
             c.chat.completions.create(model="m", messages=CHAT, max_tokens=n, temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == want
    prompt = "And God said, Let there be light"
    want = _greedy(server, prompt, n)
    assert c.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0).choices[0].text == want
    streamed = c.completions.create(model="m", prompt=prompt, max_tokens=n, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == want
    assert [m.id for m in c.models.list()] == ["m"]


def test_a_second_turn_prefills_only_its_new_tokens(server):
    c = server.client
    first = c.chat.completions.create(model="m", messages=CHAT, max_tokens=8, temperature=0)
    turn = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                   {"role": "user", "content": "And the earth?"}]
    ids = server.engine.encode(server.api.template.render(turn))
    held = server.api.worker.session.ids  # what the first request left in the cache
    second = c.chat.completions.create(model="m", messages=turn, max_tokens=8, temperature=0)
    shared = next(i for i, (a, b) in enumerate(zip(held + [-1], ids)) if a != b)
    assert second.usage.prompt_tokens == len(ids)
    # the longest prefix the cache held: the first prompt and the reply's tokens up to where the
    # rendered text tokenizes differently; the rest (the new user turn) is all that was prefilled
    assert second.usage.prompt_tokens_details.cached_tokens == shared >= first.usage.prompt_tokens
    assert second.choices[0].message.content == _greedy(server, server.api.template.render(turn), 8)


@pytest.mark.parametrize("case", ["bad json", "unknown model", "negative max_tokens", "over-long prompt", "no messages",
                                  "bad temperature"])
def test_bad_requests_get_4xx_with_an_error_body_and_the_next_works(server, case):
    import json
    import urllib.error
    import urllib.request

    body = {"model": "m", "messages": CHAT}
    body.update({"unknown model": {"model": "gpt-9"}, "negative max_tokens": {"max_tokens": -1},
                 "over-long prompt": {"messages": [{"role": "user", "content": "the " * 9000}]},
                 "no messages": {"messages": []}, "bad temperature": {"temperature": "hot"}}.get(case, {}))
    data = b"{not json" if case == "bad json" else json.dumps(body).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", data, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    status, error = err.value.code, json.loads(err.value.read())["error"]
    assert status == (404 if case == "unknown model" else 400)
    assert error["message"] and error["type"] == "invalid_request_error"
    r = server.client.chat.completions.create(model="m", messages=CHAT, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_a_full_queue_is_503_and_a_client_that_leaves_stops_its_generation(tmp_path):
    s = Server(chat_model(tmp_path / "m", PLAIN), queue=0)
    try:
        stream = s.client.chat.completions.create(model="m", messages=CHAT, max_tokens=4000, temperature=1.0,
                                                  stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # running now
        with pytest.raises(openai.APIStatusError) as err:
            s.client.chat.completions.create(model="m", messages=CHAT, max_tokens=2)
        assert err.value.status_code == 503 and err.value.body["code"] == "overloaded"
        stream.close()  # the client leaves
        deadline = time.time() + 30
        while s.api.worker.pending and time.time() < deadline:
            time.sleep(0.05)
        assert s.api.worker.pending == 0
        assert len(s.api.worker.session.ids) < 1000  # stopped long before its 4000 tokens
        assert s.client.chat.completions.create(model="m", messages=CHAT, max_tokens=2).usage.completion_tokens == 2
    finally:
        s.stop()
