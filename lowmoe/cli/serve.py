"""`lowmoe serve [MODEL]`: an OpenAI-compatible HTTP server (see lowmoe/chat/server.py). Needs the
`serve` extra: pip install 'lowmoe[serve]' (Starlette and uvicorn)."""

import os

from lowmoe.cli.decode import add_engine_arguments, engine_options


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model folder or GGUF file (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--queue", type=int, default=8, help="requests that may wait while one runs (default 8); more get 503")
    p.add_argument("--name", default=None, help="the model's id in the API (default: the folder or file name)")
    add_engine_arguments(p)


def main(args):
    from lowmoe import DEFAULT_MODEL, Engine
    from lowmoe.errors import ConfigError, InputError

    try:
        import uvicorn

        from lowmoe.chat.server import Api, make_app
    except ImportError as e:
        raise InputError(f"lowmoe serve needs the serve extra ({e.name} is missing): pip install 'lowmoe[serve]'") from None
    from lowmoe.chat.template import load_template

    if not 0 < args.port < 65536 or args.queue < 0:
        raise InputError(f"--port must be in 1..65535 and --queue >= 0, got {args.port} and {args.queue}")
    model = args.model or DEFAULT_MODEL
    with Engine.from_pretrained(model, **engine_options(args)) as engine:
        try:
            template = load_template(model, engine.tokenizer, engine.config.eos_token_ids, engine.gguf_metadata)
        except ConfigError as e:
            template = None
            print(f"lowmoe serve: {e}; /v1/chat/completions will refuse requests")
        name = args.name or os.path.basename(os.path.normpath(model))
        api = Api(engine, template, name, args.queue)
        print(f"lowmoe serve: {name} on http://{args.host}:{args.port}/v1", flush=True)
        try:
            uvicorn.run(make_app(api), host=args.host, port=args.port, log_level="warning")
        finally:
            api.worker.close()
    return 0
