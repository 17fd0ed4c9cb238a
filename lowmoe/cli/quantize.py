"""`lowmoe quantize MODEL OUT.gguf --type TYPE [--calib TEXTFILE]`: a Hugging Face model folder to a
GGUF file that lowmoe and llama.cpp both read (see lowmoe/quantize/)."""

import time


def add_arguments(p):
    from lowmoe.quantize.mix import TYPES

    p.add_argument("model", help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", dest="kind", required=True, metavar="|".join(TYPES),
                   help="q4_k_m, q5_k_m: llama.cpp's mixes (more bits where they matter); q8_0, q6_k, q4_k "
                   "(every matrix in that type), bf16")
    p.add_argument("--calib", default=None, metavar="TEXTFILE",
                   help="calibration text (UTF-8): weigh each weight's error by the mean squared activation "
                   "it multiplies on this text (llama.cpp's importance matrix)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens at most (default 8192)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def main(args):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from lowmoe.cli.console import table_console
    from lowmoe.errors import InputError
    from lowmoe.quantize.mix import TYPES
    from lowmoe.quantize.write import check_paths, quantize_model

    if args.kind not in TYPES:
        raise InputError(f"unknown --type {args.kind!r}; choose one of {', '.join(TYPES)}")
    check_paths(args.model, args.out, args.force)  # before a calibration run that may take minutes
    t0 = time.perf_counter()
    importance = _importance(args) if args.calib else None
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("quantizing", total=None)
        summary = quantize_model(args.model, args.out, args.kind, importance, args.force,
                                 lambda name, done, total: bar.update(task, description=name, completed=done, total=total))
    table = Table(title=f"{args.out} ({args.kind}{', calibrated' if importance else ''})")
    table.add_column("format")
    table.add_column("tensors", justify="right")
    for fmt, n in sorted(summary["tensors"].items()):
        table.add_row(fmt, str(n))
    table_console().print(table)
    size, weights = summary["bytes"], summary["weights"]
    print(f"wrote {size / 1e6:.1f} MB, {8 * size / weights:.2f} bits per weight, in {time.perf_counter() - t0:.1f} s")
    if summary["note"]:
        print(f"note: no tokenizer in the file ({summary['note']}); keep tokenizer.json beside it")
    return 0


def _importance(args):
    import lowmoe
    from lowmoe.errors import InputError
    from lowmoe.quantize.imatrix import collect

    try:
        with open(args.calib, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{args.calib}: cannot read calibration text ({getattr(e, 'strerror', None) or e})") from None
    with lowmoe.Engine.from_pretrained(args.model) as engine:
        ids = engine.encode(text)[: args.calib_tokens]
        return collect(engine, ids)
