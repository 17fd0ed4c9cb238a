"""Decode speed of each prefetch strategy, side by side, from one shared context (`lowmoe bench`).

The context (the prompt's KV cache) is built once, by an engine holding every expert, and saved
in a cache folder keyed by the model and the prompt ids, so later benches skip the prefill. Each
run then decodes from it with a new engine: a cold expert cache, and cold reads (the packed store
reads with O_DIRECT; the files of the slow tier are also dropped from the page cache first).
Strategies run interleaved (A B C A B C ...), so drift in the machine's speed hits each alike
(see `schedule`).

Strategies: `none` holds every expert (the ceiling without offload), `reactive` reads on demand,
`oracle` hints the true routing recorded in an untimed first run (the ceiling of prediction at the
same lookahead), the others are the predictors of `predict/`.
"""

import glob
import hashlib
import os
import statistics
import threading
import time
import zipfile

import numpy as np

from ..engine import Context, Engine
from ..errors import InputError, LowmoeError
from ..load.gguf import split_files
from ..predict.oracle import Oracle, Recorder
from ..tier.slots import aligned_empty
from ..tier.store import is_packed

STRATEGIES = ("none", "reactive", "nextgate", "learned", "pregate", "history", "oracle")
PROMPT_FILE = "bench_prompt.txt"  # default context text, when the model folder has one
TEXT_FILE = "bench_text.txt"  # default text decoded along after the context, when the model folder has one


def context_ids(engine, prompt_file, n, what="the context"):
    """The first n token ids of `prompt_file`; without a file, n ids drawn with a fixed seed."""
    if prompt_file is None:
        return np.random.default_rng(0).integers(1, engine.config.vocab_size, n).tolist()
    try:
        with open(prompt_file, encoding="utf-8") as f:
            ids = engine.encode(f.read())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{prompt_file}: cannot read the text ({e})") from None
    if len(ids) < n:
        raise InputError(f"{prompt_file}: {len(ids)} tokens, fewer than {what} of {n}")
    return ids[:n]


def _context_key(engine, ids):
    """Hash of what the KV cache depends on: the model's files (names, sizes, times), the KV dtype
    and the ids."""
    h = hashlib.sha256(f"{os.path.realpath(engine.model_dir)}:{engine.options.kv_dtype}".encode())
    files = split_files(engine.model_dir) if engine.model_dir.endswith(".gguf") else glob.glob(os.path.join(engine.model_dir, "*"))
    for path in sorted(files):
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(np.asarray(ids, np.int64).tobytes())
    return h.hexdigest()[:24]


def _host(a):
    """A NumPy copy of a KV slice, from host or GPU memory (CuPy's get)."""
    return a.get() if hasattr(a, "get") else np.array(a)


def load_context(engine, ids, room, cache_dir, progress=None):
    """The Context of `ids` with KV room for `room` tokens: from `cache_dir` when saved there by
    an earlier bench, else prefilled (vram.PREFILL_CHUNK tokens at a time) and saved; a saved file
    without some array the model needs (a linear-attention layer's state) is built again.
    -> (context, loaded)."""
    cfg = engine.config
    path = None if cache_dir is None else os.path.join(cache_dir, f"context-{_context_key(engine, ids)}.npz")
    if path is not None and os.path.isfile(path):
        kv = engine.kv_cache(len(ids) + room)  # on the engine's device
        try:
            with np.load(path) as saved:
                for i in range(cfg.num_layers):
                    if kv.k[i] is not None:
                        k, v = saved[f"k{i}"], saved[f"v{i}"]
                        if k.dtype != kv.k[i].dtype or v.dtype != kv.v[i].dtype:
                            raise ValueError("saved in another KV dtype")
                        kv.k[i][:, : len(ids)] = kv.xp.asarray(k)
                        kv.v[i][:, : len(ids)] = kv.xp.asarray(v)
                recurrent = [(kv.xp.asarray(saved[f"conv{j}"]), kv.xp.asarray(saved[f"ssm{j}"]))
                             for j in range(len(kv.recurrent()))]
                kv.restore(recurrent)
                return Context(kv, saved["logits"], len(ids), recurrent), True
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable or not what it should be: built again below and overwritten
    context = engine.prefill(ids, room, progress=progress)
    if path is not None:
        arrays = {"logits": context.logits}
        for i in range(cfg.num_layers):
            if context.kv.k[i] is not None:
                arrays[f"k{i}"] = _host(context.kv.k[i][:, : len(ids)])
                arrays[f"v{i}"] = _host(context.kv.v[i][:, : len(ids)])
        for j, (conv, ssm) in enumerate(context.recurrent):  # the linear-attention layers' state
            arrays[f"conv{j}"], arrays[f"ssm{j}"] = _host(conv), _host(ssm)
        try:
            os.makedirs(cache_dir, exist_ok=True)
            np.savez(path + ".tmp.npz", **arrays)  # written whole, then renamed: never half a file
            os.replace(path + ".tmp.npz", path)
        except OSError as e:
            raise InputError(f"{cache_dir}: cannot save the context there ({e.strerror}); "
                             "give another --context-cache DIR, or none") from None
    return context, False


