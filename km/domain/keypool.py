"""Link key pools: the QKD key material a KM shares with the KM at the other end of a link.

Material arrives in blocks (the keys drawn from the QKD module, each with the module's key
ID). A link has two pools per KM, one per direction:

* the *outgoing* pool holds blocks this KM drew from its module end as master SAE; only this
  KM ever chooses from it, handing out byte spans in order;
* the *incoming* pool holds the peer's outgoing blocks; this KM consumes exactly the spans
  the peer names, and each byte at most once.

Because each direction has a single chooser, both ends can never pick the same key, and a
span named twice (a replay, a bug) is refused rather than used again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from vqkd.km.domain.errors import InsufficientKey


class SpanError(Exception):
    """A peer named material that does not exist or was already used; nothing was consumed."""


@dataclass(frozen=True, slots=True)
class Span:
    block_id: str
    offset: int
    length: int


class OutgoingPool:
    def __init__(self) -> None:
        self._blocks: deque[tuple[str, bytes]] = deque()
        self._head_offset = 0  # bytes of the first block already handed out
        self._available = 0  # bytes

    @property
    def available_bits(self) -> int:
        return self._available * 8

    def add(self, blocks: list[tuple[str, bytes]]) -> None:
        for block_id, data in blocks:
            if data:
                self._blocks.append((block_id, data))
                self._available += len(data)

    def take(self, nbytes: int) -> tuple[bytes, list[Span]]:
        """Remove ``nbytes`` of material: its bytes and the spans that name it for the peer."""
        if nbytes <= 0:
            raise ValueError(f"take needs a positive byte count, got {nbytes}")
        if nbytes > self._available:
            raise InsufficientKey(f"{nbytes * 8} bits requested, {self._available * 8} available")
        parts: list[bytes] = []
        spans: list[Span] = []
        need = nbytes
        while need:
            block_id, data = self._blocks[0]
            start = self._head_offset
            n = min(need, len(data) - start)
            parts.append(data[start:start + n])
            spans.append(Span(block_id, start, n))
            need -= n
            if start + n == len(data):
                self._blocks.popleft()
                self._head_offset = 0
            else:
                self._head_offset = start + n
        self._available -= nbytes
        return b"".join(parts), spans

    def clear(self) -> int:
        """Forget every block; returns the bits dropped."""
        dropped = self._available * 8
        self._blocks.clear()
        self._head_offset = 0
        self._available = 0
        return dropped


class _IncomingBlock:
    __slots__ = ("data", "used", "remaining")

    def __init__(self, data: bytes):
        self.data = data
        self.used = 0  # bitmask over the block's bytes
        self.remaining = len(data)


class IncomingPool:
    def __init__(self) -> None:
        self._blocks: dict[str, _IncomingBlock] = {}
        self._available = 0

    @property
    def available_bits(self) -> int:
        return self._available * 8

    def add(self, blocks: list[tuple[str, bytes]]) -> None:
        for block_id, data in blocks:
            if block_id in self._blocks:
                raise SpanError(f"block {block_id} is already in the pool")
        for block_id, data in blocks:
            if data:
                self._blocks[block_id] = _IncomingBlock(data)
                self._available += len(data)

    def holds(self, block_id: str) -> bool:
        return block_id in self._blocks

    def bits_of(self, block_ids: list[str]) -> int:
        """Unused bits of the named blocks held here."""
        blocks = self._blocks
        return 8 * sum(blocks[block_id].remaining for block_id in block_ids if block_id in blocks)

    def discard(self, block_ids: list[str]) -> int:
        """Drop whole blocks the peer will never name (it gave them up); returns the bits dropped."""
        dropped = 0
        for block_id in block_ids:
            block = self._blocks.pop(block_id, None)
            if block is not None:
                dropped += block.remaining
                self._available -= block.remaining
        return dropped * 8

    def consume(self, spans: list[Span]) -> bytes:
        """The bytes the spans name, marked used; all or nothing."""
        masks: dict[str, int] = {}
        for span in spans:
            block = self._blocks.get(span.block_id)
            if block is None:
                raise SpanError(f"block {span.block_id} is not in the pool (never shared or fully used)")
            if span.length <= 0 or span.offset < 0 or span.offset + span.length > len(block.data):
                raise SpanError(
                    f"span {span.offset}+{span.length} lies outside block {span.block_id} "
                    f"of {len(block.data)} bytes"
                )
            mask = ((1 << span.length) - 1) << span.offset
            taken = block.used | masks.get(span.block_id, 0)
            if taken & mask:
                raise SpanError(f"span {span.offset}+{span.length} of block {span.block_id} was already used")
            masks[span.block_id] = masks.get(span.block_id, 0) | mask
        parts = []
        for span in spans:
            block = self._blocks[span.block_id]
            parts.append(block.data[span.offset:span.offset + span.length])
            block.used |= ((1 << span.length) - 1) << span.offset
            block.remaining -= span.length
            self._available -= span.length
            if block.remaining == 0:
                del self._blocks[span.block_id]
        return b"".join(parts)

    def clear(self) -> int:
        dropped = self._available * 8
        self._blocks.clear()
        self._available = 0
        return dropped
