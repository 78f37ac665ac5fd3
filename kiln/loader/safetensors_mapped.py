"""Zero-copy reads of a .safetensors file for the streamed load: tensors as views of a private file mapping.

`safetensors.safe_open(...).get_tensor` returns an owned copy, read through the library's own mapping of the
file: loading an embedding that way holds its file pages, the copy and the model's tensor at once. The
streamed load (kiln.loader.streamed_load) instead copies straight from the file pages into the model's
tensor and drops the pages right after (`release`), so a tensor passes through memory once.

The format is the documented one: an 8-byte little-endian header length, a JSON header mapping each name to
its dtype, shape and [begin, end) byte offsets in the data section that follows (`__metadata__` aside).
Tests compare every tensor with `safe_open` on sharded and single files.

Invariants: a view stays valid while it is referenced (it keeps the mapping alive; `release` only drops
pages from the process, which the next touch reads back from the file); the mapping is read-only, so
nothing is ever written to the file (a write through a view faults: callers copy). Every header entry is
checked at open (dtype, offsets inside the file, byte length = shape): a bad file is one ModelLoadError.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path

import torch

from kiln.errors import ModelLoadError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class MappedSafetensors:
    """One .safetensors file mapped for reading; `tensor(name)` is a view, `release(name)` drops its pages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                size = path.stat().st_size
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
                header = json.loads(f.read(header_len))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_len else None
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(path, f"corrupt or truncated safetensors file ({exc})") from None
        if not isinstance(header, dict):
            raise ModelLoadError(path, "corrupt safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        self._data = 8 + header_len
        self._entries = header
        for name, e in header.items():
            self._check(name, e, size - self._data)

    def _check(self, name: str, e: object, data_bytes: int) -> None:
        """Each entry: a known dtype, a shape, offsets inside the data whose length is the shape's bytes."""
        try:
            dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]  # type: ignore[index]
            ok = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ModelLoadError(self.path, f"corrupt safetensors file (bad header entry for {name!r})")
        if dtype not in _DTYPES:
            raise ModelLoadError(self.path, f"tensor {name!r} has dtype {dtype}, which kiln does not read")
        if not begin <= end <= data_bytes:
            raise ModelLoadError(self.path, f"tensor {name!r} lies outside the file (truncated?)")
        count = 1
        for dim in shape:
            count *= dim
        if end - begin != count * torch.empty(0, dtype=_DTYPES[dtype]).element_size():
            raise ModelLoadError(self.path, f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {dtype}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def tensor(self, name: str) -> torch.Tensor:
        """A view of `name` (read-only mapping: copy it before writing to it; it keeps the mapping alive)."""
        e = self._entries[name]
        begin, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        if end == begin:
            return torch.empty(e["shape"], dtype=dtype)  # no elements (a 0 in the shape: checked at open)
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        with warnings.catch_warnings():  # the mapping is read-only by design; torch warns about that
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._data + begin)
        return flat.view(e["shape"])

    def release(self, name: str) -> None:
        """Drop `name`'s file pages from this process (a neighbour sharing an edge page faults it back)."""
        begin, end = self._entries[name]["data_offsets"]
        if self._map is None or end == begin:
            return
        start = (self._data + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        length = self._data + end - start
        if length > 0:
            try:
                self._map.madvise(mmap.MADV_DONTNEED, start, length)
            except (OSError, ValueError, AttributeError):  # no madvise here: the pages stay, nothing breaks
                pass
