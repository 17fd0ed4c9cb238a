"""Typed events the engine emits about the expert cache, one per decode token and MoE layer.
Sinks (JSONL file, summary table, dashboard) consume them; the engine never formats output."""

from dataclasses import asdict, dataclass


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
