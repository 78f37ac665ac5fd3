"""A GGUF header reader that keeps metadata as plain Python values (the streamed load's reader).

`gguf.GGUFReader` keeps every element of every metadata array as its own numpy view of the file (a token
string is two views: its length and its bytes). For SmolLM2's 49,152 tokens and 48,900 merges that is
~200,000 numpy objects: measured +168 MiB resident just to open the 94 MiB file, more than the weights a
budget of a third of the file keeps. `LeanGGUFReader` decodes the header once into lists of str / int /
float (a few MiB) and describes tensors exactly as `GGUFReader` does (`gguf.ReaderTensor`: the same
name, type, shape, byte counts and a numpy view of the same memory map), so the rest of the loader reads
either reader the same way. Only the parts kiln reads are provided: `fields[key].contents()`, `tensors`,
`data`.

Format (GGUF v2/v3, little-endian): magic, u32 version, u64 tensor count, u64 key/value count, the
key/values (u64-length strings, a u32 value type, the value), the tensor infos (name, u32 dims count, u64
dims innermost first, u32 type, u64 offset from the data start), padding to `general.alignment` (default
32), then the tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types → (struct format, size) for scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
_SIGNED_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class LeanField:
    """One metadata value, already decoded."""

    name: str
    value: Any

    def contents(self) -> Any:
        return self.value


class LeanGGUFReader:
    """See the module docstring. Raises ValueError on a malformed header (open_gguf turns it into a
    ModelLoadError)."""

    def __init__(self, path: Path | str) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
        from gguf.quants import quant_shape_to_byte_shape

        # copy-on-write (MAP_PRIVATE): tensor views are writable, so torch takes them without a copy (a
        # read-only map would need one per tensor); nothing writes them, and the file never changes
        self.data = np.memmap(path, mode="c")
        buf = memoryview(self.data)
        self._buf, self._pos = buf, 0
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file")
        self._pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (kiln reads 2 and 3, little-endian)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        # the library reader's pseudo-fields, so either reader answers the same keys
        self.fields: dict[str, LeanField] = {k: LeanField(k, v) for k, v in (
            ("GGUF.version", version), ("GGUF.tensor_count", n_tensors), ("GGUF.kv_count", n_kv))}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = LeanField(key, self._value(self._scalar(4)))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar(10) for _ in range(self._scalar(4))]
            infos.append((name, dims, self._scalar(4), self._scalar(10)))
        alignment = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = (self._pos + alignment - 1) // alignment * alignment
        self.tensors = []
        names: set[str] = set()
        for name, dims, raw_type, offset in infos:
            if name in names:
                raise ValueError(f"duplicated tensor {name!r}")
            names.add(name)
            qtype = GGMLQuantizationType(raw_type)
            n_elems = int(np.prod(dims)) if dims else 1
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = n_elems * type_size // block_size
            shape = tuple(reversed(dims))
            item = _SIGNED_TYPES.get(qtype.name)
            if item is None:
                item, shape = np.uint8, quant_shape_to_byte_shape(shape, qtype)
            begin = start + offset
            if begin + n_bytes > len(self.data):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            data = self.data[begin:begin + n_bytes].view(item).reshape(shape)
            self.tensors.append(ReaderTensor(name, qtype, np.array(dims, dtype=np.uint64), n_elems, n_bytes, begin,
                                             data, None))
        self._buf = None  # a memoryview pins the mapping; the tensors' views keep it alive instead

    def _scalar(self, vtype: int) -> Any:
        fmt, size = _SCALARS[vtype]
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._scalar(10)
        text = str(self._buf[self._pos:self._pos + n], "utf-8")
        self._pos += n
        return text

    def _value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            sub, count = self._scalar(4), self._scalar(10)
            if sub == STRING:
                return [self._string() for _ in range(count)]
            if sub == ARRAY:
                return [self._value(ARRAY) for _ in range(count)]  # each element an array value of its own
            dtype = np.dtype(_NUMPY[sub])
            values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos).tolist()
            self._pos += dtype.itemsize * count
            return values
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self._scalar(vtype)
