"""Typed events the engine emits about the expert cache, one per decode token and MoE layer.
Sinks (JSONL file, summary table, dashboard) consume them; the engine never formats output.

Trace file (JSONL, one JSON object per line, written by `JsonlSink`, read by `read_trace`):

line 1, the header:
    lowmoe_trace  int         format version, 1
    model         str         model folder
    expert_cache  str         cache budget as given ("25%", "1.5GiB", "min")
    predictor     str         "nextgate", "history" or "none"
every further line, one `LayerEvent`:
    token         int         decode step, 0-based (the first new token comes from the prefill: no events)
    layer         int         MoE layer index
    chosen        list[int]   experts the gating chose, ascending
    predicted     list[int]   the predictor's top-k for this layer, most likely first; [] when none
    hits          int         chosen experts already cached
    prefetched    int         chosen experts a hint had staged or had in flight
    misses        int         chosen experts read on demand
    stall_s       float       seconds this layer waited on reads
    bytes_read    int         bytes of the reads this layer waited for (demand and admitted hints)
    wasted_bytes  int         bytes of hints for this layer that the gating did not choose
"""

import json
from dataclasses import asdict, dataclass, fields

from .errors import InputError

VERSION = 1


@dataclass
class LayerEvent:
    token: int  # decode step, 0-based
    layer: int
    chosen: list  # experts the gating chose, ascending
    predicted: list  # the predictor's top-k for this layer, most likely first ([] when none)
    hits: int  # chosen experts already cached
    prefetched: int  # chosen experts a hint had staged or had in flight
    misses: int  # chosen experts read on demand
    stall_s: float  # time this layer waited on reads
    bytes_read: int  # bytes of the reads this layer waited for (demand and admitted hints)
    wasted_bytes: int  # bytes of hints for this layer that the gating did not choose

    def as_dict(self):
        return asdict(self)


class JsonlSink:
    """Writes the header, then one line per event. Call `close()` at the end of the run."""

    def __init__(self, path, model=None, expert_cache=None, predictor=None):
        self.path = str(path)
        try:
            self.file = open(self.path, "w", encoding="utf-8")
        except OSError as e:
            raise InputError(f"{self.path}: cannot write trace ({e.strerror})") from None
        header = {"lowmoe_trace": VERSION, "model": model, "expert_cache": expert_cache, "predictor": predictor}
        self.file.write(json.dumps(header) + "\n")

    def __call__(self, event):
        self.file.write(json.dumps(event.as_dict()) + "\n")

    def close(self):
        self.file.close()


def _check_types(obj):
    """Raises ValueError naming the first field whose value has the wrong JSON type, so that
    a hand-edited file fails here with its line number, not later inside the summary."""
    for f in fields(LayerEvent):
        if not _is(obj[f.name], f.type):
            raise ValueError(f"field {f.name!r}: expected {f.type.__name__}, got {json.dumps(obj[f.name])}")


def _is(value, kind):
    if isinstance(value, bool):  # a bool is an int to Python, not to the schema
        return False
    if kind is float:
        return isinstance(value, (int, float))
    if kind is list:
        return isinstance(value, list) and all(_is(e, int) for e in value)
    return isinstance(value, kind)


def read_trace(path):
    """(header dict, [LayerEvent]) from a file written by `JsonlSink`; InputError naming the file
    and line on anything else."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read trace ({getattr(e, 'strerror', None) or e})") from None
    names = [f.name for f in fields(LayerEvent)]
    header, events = None, []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object")
            if header is None:
                if obj.get("lowmoe_trace") != VERSION:
                    raise ValueError(f"not a lowmoe trace header (expected \"lowmoe_trace\": {VERSION})")
                header = obj
                continue
            if sorted(obj) != sorted(names):
                raise ValueError(f"expected the fields {', '.join(names)}")
            _check_types(obj)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise InputError(f"{path}:{n}: {e}") from None
        events.append(LayerEvent(**obj))
    if header is None:
        raise InputError(f"{path}: empty file, not a lowmoe trace")
    return header, events


class Summary:
    """Per-layer counters fed one event at a time, so a long run keeps no event list."""

    def __init__(self):
        self.layers = {}  # layer -> counters
        self.tokens = set()

    def __call__(self, event):
        c = self.layers.setdefault(event.layer, dict(tokens=0, predictions=0, recall=0.0, hits=0, prefetched=0,
                                                     misses=0, stall_s=0.0, bytes_read=0, wasted_bytes=0))
        self.tokens.add(event.token)
        c["tokens"] += 1
        if event.predicted:
            c["predictions"] += 1
            c["recall"] += len(set(event.predicted) & set(event.chosen)) / len(event.chosen)
        for f in ("hits", "prefetched", "misses", "stall_s", "bytes_read", "wasted_bytes"):
            c[f] += getattr(event, f)

    def rows(self):
        """One dict per layer, ascending, then a row with layer "total" (tokens: decode steps)."""
        total = dict(tokens=len(self.tokens), predictions=0, recall=0.0, hits=0, prefetched=0, misses=0,
                     stall_s=0.0, bytes_read=0, wasted_bytes=0)
        rows = []
        for layer, c in sorted(self.layers.items()):
            rows.append(_row(layer, c))
            for f in total:
                if f != "tokens":
                    total[f] += c[f]
        return rows + [_row("total", total)] if rows else []


def _row(layer, c):
    used = c["hits"] + c["prefetched"] + c["misses"]
    return {"layer": layer, "tokens": c["tokens"], "predictions": c["predictions"],
            "topk_recall": c["recall"] / c["predictions"] if c["predictions"] else 0.0,
            "prefetch_hit_rate": c["prefetched"] / used if used else 0.0,
            "cache_hit_rate": c["hits"] / used if used else 0.0,
            "hits": c["hits"], "prefetched": c["prefetched"], "misses": c["misses"],
            "stall_s": c["stall_s"], "bytes_read": c["bytes_read"], "wasted_bytes": c["wasted_bytes"]}


def summarize(events):
    """Per-layer rows (see `Summary.rows`): topk_recall is the mean |predicted ∩ chosen| / k over
    the `predictions` events that had one; the hit rates are shares of the chosen experts;
    bytes_read counts the reads the layers waited for (the run's stats also count hint reads
    that finished in the background)."""
    s = Summary()
    for e in events:
        s(e)
    return s.rows()


def summary_table(rows, title="expert cache per MoE layer (decode steps)"):
    from rich.table import Table

    t = Table(title=title)
    for name in ("layer", "tokens", "recall", "prefetched", "cached", "misses", "stall s", "read MiB", "waste MiB"):
        t.add_column(name, justify="right")
    t.caption = "recall: top-k of the predictor vs the gating; prefetched, cached: shares of the chosen experts"
    for i, r in enumerate(rows):
        recall = f"{r['topk_recall']:.1%}" if r["predictions"] else "-"  # the first MoE layer has no predictor
        t.add_row(str(r["layer"]), str(r["tokens"]), recall, f"{r['prefetch_hit_rate']:.1%}",
                  f"{r['cache_hit_rate']:.1%}", str(r["misses"]), f"{r['stall_s']:.3f}",
                  f"{r['bytes_read'] / 2**20:.1f}", f"{r['wasted_bytes'] / 2**20:.1f}",
                  end_section=i == len(rows) - 2)  # a rule above the total row
    return t
