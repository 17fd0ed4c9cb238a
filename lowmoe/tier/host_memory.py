"""Host memory: what a model costs with every expert resident, what this process may still use, and
its peak resident set (`lowmoe bench` decides with the first two whether its all-resident reference
run fits, and reports the third).

Linux's /proc and the memory cgroup (v1 `memory.limit_in_bytes`, v2 `memory.max`) answer; elsewhere
available_bytes() is None (nothing is known to be short).
"""

import os
import resource


def weight_bytes(ckpt, cfg, layout, packed):
    """(dense bytes, routed expert bytes) of a model as stored: `ckpt` and `cfg` from
    load.model.open_model, `layout` the store's ExpertLayout; a packed folder's checkpoint holds
    only the dense tensors."""
    experts = cfg.num_experts * sum(layout.of(layer).nbytes for layer in cfg.moe_layers)
    total = sum(t.nbytes for t in ckpt.tensors.values()) + (experts if packed else 0)
    return total - experts, experts


def _cgroup_room():
    """limit - usage of this process's memory cgroup (bytes), or None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):  # v1
            base, limit_file, usage_file = "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        elif controllers == "":  # v2, the unified hierarchy
            base, limit_file, usage_file = "/sys/fs/cgroup", "memory.max", "memory.current"
        else:
            continue
        try:
            with open(os.path.join(base + path, limit_file)) as f:
                limit = f.read().strip()
            with open(os.path.join(base + path, usage_file)) as f:
                usage = int(f.read())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 1 << 60:  # v1 writes "no limit" as a huge number
            return int(limit) - usage
    return None


def available_bytes():
    """Bytes this process can still take: MemAvailable, or less where its memory cgroup leaves less
    (usage there counts page cache the kernel could reclaim, so this errs on the short side)."""
    room = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    room = int(line.split()[1]) * 1024
    except OSError:
        pass
    cgroup = _cgroup_room()
    if cgroup is not None:
        room = cgroup if room is None else min(room, cgroup)
    return room


def reset_peak():
    """Starts a new peak resident set (VmHWM) where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes():
    """The peak resident set of this process since it started or since reset_peak (VmHWM; without
    /proc, getrusage's high-water mark)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
