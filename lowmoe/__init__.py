"""lowmoe: decode mixture-of-experts models whose experts do not fit in fast memory."""

from .engine import DEFAULT_MODEL, Engine, Generation
from .errors import CheckpointError, ConfigError, DeviceError, InputError, LowmoeError, StorageError

__all__ = ["Engine", "Generation", "DEFAULT_MODEL", "LowmoeError", "ConfigError", "CheckpointError", "InputError", "StorageError",
           "DeviceError"]
