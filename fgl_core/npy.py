"""Reading a `.npy` header without trusting it: the payload codec and the dataset loader both
take arrays from bytes that someone else wrote."""

from __future__ import annotations

import math
from typing import BinaryIO

import numpy as np

HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def read_npy_header(stream: BinaryIO, size: int) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the `.npy` buffer of `size` bytes that `stream` starts,
    leaving `stream` at the data. Raise ValueError (or EOFError) for another format version, a
    dtype holding Python objects, or a declared shape that does not account for exactly the
    bytes after the header, so nothing is ever allocated for a size the bytes do not back."""
    version = np.lib.format.read_magic(stream)
    read_header = HEADER_READERS.get(version)
    if read_header is None:
        raise ValueError(f"npy format version {version} is not supported")
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("it holds Python objects, which are never unpickled")
    declared, body = math.prod(shape) * dtype.itemsize, size - stream.tell()
    if declared != body:
        raise ValueError(
            f"its header declares shape {shape} ({declared} bytes) but it holds {body}"
        )
    return shape, fortran, dtype
