"""`lowmoe trace FILE`: the per-layer expert cache summary of a trace written by
`lowmoe decode --trace FILE` (or SHARPI_TRACE_MOE=FILE)."""

import json


def add_arguments(p):
    p.add_argument("file", help="JSONL trace file")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of a table")


def main(args):
    from lowmoe.trace import read_trace, summarize, summary_table

    header, events = read_trace(args.file)
    rows = summarize(events)
    if args.json:
        print(json.dumps(rows))
        return 0
    from lowmoe.cli.console import table_console

    title = f"{header.get('model')}: cache {header.get('expert_cache')}, predictor {header.get('predictor')}"
    table_console().print(summary_table(rows, title=title))
    return 0
