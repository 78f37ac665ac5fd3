"""Zero-copy reads of a .safetensors file for the streamed load: tensors as views of a private file mapping.

`safetensors.safe_open(...).get_tensor` returns an owned copy, read through the library's own mapping of the
file: loading an embedding that way holds its file pages, the copy and the model's tensor at once. The
streamed load (kiln.loader.streamed_load) instead copies straight from the file pages into the model's
tensor and drops the pages right after (`release`), so a tensor passes through memory once.

The format is the documented one: an 8-byte little-endian header length, a JSON header mapping each name to
its dtype, shape and [begin, end) byte offsets in the data section that follows (`__metadata__` aside).
Tests compare every tensor with `safe_open` on sharded and single files.

Invariants: a view stays valid while it is referenced (it keeps the mapping alive; `release` only drops
pages from the process, which the next touch reads back from the file); the mapping is private and
copy-on-write, so nothing is ever written to the file.
"""

from __future__ import annotations

import json
import mmap
import struct
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
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError, struct.error) as exc:
            raise ModelLoadError(path, f"corrupt or truncated safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self._data = 8 + header_len
        self._entries = header
        for name, e in header.items():
            begin, end = e["data_offsets"]
            if e["dtype"] not in _DTYPES:
                raise ModelLoadError(path, f"tensor {name!r} has dtype {e['dtype']}, which kiln does not read")
            if not 0 <= begin <= end <= size - self._data:
                raise ModelLoadError(path, f"tensor {name!r} lies outside the file (truncated?)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def tensor(self, name: str) -> torch.Tensor:
        """A read-only-by-contract view of `name` (copy it before writing to it)."""
        e = self._entries[name]
        begin, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        if count == 0:
            return torch.empty(e["shape"], dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._data + begin)
        return flat.view(e["shape"])

    def release(self, name: str) -> None:
        """Drop `name`'s file pages from this process (a neighbour sharing an edge page faults it back)."""
        begin, end = self._entries[name]["data_offsets"]
        start = (self._data + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        length = self._data + end - start
        if length > 0:
            try:
                self._map.madvise(mmap.MADV_DONTNEED, start, length)
            except (OSError, ValueError, AttributeError):  # no madvise here: the pages stay, nothing breaks
                pass