def expert_files(model_dir):
    """The files the slow tier reads experts from."""
    if model_dir.endswith(".gguf"):
        return split_files(model_dir)
    if is_packed(model_dir):
        return [os.path.join(model_dir, "experts.bin")]
    return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


def drop_page_cache(paths):
    """Asks the kernel to drop the files' cached pages, so that buffered reads start cold."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(path, block, seconds=2.0, threads=1):
    """GB/s of `threads` readers reading `block`-byte pieces of `path` at random aligned offsets
    with O_DIRECT (buffered where refused): the slow tier's speed as the engine's readers see it."""
    pieces = max(1, os.path.getsize(path) // block)
    done = [0] * threads

    def reader(i):
        buf = aligned_empty(block)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd = os.open(path, os.O_RDONLY)
        rng = np.random.default_rng(i)
        try:
            while time.perf_counter() - t0 < seconds:
                done[i] += os.preadv(fd, [memoryview(buf)], int(rng.integers(pieces)) * block)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    pool = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(done) / (time.perf_counter() - t0) / 1e9


class Bench:
    """Runs strategies from one context. `options`: engine options for the offloaded runs
    (expert_cache, storage, readers, lookahead; on the GPU device, cpu_moe False and miss_policy)."""

    def __init__(self, model_dir, context, resident, new_tokens, options, forced=None):
        self.model_dir = model_dir
        self.context = context
        # Engine of the reference run: every expert held (and then the `none` runs), or with
        # `lowmoe bench --no-resident` a reactive cache (then no `none` runs)
        self.resident = resident
        self.new_tokens = new_tokens
        self.options = options
        self.forced = forced  # token ids each decode step takes instead of the greedy choice (real text)
        recorder = Recorder(resident.config)
        resident.model.predictor = recorder  # untimed first run: reference tokens, logits and true routing
        self.reference = self._output(resident, {})
        resident.model.predictor = None
        self.routes = recorder.routes
        self.files = expert_files(model_dir)
        self.block = resident.model.experts.layout.block

    def run(self, strategy):
        """One decode of `new_tokens` -> its stats (decode_tok_s, stall_s, bytes_read, ...)."""
        if strategy == "none":
            return self._decode(self.resident)
        predictor = "none" if strategy in ("reactive", "oracle") else strategy
        drop_page_cache(self.files)
        disk = read_bandwidth(max(self.files, key=os.path.getsize), self.block, seconds=1.0)  # this run's disk
        with Engine.from_pretrained(self.model_dir, predictor=predictor, **self.options) as engine:
            if strategy == "oracle":
                engine.model.predictor = Oracle(engine.config, self.routes, engine.options.lookahead)
            return dict(self._decode(engine), disk_gb_s=disk)

    def _output(self, engine, stats):
        """(tokens, digest of the logits when forced) of one decode from the context."""
        tokens = list(engine.stream_from(self.context, self.new_tokens, stop_at_eos=False, stats=stats, forced=self.forced))
        return tokens, stats.get("logits_sha256")

    def _decode(self, engine):
        stats = {}
        if self._output(engine, stats) != self.reference:
            raise LowmoeError(f"{self.model_dir}: decoded tokens or logits differ from the reference run's "
                              "(prediction and caching must never change output): a bug, please report it")
        stats["decode_tok_s"] = stats["decode_tokens"] / stats["decode_s"]
        return stats


def schedule(names, repeats):
    """The order of the runs: [(strategy, repeat)], repeat None for an untimed run. Every `none`
    run comes first (it reads nothing), then one untimed offloaded run, then the offloaded
    strategies interleaved, A B C A B C ... On this VM an offloaded run that came after seconds
    without disk reads (a `none` run, or a pause) decoded up to 2x slower whatever its strategy,
    even after a second of reads; placed this way, no timed run follows such a gap."""
    order = [("none", r) for r in range(repeats)] if "none" in names else []
    offloaded = [n for n in names if n != "none"]
    if offloaded:
        order.append((offloaded[0], None))
        order += [(n, r) for r in range(repeats) for n in offloaded]
    return order


def _per(stats, total, count):
    """Median over runs of 1000 * stats[total] / stats[count], or None where nothing was counted."""
    values = [1e3 * s[total] / s[count] for s in stats if s.get(count)]
    return statistics.median(values) if values else None


def summarize(runs):
    """{strategy: [stats of each run]} -> {strategy: the JSON fields of `lowmoe bench`}."""
    out = {}
    for name, stats in runs.items():
        tok_s = [s["decode_tok_s"] for s in stats]
        row = {
            "decode_tok_s": statistics.median(tok_s),
            "stall_fraction": statistics.median(s.get("stall_s", 0.0) / s["decode_s"] for s in stats),
            "topk_recall": None if name in ("none", "reactive") else stats[0]["topk_recall"],
            "early_topk_recall": None if name in ("none", "reactive") else stats[0].get("early_topk_recall"),
            "topk_recall_per_layer": None if name in ("none", "reactive") else
            [layer["topk_recall"] for layer in stats[0].get("per_layer", [])],
            "prefetch_hit_rate": stats[0].get("prefetch_hit_rate", 0.0),
            "cache_hit_rate": stats[0].get("cache_hit_rate", 1.0),
            "bytes_per_token": statistics.median(s.get("bytes_read", 0) / s["decode_tokens"] for s in stats),
            "disk_gb_s": statistics.median(s["disk_gb_s"] for s in stats) if "disk_gb_s" in stats[0] else None,
            # per read: queued before a reader took it, in the read itself; per blocked wait: the
            # decode thread's wake-up after the read finished (ms; None without reads)
            "read_queue_ms": _per(stats, "read_queue_s", "reads"),
            "read_fill_ms": _per(stats, "read_fill_s", "reads"),
            "read_wake_ms": _per(stats, "read_wake_s", "read_wakes"),
            "runs": tok_s,
        }
        out[name] = row
    base = out.get("reactive", {}).get("decode_tok_s")
    for row in out.values():
        row["ratio_to_reactive"] = row["decode_tok_s"] / base if base else None
    return out


def check_strategies(names, model_dir, has_learned, has_heads):
    """Validates the --strategies list; a predictor the model lacks is a one-line error."""
    for name in names:
        if name not in STRATEGIES:
            raise InputError(f"strategy {name!r}: expected some of {', '.join(STRATEGIES)}")
        if name == "learned" and not has_learned:
            raise InputError(f"strategy 'learned': {model_dir} has no moe_predictor.safetensors; "
                             f"run `lowmoe train-predictor {model_dir}` or leave it out")
        if name == "pregate" and not has_heads:
            raise InputError(f"strategy 'pregate': {model_dir} has no pre-gate heads; leave it out")
    if len(set(names)) != len(names):
        raise InputError(f"strategies repeat a name: {','.join(names)}")
