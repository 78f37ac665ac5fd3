"""`LoRAManager`: the adapters an engine holds, the slots they run from, and each forward's segments.

Lifecycle of an adapter: `add(name, path)` reads and checks it (kiln.lora.adapter) and gives it a
fresh id (never reused: the prefix cache salts blocks with it, so a reloaded adapter cannot hit the
old weights' KV). It runs only from a slot: `try_admit` (called by the scheduler before a waiting
request starts) puts it into a free slot, or evicts the least recently used resident adapter that
no admitted request holds; when every slot is held the request waits (`False`). `release` (on
preemption and finish) drops the hold. `remove(name)` refuses while a request still uses it.

Per forward the runner calls `begin_step` with each scheduled request's adapter id and row range
(rows grouped by adapter), which sets the segments every `LayerSlots` reads, and `end_step` after.
All of this runs on the engine thread (the one that does torch work); nothing here locks.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch import nn

from kiln.layers.linear import Linear
from kiln.lora.adapter import TARGET_MODULES, LoRAAdapter, LoRAError, load_adapter
from kiln.lora.slots import BatchSegments, LayerSlots, Segment

if TYPE_CHECKING:
    from kiln.request import Request

logger = logging.getLogger("kiln")
BASE = 0  # the lora id of a request that runs the base model


def adapted_layers(model: nn.Module) -> dict[str, Linear]:
    """kiln layer path → Linear for every layer a PEFT target module maps onto (q/k/v → qkv_proj, ...)."""
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})
    leaves = {packed.get(m, (m, None))[0] for m in TARGET_MODULES}
    return {path: module for path, module in model.named_modules()
            if isinstance(module, Linear) and path.startswith("layers.") and path.rpartition(".")[2] in leaves}


class LoRAManager:
    """Adapters by name, `max_loras` slots of rank ≤ `max_rank` on every adapted layer, LRU eviction."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int) -> None:
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"--max-loras ({max_loras}) and --max-lora-rank ({max_rank}) must be >= 1")
        if getattr(model, "tp_num_kv_heads", None):
            raise LoRAError("LoRA adapters do not run under tensor parallel yet; use --tensor-parallel-size 1")
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        self.batch = BatchSegments()
        self.slots: dict[str, LayerSlots] = {}
        for path, layer in adapted_layers(model).items():
            self.slots[path] = LayerSlots(layer, max_loras, max_rank, self.batch, model.dtype, model.device)
            layer.lora = self.slots[path]
        self.adapters: dict[str, tuple[int, LoRAAdapter]] = {}
        self.by_id: dict[int, LoRAAdapter] = {}
        self.resident: OrderedDict[int, int] = OrderedDict()  # lora id → slot, least recently used first
        self.free_slots = list(range(max_loras - 1, -1, -1))
        self.holds: dict[int, int] = {}  # lora id → admitted requests holding it
        self.holders: dict[str, int] = {}  # request id → lora id it holds
        self._ids = itertools.count(1)
        self.num_loads = 0  # adapter copies into a slot (a resident adapter admitted again costs none)

    # ---- the registry ------------------------------------------------------------------------
    def add(self, name: str, path: str) -> int:
        """Load the PEFT adapter at `path` under `name`; its id. LoRAError if it cannot serve here."""
        if not name or name in self.adapters:
            raise LoRAError(f"an adapter named {name!r} is already loaded; unload it first or pick another name"
                            if name else "an adapter needs a non-empty name")
        adapter = load_adapter(name, path, self.model, self.max_rank, self.model.dtype)
        lora_id = next(self._ids)
        self.adapters[name] = (lora_id, adapter)
        self.by_id[lora_id] = adapter
        logger.info("LoRA adapter %r loaded from %s (rank %d, %d layers, %.1f MiB)", name, path, adapter.rank,
                    len(adapter.layers), adapter.num_bytes() / (1 << 20))
        return lora_id

    def remove(self, name: str) -> None:
        """Forget adapter `name`; LoRAError if it is unknown or a request still uses it."""
        lora_id = self.id_of(name)
        if self.holds.get(lora_id):
            raise LoRAError(f"adapter {name!r} is in use by {self.holds[lora_id]} running request(s); "
                            "unload it when they finish")
        del self.adapters[name]
        del self.by_id[lora_id]
        slot = self.resident.pop(lora_id, None)
        if slot is not None:
            self.free_slots.append(slot)

    def id_of(self, name: str) -> int:
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise LoRAError(f"no LoRA adapter named {name!r} is loaded (loaded: {known})")
        return self.adapters[name][0]

    def names(self) -> list[str]:
        return list(self.adapters)

    def slot_bytes(self) -> int:
        """Memory of every slot buffer (what --max-loras × --max-lora-rank cost)."""
        return sum(s.num_bytes() for s in self.slots.values())

    # ---- slots (the scheduler's admission control) -------------------------------------------
    def try_admit(self, request: Request) -> bool:
        """Hold a slot with `request`'s adapter in it (loading it, evicting the LRU idle one if needed);
        False when every slot is held by admitted requests (the request waits). Base requests: True."""
        lora_id = request.lora_id
        if lora_id == BASE:
            return True
        if request.request_id in self.holders:
            return True
        if lora_id not in self.resident:
            slot = self._free_slot()
            if slot is None:
                return False
            self._load(lora_id, slot)
        self.resident.move_to_end(lora_id)
        self.holds[lora_id] = self.holds.get(lora_id, 0) + 1
        self.holders[request.request_id] = lora_id
        return True

    def release(self, request: Request) -> None:
        """`request` no longer runs (preempted or finished): drop its hold. Idempotent."""
        lora_id = self.holders.pop(request.request_id, None)
        if lora_id is not None:
            self.holds[lora_id] -= 1

    def _free_slot(self) -> int | None:
        if self.free_slots:
            return self.free_slots.pop()
        for lora_id, slot in self.resident.items():  # least recently used first
            if not self.holds.get(lora_id):
                del self.resident[lora_id]
                return slot
        return None

    def _load(self, lora_id: int, slot: int) -> None:
        adapter = self.by_id.get(lora_id)
        if adapter is None:  # unloaded while its request waited
            self.free_slots.append(slot)
            raise LoRAError(f"LoRA adapter id {lora_id} was unloaded")
        for path, layer_slots in self.slots.items():
            layer_slots.load(slot, adapter.layers.get(path))
        self.resident[lora_id] = slot
        self.num_loads += 1

    # ---- one forward -------------------------------------------------------------------------
    def begin_step(self, lora_ids: Sequence[int], row_starts: Sequence[int]) -> None:
        """Segments of the coming forward: item i runs adapter lora_ids[i] on rows
        [row_starts[i], row_starts[i + 1]). Every non-base adapter must be resident (admitted)."""
        segments: list[Segment] = []
        for i, lora_id in enumerate(lora_ids):
            if lora_id == BASE:
                continue
            start, end = row_starts[i], row_starts[i + 1]
            if segments and segments[-1].end == start and self.resident[lora_id] == segments[-1].slot:
                segments[-1] = Segment(segments[-1].slot, segments[-1].start, end, segments[-1].rank)
            else:
                segments.append(Segment(self.resident[lora_id], start, end, self.by_id[lora_id].rank))
        self._set(tuple(segments))

    def end_step(self) -> None:
        self._set(())

    def _set(self, segments: tuple[Segment, ...]) -> None:
        self.batch.segments = segments
        # the fused native decode step knows nothing of adapters: a batch with any takes the plain path
        self.model.lora_in_batch = bool(segments)

    @contextmanager
    def applied(self, name: str) -> Iterator[None]:
        """Run every forward inside the block (evaluation windows, `kiln lora merge`'s KL) with adapter
        `name` on all rows. Needs a free or idle slot."""
        holder = _Holder(f"__applied__{name}", self.id_of(name))
        if not self.try_admit(holder):  # type: ignore[arg-type]
            raise LoRAError("every adapter slot is held by running requests")
        try:
            self._set((Segment(self.resident[holder.lora_id], 0, None, self.by_id[holder.lora_id].rank),))
            yield
        finally:
            self.end_step()
            self.release(holder)  # type: ignore[arg-type]


class _Holder:
    """A stand-in request for `applied`."""

    def __init__(self, request_id: str, lora_id: int) -> None:
        self.request_id, self.lora_id = request_id, lora_id
