"""`lowmoe serve`: an OpenAI-compatible HTTP API over one Engine, on Starlette (ASGI, served by
uvicorn): POST /v1/chat/completions and /v1/completions (server-sent events with "stream": true),
GET /v1/models and /health.

Requests run one at a time, in arrival order, on one worker thread that owns the engine and one
Session (chat/session.py): a request whose prompt starts with the previous one's (the same
conversation, one turn on) prefills only its new tokens, and `usage.prompt_tokens_details.
cached_tokens` says how many it reused. At most `queue` requests wait behind the running one;
one more gets 503. A
client that goes away mid-stream stops its generation at the next token. Bad requests get
OpenAI's error shape ({"error": {"message", "type", "param", "code"}}) with a 4xx status, and
the server goes on.
"""

import asyncio
import json
import queue
import threading
import time
import uuid

from ..errors import LowmoeError
from .session import Session, TextStream, context_limit

DEFAULT_MAX_TOKENS = 512


class BadRequest(Exception):
    def __init__(self, message, status=400, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


def error_body(message, kind="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StopText:
    """Cuts generated text at the first of the `stop` strings; holds back an ending that could
    still become one, so no part of a stop string is ever sent."""

    def __init__(self, stop):
        self.stop, self.hold = stop, max((len(s) for s in stop), default=1) - 1
        self.text, self.sent = "", 0

    def push(self, delta):
        """-> (text to send now, whether a stop string ended it)."""
        self.text += delta
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.sent = self.text[self.sent : cut], cut
            return out, True
        upto = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : upto], upto
        return out, False

    def rest(self):
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


class Job:
    def __init__(self, ids, params):
        self.ids, self.params = ids, params
        self.events = queue.Queue()  # ("text", str) ..., then ("done", finish_reason, usage) or ("error", message)
        self.cancel = threading.Event()


class Worker:
    """The one thread that runs requests on the engine, in order."""

    def __init__(self, engine, stop_ids, size):
        self.engine, self.stop_ids, self.size = engine, stop_ids, size
        self.session = Session(engine)
        self.jobs = queue.Queue()
        self.lock = threading.Lock()
        self.pending = 0  # requests submitted and not finished: the running one and those waiting
        self.thread = threading.Thread(target=self._loop, daemon=True, name="lowmoe-serve")
        self.thread.start()

    def submit(self, job):
        with self.lock:
            if self.pending > self.size:
                raise BadRequest(f"the server is busy: one request is running and {self.size} are waiting", 503,
                                 kind="server_error", code="overloaded")
            self.pending += 1
        self.jobs.put(job)

    def close(self):
        self.jobs.put(None)
        self.thread.join()

    def _loop(self):
        while (job := self.jobs.get()) is not None:
            try:
                if job.cancel.is_set():
                    job.events.put(("done", "cancelled", None))
                else:
                    self._run(job)
            except LowmoeError as e:
                job.events.put(("error", str(e)))
            except Exception as e:  # noqa: BLE001 - a failed request must not stop the server
                self.session.reset()
                job.events.put(("error", f"internal error: {e}"))
            finally:
                with self.lock:
                    self.pending -= 1

    def _run(self, job):
        p = job.params
        cached = self.session.prefill(job.ids)
        stop_ids = () if p["ignore_eos"] else self.stop_ids
        text, cut = TextStream(self.engine.tokenizer), StopText(p["stop"])
        finish, n, stopped = "length", 0, False
        for token in self.session.generate(p["max_tokens"], p["temperature"], p["top_p"], p["top_k"], p["seed"],
                                           stop_ids):
            if job.cancel.is_set():
                finish = "cancelled"
                break
            if token in stop_ids:
                finish = "stop"
                break
            n += 1
            out, stopped = cut.push(text.push(token))
            if out:
                job.events.put(("text", out))
            if stopped:
                finish = "stop"
                break
        if not stopped and (rest := cut.rest()):  # what was held back for a stop string that never came
            job.events.put(("text", rest))
        usage = {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        job.events.put(("done", finish, usage))


def _number(body, name, default, low, high, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be a{'n integer' if kind is int else ' number'} in [{low}, {high}], got {value!r}",
                         param=name)
    return value


class Api:
    def __init__(self, engine, template, name, queue_size=8):
        self.engine, self.template, self.name = engine, template, name
        self.limit = context_limit(engine)
        stop_ids = template.stop_ids if template is not None else frozenset(engine.config.eos_token_ids)
        self.worker = Worker(engine, stop_ids, queue_size)

    def params(self, body, n_prompt):
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        room = self.limit - n_prompt
        if room < 1:
            raise BadRequest(f"the prompt is {n_prompt} tokens; this model's context is {self.limit}", param="messages",
                             code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, room)
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, 1 << 31, int)
        if max_tokens > room:
            raise BadRequest(f"the prompt ({n_prompt} tokens) and max_tokens ({max_tokens}) exceed this model's context "
                             f"of {self.limit} tokens", param="max_tokens", code="context_length_exceeded")
        if _number(body, "n", 1, 1, 1, int) != 1:
            raise BadRequest("only n = 1 is supported", param="n")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings", param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest("'seed' must be an integer", param="seed")
        return {"max_tokens": max_tokens, "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
                "top_p": _number(body, "top_p", 1.0, 0.0, 1.0), "top_k": _number(body, "top_k", 0, 0, 1 << 31, int),
                "seed": seed, "stop": stop, "ignore_eos": bool(body.get("ignore_eos", False))}

    def check_model(self, body):
        model = body.get("model")
        if model is not None and model != self.name:
            raise BadRequest(f"the model '{model}' does not exist; this server serves '{self.name}'", 404, param="model",
                             code="model_not_found")

    def encode(self, text, param):
        """A rendered chat is tokenized without the tokenizer's own BOS (the template writes its
        own, as transformers' apply_chat_template tokenizes it); a raw prompt with it, as decode."""
        if self.engine.tokenizer is None:
            raise BadRequest(f"{self.engine.no_tokenizer}: this server takes no text", param=param)
        ids = self.engine.tokenizer.encode(text, add_special_tokens=param != "messages").ids
        if not ids:
            raise BadRequest("the prompt is empty", param=param)
        return ids

    def chat_prompt(self, body):
        if self.template is None:
            raise BadRequest(f"{self.name} has no chat template; use /v1/completions", param="messages")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
        chat = [dict(m, content=_text(m.get("content"))) for m in messages]
        try:
            text = self.template.render(chat, add_generation_prompt=True, tools=body.get("tools"))
        except LowmoeError as e:
            raise BadRequest(str(e), param="messages") from None
        return self.encode(text, "messages")

    def completion_prompt(self, body):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < self.engine.config.vocab_size for t in prompt):
                raise BadRequest(f"token ids must be in [0, {self.engine.config.vocab_size})", param="prompt")
            return list(prompt)
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string, a list of one string, or a list of token ids", param="prompt")
        return self.encode(prompt, "prompt")


