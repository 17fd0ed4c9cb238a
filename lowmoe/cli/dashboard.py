"""Live view of a decode with an expert cache (`lowmoe decode --dashboard`): the streamed text,
tokens/s, cache occupancy, read bandwidth, and a row per MoE layer with recall and hit rates.
Fed by the engine's LayerEvents and the decoded text; renders with rich."""

import time

from ..trace import Summary, summary_table


class Dashboard:
    def __init__(self, engine):
        self.experts = engine.model.experts
        self.summary = Summary()
        self.text = ""
        self.tokens = 0
        self.t0 = time.perf_counter()

    def __call__(self, event):
        self.summary(event)

    def token(self, text):
        """The whole decoded text so far, after each new token."""
        self.text = text
        self.tokens += 1

    def render(self):
        from rich.console import Group
        from rich.panel import Panel

        seconds = max(time.perf_counter() - self.t0, 1e-9)
        cache, slots = len(self.experts.cache), self.experts.plan.slots
        line = (f"{self.tokens} tokens, {self.tokens / seconds:.1f} tok/s | cache {cache}/{slots} slots "
                f"({cache / slots:.0%}) | read {self.experts.reader.bytes_read / seconds / 1e6:.1f} MB/s")
        return Group(Panel(self.text[-2000:] or "...", title="text"), line, summary_table(self.summary.rows()))
