"""Backends: the operations of the decoder loop (model.py) for one device, the same names and
signatures in each. They import no model, expert-tier or engine code."""


def backend(device):
    """The backend module of `device`: backend.cpu, or backend.cuda once CuPy is known to be usable
    (a one-line DeviceError otherwise)."""
    if device == "cuda":
        from . import cuda

        cuda.cupy()
        return cuda
    from . import cpu

    return cpu
