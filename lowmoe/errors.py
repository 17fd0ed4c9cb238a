"""Typed errors. The CLI prints `str(error)` as one line and exits with status 2."""


class LowmoeError(Exception):
    """Base of every error lowmoe raises on bad input."""


class ConfigError(LowmoeError):
    """config.json is missing, unreadable, or describes something lowmoe cannot run."""


class CheckpointError(LowmoeError):
    """A safetensors file or index is missing, truncated, corrupt, or lacks a tensor."""


class InputError(LowmoeError):
    """Bad prompt or token ids, or bad options."""


class StorageError(LowmoeError):
    """Reading an expert from the slow tier failed twice or did not finish in time."""


class DeviceError(LowmoeError):
    """device='cuda' asked for and no usable GPU (no CuPy, no device, too little memory)."""