def _text(content):
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise BadRequest("message content must be a string or a list of text parts", param="messages")


def make_app(api):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def body_of(request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def events(job):
        while True:
            event = await asyncio.to_thread(job.events.get)
            yield event
            if event[0] != "text":
                return

    def handler(kind):
        async def handle(request):
            try:
                body = await body_of(request)
                api.check_model(body)
                ids = api.chat_prompt(body) if kind == "chat" else api.completion_prompt(body)
                job = Job(ids, api.params(body, len(ids)))
                stream = bool(body.get("stream", False))
                include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
                api.worker.submit(job)
            except BadRequest as e:
                return JSONResponse(error_body(str(e), e.kind, e.param, e.code), status_code=e.status)
            rid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
            if stream:
                return StreamingResponse(_sse(kind, job, events(job), rid, created, api.name, include_usage),
                                         media_type="text/event-stream")
            parts, done = [], None
            async for event in events(job):
                if event[0] == "text":
                    parts.append(event[1])
                else:
                    done = event
            if done[0] == "error":
                return JSONResponse(error_body(done[1], "server_error"), status_code=500)
            text, finish, usage = "".join(parts), done[1], done[2]
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if kind == "chat" else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
            return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                                 "created": created, "model": api.name, "choices": [choice], "usage": usage})
        return handle

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": api.name, "object": "model", "created": 0,
                                                         "owned_by": "lowmoe"}]})

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def http_error(request, exc):
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

    async def server_error(request, exc):
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500)

    routes = [Route("/v1/chat/completions", handler("chat"), methods=["POST"]),
              Route("/v1/completions", handler("completion"), methods=["POST"]),
              Route("/v1/models", models), Route("/health", health)]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


async def _sse(kind, job, events, rid, created, name, include_usage):
    """The server-sent events of a streamed response; the job is cancelled if the client leaves."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta_text=None, finish=None, role=False, usage=None):
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({} if delta_text is None else {"content": delta_text})
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
        else:
            choices = [{"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}]
        body = {"id": rid, "object": obj, "created": created, "model": name,
                "choices": [] if usage is not None else choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        if kind == "chat":
            yield chunk(role=True)
        async for event in events:
            if event[0] == "text":
                yield chunk(event[1])
            elif event[0] == "error":
                yield f"data: {json.dumps(error_body(event[1], 'server_error'))}\n\n"
            else:
                yield chunk(finish=event[1])
                if include_usage:
                    yield chunk(usage=event[2])
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a no-op once it is done; else the client went away mid-stream
