"""A file-backed home for weights that do not fit the memory budget: tensors live in a shared mapping.

`SpillFile` creates an anonymous (unlinked) file in a directory, sizes it for every tensor it will hold,
maps it shared and read-write, and hands out tensors that are views of the mapping. Loading writes the
weights straight into file-backed pages, so the kernel can write them back and evict them like any
page cache; nothing of a spilled tensor stays in anonymous memory.

Invariants:
- every region starts on a page boundary and covers whole pages, so `advise_*` on one region never
  touches another's pages;
- tensors handed out keep pointing at the same addresses for the life of the `SpillFile` (the mapping is
  never remapped or closed while the model lives), so kernels and cached plans may hold their pointers;
- dropping a region's pages (`release`) never loses data: the mapping is shared, so the bytes stay in the
  page cache or are read back from the file on the next touch.

The file is unlinked right after it is created: it vanishes with the process, even on a crash.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import queue
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = 22  # Linux 5.14+: fault the pages in (page tables included), not just read them ahead
TENSOR_ALIGN = 64  # SIMD loads in the kernels want at least cache-line alignment


def _round_up(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


@dataclass(frozen=True)
class Region:
    """A page-aligned byte range of the spill file holding one group of tensors (one decoder layer)."""

    offset: int
    length: int


class SpillLayout:
    """Plans offsets before the file exists: regions (page-aligned) made of tensors (64-byte aligned)."""

    def __init__(self) -> None:
        self.size = 0
        self._open: int | None = None

    def begin_region(self) -> None:
        self.size = _round_up(self.size, PAGE)
        self._open = self.size

    def add(self, nbytes: int) -> int:
        """Reserve `nbytes` in the open region; returns their offset."""
        if self._open is None:
            raise RuntimeError("begin_region() first")
        offset = _round_up(self.size, TENSOR_ALIGN)
        self.size = offset + nbytes
        return offset

    def end_region(self) -> Region:
        if self._open is None:
            raise RuntimeError("no open region")
        end = _round_up(self.size, PAGE)
        region = Region(self._open, end - self._open)
        self.size, self._open = end, None
        return region


class SpillFile:
    """The mapped file (see the module docstring). `size` bytes, zero-filled until written."""

    def __init__(self, size: int, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="weights-", suffix=".spill", dir=directory)
        try:
            os.unlink(name)  # the open descriptor and the mapping keep the data alive
            os.ftruncate(fd, max(size, PAGE))
            # reserve the blocks now: a sparse file on a full disk would fail later, inside a page fault, as
            # a SIGBUS that kills the process; posix_fallocate fails here with ENOSPC instead
            os.posix_fallocate(fd, 0, max(size, PAGE))
            self._map = mmap.mmap(fd, max(size, PAGE), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        weakref.finalize(self, os.close, fd)  # the mapping holds its own descriptor; the file dies with both
        self.size = size
        self.directory = directory
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._prefetcher: _Prefetcher | None = None

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape`/`dtype` viewing the file at `offset` (aligned by `SpillLayout.add`)."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        count = 1
        for s in shape:
            count *= s
        return self._bytes[offset:offset + count * itemsize].view(dtype).view(shape)

    def flush(self, region: Region | None = None) -> None:
        """Write dirty pages (of `region`, or all) back to the file, so that page-cache eviction can drop them."""
        if region is None:
            self._map.flush()
        else:
            self._map.flush(region.offset, region.length)

    def prefetch(self, region: Region) -> None:
        """Have `region` faulted in by a background thread (returns at once; the pages arrive while the
        caller computes) unless the page cache already holds all of it. The thread calls libc's madvise
        through ctypes, which releases the GIL.

        Why the page-cache check: with the file cached, touching a page costs a minor fault only, and on a
        2-core machine the prefetch thread then competes with the compute threads (measured with the
        default model, warm cache: 62 tok/s with an unconditional prefetch vs 73 without; with the check the
        two are level). With a cold cache this machine's disk is the bound, and read-ahead one layer deep
        measured level with none (benchmarks/weight_offload.py has both rows).
        """
        if self._prefetcher is None:
            self._prefetcher = _Prefetcher(self._bytes.data_ptr())
        if not self._prefetcher.cached(region):
            self._prefetcher.submit(region)

    def release(self, region: Region, drop_page_cache: bool = False) -> None:
        """Unmap `region`'s pages from this process (its resident set shrinks; the data stays in the file).

        `drop_page_cache` also evicts them from the page cache, so the next touch reads the disk: what a
        machine whose memory cannot hold the weights sees (the cold-cache measurement)."""
        if self._prefetcher is not None:
            with self._prefetcher.lock:  # no queued prefetch may fault the region back in after this
                self._prefetcher.forget(region)
                self._map.madvise(mmap.MADV_DONTNEED, region.offset, region.length)
        else:
            self._map.madvise(mmap.MADV_DONTNEED, region.offset, region.length)
        if drop_page_cache:
            os.posix_fadvise(self._fd, region.offset, region.length, os.POSIX_FADV_DONTNEED)

    def resident_bytes(self) -> int:
        """Bytes of the mapping now in this process's resident set (from /proc/self/smaps)."""
        start = self._bytes.data_ptr()
        return mapping_rss(start)


class _Prefetcher:
    """One daemon thread that faults regions in (MADV_POPULATE_READ; MADV_WILLNEED where the kernel is older)."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self.libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        self.advice = MADV_POPULATE_READ
        self.jobs: queue.SimpleQueue[Region] = queue.SimpleQueue()
        self.wanted: set[Region] = set()  # submitted and not released since
        self.lock = threading.Lock()  # a prefetch's check-then-fault against a release
        threading.Thread(target=self._run, name="kiln-weight-prefetch", daemon=True).start()

    def submit(self, region: Region) -> None:
        self.wanted.add(region)
        self.jobs.put(region)

    def forget(self, region: Region) -> None:
        """`region` was released: a queued prefetch of it must not fault it back in."""
        self.wanted.discard(region)

    def cached(self, region: Region) -> bool:
        """Whether the page cache holds `region`, judged by its first and last page (mincore over the
        whole region costs ~60 µs per 2 MiB; regions are evicted and read back whole, so the ends tell)."""
        vec = (ctypes.c_ubyte * 1)()
        for offset in (region.offset, region.offset + region.length - PAGE):
            if self.libc.mincore(self.base + offset, PAGE, vec) != 0 or not vec[0] & 1:
                return False
        return True

    def _run(self) -> None:
        while True:
            region = self.jobs.get()
            with self.lock:
                if region not in self.wanted:
                    continue  # released before its turn came (the layer ran without waiting for it)
                failed = self.libc.madvise(self.base + region.offset, region.length, self.advice) != 0
            if failed and ctypes.get_errno() == errno.EINVAL:
                self.advice = mmap.MADV_WILLNEED  # a kernel before 5.14: read ahead instead


def mapping_rss(start_address: int) -> int:
    """Rss of the mapping that contains `start_address`, per /proc/self/smaps (0 if not found)."""
    return smaps_bytes(start_address, "Rss")


def smaps_bytes(address: int, field: str) -> int:
    """A byte count (`Rss`, `AnonHugePages`, ...) of the mapping containing `address`, from /proc/self/smaps
    (0 where the file, the mapping or the field is missing)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    inside = False
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0
