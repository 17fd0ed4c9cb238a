"""`lowmoe pack MODEL OUT`: write an expert-major packed copy of MODEL into OUT (see lowmoe/tier/pack.py)."""

import time


def add_arguments(p):
    p.add_argument("model", help="model folder (config.json + *.safetensors) or GGUF file")
    p.add_argument("out", help="folder to create (absent or empty)")


def main(args):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lowmoe.tier.pack import pack_model

    t0 = time.perf_counter()
    # the bar goes to stderr, and only to a terminal: stdout holds only the summary line
    console = Console(stderr=True)
    with Progress(TextColumn("packing experts"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("pack", total=None)
        blocks, nbytes = pack_model(args.model, args.out, lambda done, total: bar.update(task, completed=done, total=total))
    s = time.perf_counter() - t0
    print(f"packed {blocks} expert blocks, {nbytes / 1e6:.1f} MB into {args.out} in {s:.2f} s ({nbytes / 1e6 / s:.0f} MB/s)")
    return 0
