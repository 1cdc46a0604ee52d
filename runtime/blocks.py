"""The paged KV cache's bookkeeping: a pool of fixed-size blocks with reference counts, per-sequence block tables,
and a prefix cache of full blocks found by a hash chain over their tokens (docs/RUNTIME.md, "The cache").

Plain Python with no device code: both backends hold the blocks' contents, this module decides which block holds
which positions. Block 0 is the null block: it is never handed out, so padded rows of a captured step can write
there harmlessly.

    >>> pool = BlockPool(num_blocks=64); table = BlockTable(pool); table.reserve(20); table.blocks
    [1, 2]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import xxhash

BLOCK_SIZE = 16  # tokens per block: a prefill attention tile (64 keys) is 4 blocks, a decode split is whole blocks
NULL_BLOCK = 0  # never allocated: padding rows write here


class OutOfBlocks(Exception):
    """The pool has no free block left (the scheduler preempts, or waits)."""


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The prefix hash of a full block: 128 bits over the previous block's hash and this block's token ids.

    >>> block_hash(None, range(16)) == block_hash(None, list(range(16)))
    True
    """
    seed = (parent or 0).to_bytes(16, "little")
    return xxhash.xxh3_128_intdigest(seed + np.asarray(tokens, np.int64).tobytes())


def prefix_hashes(tokens: Sequence[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """The hash chain of every full block of `tokens`, in order."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start:start + block_size])
        hashes.append(parent)
    return hashes


class BlockPool:
    """`num_blocks` blocks (block 0 reserved), reference-counted; freed full blocks stay findable until evicted.

    Free blocks wait in two queues: those holding nothing worth keeping, handed out first, and those holding a
    cached prefix block, handed out (evicted) least recently freed first.
    """

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks  # including the null block
        self.block_size = block_size  # tokens per block
        self.prefix_caching = prefix_caching  # full blocks are registered and looked up by hash
        self.refs = [0] * num_blocks  # holders of each block (sequences' tables)
        self._plain: list[int] = list(range(num_blocks - 1, 0, -1))  # free, nothing cached: a stack, low ids first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free but holding a cached block, LRU first
        self._hash_of: dict[int, int] = {}  # block → prefix hash, for registered (full) blocks
        self._by_hash: dict[int, int] = {}  # prefix hash → block
        self.queries = 0  # prefix blocks looked up …
        self.hits = 0  # … and found

    # ── counts ───────────────────────────────────────────────────────────────────────────────────────
    @property
    def capacity(self) -> int:
        """Blocks sequences can hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (cached-but-unused ones count: they are evicted on demand)."""
        return len(self._plain) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered full blocks, in use or not."""
        return len(self._by_hash)

    # ── allocation ───────────────────────────────────────────────────────────────────────────────────
    def allocate(self) -> int:
        """A free block with one reference; an unused cached block is evicted when nothing else is free."""
        if self._plain:
            block = self._plain.pop()
        elif self._cached_free:
            block, _ = self._cached_free.popitem(last=False)
            self._unregister(block)
        else:
            raise OutOfBlocks
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of `block` (a fork, or a prefix-cache hit reviving a freed block)."""
        if self.refs[block] == 0:
            self._cached_free.pop(block)  # only cached blocks can be revived: plain free blocks have no hash
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """One holder fewer; at zero the block is free (kept as a cached prefix block when registered)."""
        if self.refs[block] <= 0:
            raise ValueError(f"block {block} released more often than held")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._hash_of:
                self._cached_free[block] = None  # most recently freed: evicted last
            else:
                self._plain.append(block)

    # ── the prefix cache ─────────────────────────────────────────────────────────────────────────────
    def register(self, block: int, prefix_hash: int) -> None:
        """`block` is full and holds the tokens `prefix_hash` names; a block already registered for it stays."""
        if not self.prefix_caching or prefix_hash in self._by_hash or block in self._hash_of:
            return
        self._by_hash[prefix_hash] = block
        self._hash_of[block] = prefix_hash

    def forget(self, block: int) -> None:
        """`block`'s contents are about to change (a truncated sequence writes into it): no longer a cached prefix."""
        if block in self._hash_of:
            self._unregister(block)
            if self.refs[block] == 0:  # pragma: no cover - a free block is never written
                self._cached_free.pop(block)
                self._plain.append(block)

    def lookup(self, prefix_hash: int) -> int | None:
        """The block holding this prefix, shared (one more reference), or None."""
        self.queries += 1
        block = self._by_hash.get(prefix_hash)
        if block is None:
            return None
        self.hits += 1
        self.share(block)
        return block

    def is_registered(self, block: int) -> bool:
        return block in self._hash_of

    def _unregister(self, block: int) -> None:
        del self._by_hash[self._hash_of.pop(block)]


class BlockTable:
    """One sequence's blocks: position p lives in blocks[p // block_size] at offset p % block_size.

    `num_tokens` positions are reserved (their slots written by a step already scheduled, or about to be).
    """

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []  # block ids, in position order
        self.num_tokens = 0  # reserved positions
        self.registered = 0  # leading full blocks offered to the prefix cache
        self.hashes: list[int] = []  # the hash chain of those blocks

    def slot(self, position: int) -> int:
        """The cache slot (block·block_size + offset) of a reserved position."""
        size = self.pool.block_size
        return self.blocks[position // size] * size + position % size

    def blocks_needed(self, count: int) -> int:
        """New blocks `reserve(count)` would take (a copy-on-write of a shared last block counts as one)."""
        size = self.pool.block_size
        total = -(-(self.num_tokens + count) // size)
        extra = total - len(self.blocks)
        if self.num_tokens % size and self.pool.refs[self.blocks[-1]] > 1:
            extra += 1
        return extra

    def reserve(self, count: int) -> list[tuple[int, int]]:
        """Room for `count` more positions; returns the (source, destination) block copies the device must make first.

        A shared, partly filled last block is copied (copy-on-write) before a new position is written into it.
        Nothing changes when the pool runs out (OutOfBlocks).
        """
        if self.blocks_needed(count) > self.pool.num_free:
            raise OutOfBlocks
        copies: list[tuple[int, int]] = []
        size = self.pool.block_size
        if count and self.num_tokens % size and self.pool.refs[self.blocks[-1]] > 1:
            shared = self.blocks[-1]
            fresh = self.pool.allocate()
            copies.append((shared, fresh))
            self.pool.release(shared)
            self.blocks[-1] = fresh
        elif count and self.num_tokens % size:
            self.pool.forget(self.blocks[-1])  # its unfilled slots are about to be written
        self.num_tokens += count
        while len(self.blocks) * size < self.num_tokens:
            self.blocks.append(self.pool.allocate())
        return copies

    def fork(self) -> BlockTable:
        """A new table sharing every block (copy-on-write happens at the next write into a shared block)."""
        child = BlockTable(self.pool)
        for block in self.blocks:
            self.pool.share(block)
        child.blocks, child.num_tokens = list(self.blocks), self.num_tokens
        child.registered, child.hashes = self.registered, list(self.hashes)
        return child

    def truncate(self, count: int) -> None:
        """Roll back the last `count` positions (their blocks released; a last block left partial is no longer a
        cached prefix of this sequence)."""
        if not 0 <= count <= self.num_tokens:
            raise ValueError(f"cannot truncate {count} of {self.num_tokens} positions")
        self.num_tokens -= count
        size = self.pool.block_size
        keep = -(-self.num_tokens // size)
        for block in self.blocks[keep:]:
            self.pool.release(block)
        del self.blocks[keep:]
        full = self.num_tokens // size
        if self.registered > full:
            self.registered = full
            del self.hashes[full:]

    def adopt_prefix(self, tokens: Sequence[int]) -> int:
        """Start an empty table with the longest run of cached blocks matching `tokens`; the positions it covers.

        At most len(tokens) − 1 positions are adopted, so the last token is always computed (its logits are needed).
        """
        if self.blocks:
            raise ValueError("a prefix is adopted only by an empty table")
        limit = (len(tokens) - 1) // self.pool.block_size
        for prefix_hash in prefix_hashes(tokens[: limit * self.pool.block_size], self.pool.block_size):
            block = self.pool.lookup(prefix_hash)
            if block is None:
                break
            self.blocks.append(block)
            self.hashes.append(prefix_hash)
        self.registered = len(self.blocks)
        self.num_tokens = len(self.blocks) * self.pool.block_size
        return self.num_tokens

    def register_full(self, tokens: Sequence[int], computed: int) -> None:
        """Offer to the prefix cache every full block whose positions (< computed) hold the known `tokens`."""
        size = self.pool.block_size
        full = min(computed, len(tokens), self.num_tokens) // size
        while self.registered < full:
            i = self.registered
            parent = self.hashes[-1] if self.hashes else None
            prefix_hash = block_hash(parent, tokens[i * size:(i + 1) * size])
            self.hashes.append(prefix_hash)
            self.pool.register(self.blocks[i], prefix_hash)
            self.registered += 1

    def free(self) -> None:
        """Release every block (the table is empty afterwards)."""
        for block in self.blocks:
            self.pool.release(block)
        self.blocks, self.num_tokens, self.registered, self.hashes = [], 0, 0, []
