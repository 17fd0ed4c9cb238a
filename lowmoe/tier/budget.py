"""The expert cache budget: parsing `"1.5GiB"`, `"300MB"`, `"25%"`, `"min"`, and planning slots.

Memory of the fast tier = (cache slots + staging slots) * slot bytes; nothing else is allocated
per expert (reads land in slots). Staging slots hold prefetched experts until the gating decides.
"""

import re
from dataclasses import dataclass

from ..errors import InputError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*$")


@dataclass(frozen=True)
class CachePlan:
    slots: int  # cache slots
    staging: int  # staging slots for prefetches
    slot_bytes: int
    experts: int  # routed experts of the model (MoE layers x experts per layer)

    @property
    def nbytes(self):
        return (self.slots + self.staging) * self.slot_bytes

    @property
    def fraction(self):
        """Fraction of all routed experts the cache slots can hold."""
        return self.slots / self.experts

    def describe(self):
        return {"cache_slots": self.slots, "staging_slots": self.staging, "slot_bytes": self.slot_bytes,
                "cache_bytes": self.nbytes, "fraction_cached": self.fraction}


def fmt_bytes(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def parse_bytes(spec, what):
    """Bytes of "12GiB", "300MB", "123456" (units up to TiB, decimal and binary); InputError naming `what`."""
    m = _SIZE.match(str(spec).strip().lower())
    if not m or m.group(2) not in _UNITS:
        raise InputError(f"{what} {spec!r}: expected bytes with an optional unit, e.g. 12GiB, 8000MB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def plan_cache(spec, cfg, slot_bytes, staging=None):
    """CachePlan for a budget spec (str: bytes with unit, "N%", or "min").

    Percentages count cache slots as a share of all routed experts; staging slots come on top.
    Byte budgets cover cache and staging slots together. Either way the cache never gets more
    slots than there are experts, and needs at least top_k slots (one layer's experts at once).
    """
    experts = len(cfg.moe_layers) * cfg.num_experts
    staging = cfg.top_k if staging is None else staging
    least = cfg.top_k
    text = str(spec).strip().lower()
    if text == "min":
        slots = least
    elif text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise InputError(f"expert cache budget {spec!r}: expected bytes (e.g. 1.5GiB), a percentage, or 'min'") from None
        if not 0 < pct <= 100:
            raise InputError(f"expert cache budget {spec!r}: a percentage must be in (0, 100]")
        slots = -(-int(round(pct * experts * 1000)) // 100000)  # ceil(pct% of experts)
    else:
        m = _SIZE.match(text)
        if not m or m.group(2) not in _UNITS:
            raise InputError(f"expert cache budget {spec!r}: expected bytes (e.g. 1.5GiB, 300MB), a percentage (25%), or 'min'")
        slots = int(float(m.group(1)) * _UNITS[m.group(2)]) // slot_bytes - staging
    if slots < least:
        minimum = (least + staging) * slot_bytes
        raise InputError(
            f"expert cache budget {spec!r} is too small: the minimum is {fmt_bytes(minimum)} ({minimum} bytes: "
            f"{least} slots for one layer's experts plus {staging} staging slots of {slot_bytes} bytes)"
        )
    return CachePlan(slots=min(slots, experts), staging=staging, slot_bytes=slot_bytes, experts=experts)
