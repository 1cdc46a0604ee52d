"""The block pool and block tables: reference counts, copy-on-write forks, truncation, the hash-chained prefix
cache and its LRU eviction, and a hypothesis state machine that checks the pool's books after every operation."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from olmoscope.runtime.blocks import BLOCK_SIZE, NULL_BLOCK, BlockPool, BlockTable, OutOfBlocks, prefix_hashes


def test_the_null_block_is_never_handed_out():
    pool = BlockPool(5)
    blocks = [pool.allocate() for _ in range(4)]
    assert NULL_BLOCK not in blocks and sorted(blocks) == [1, 2, 3, 4]
    with pytest.raises(OutOfBlocks):
        pool.allocate()


def test_reserve_maps_positions_to_slots_block_by_block():
    table = BlockTable(BlockPool(8))
    assert table.reserve(BLOCK_SIZE + 3) == []
    assert table.num_tokens == BLOCK_SIZE + 3 and len(table.blocks) == 2
    assert table.slot(0) == table.blocks[0] * BLOCK_SIZE
    assert table.slot(BLOCK_SIZE + 2) == table.blocks[1] * BLOCK_SIZE + 2


def test_a_reservation_that_does_not_fit_changes_nothing():
    pool = BlockPool(3)  # two usable blocks
    table = BlockTable(pool)
    table.reserve(BLOCK_SIZE)
    with pytest.raises(OutOfBlocks):
        table.reserve(2 * BLOCK_SIZE)
    assert (table.num_tokens, len(table.blocks), pool.num_free) == (BLOCK_SIZE, 1, 1)


def test_fork_shares_blocks_and_copies_the_partial_one_on_write():
    pool = BlockPool(16)
    parent = BlockTable(pool)
    parent.reserve(BLOCK_SIZE + 5)  # one full block, one partial
    child = parent.fork()
    assert child.blocks == parent.blocks and all(pool.refs[b] == 2 for b in parent.blocks)
    copies = child.reserve(1)
    assert copies == [(parent.blocks[1], child.blocks[1])] and child.blocks[0] == parent.blocks[0]
    assert pool.refs[parent.blocks[1]] == 1 and pool.refs[child.blocks[1]] == 1
    assert parent.reserve(1) == []  # the parent now owns its partial block alone: no copy


def test_a_full_shared_block_needs_no_copy():
    pool = BlockPool(16)
    parent = BlockTable(pool)
    parent.reserve(BLOCK_SIZE)
    child = parent.fork()
    assert child.reserve(1) == [] and child.blocks[0] == parent.blocks[0] and len(child.blocks) == 2


def test_truncate_releases_whole_blocks_beyond_the_new_end():
    pool = BlockPool(16)
    table = BlockTable(pool)
    table.reserve(3 * BLOCK_SIZE)
    kept = table.blocks[:2]
    table.truncate(BLOCK_SIZE + 4)
    assert table.blocks == kept and table.num_tokens == 2 * BLOCK_SIZE - 4 and pool.num_free == 15 - 2
    with pytest.raises(ValueError):
        table.truncate(table.num_tokens + 1)


def test_a_repeated_prefix_finds_the_registered_blocks():
    pool = BlockPool(32)
    tokens = list(range(3 * BLOCK_SIZE + 7))
    first = BlockTable(pool)
    first.reserve(len(tokens))
    first.register_full(tokens, computed=len(tokens))
    second = BlockTable(pool)
    adopted = second.adopt_prefix(tokens[: 2 * BLOCK_SIZE] + [999] * 20)
    assert adopted == 2 * BLOCK_SIZE and second.blocks == first.blocks[:2]
    assert pool.hits == 2 and all(pool.refs[b] == 2 for b in first.blocks[:2])


def test_a_prefix_never_adopts_the_last_token():
    pool = BlockPool(32)
    tokens = list(range(2 * BLOCK_SIZE))  # exactly two full blocks
    table = BlockTable(pool)
    table.reserve(len(tokens))
    table.register_full(tokens, computed=len(tokens))
    assert BlockTable(pool).adopt_prefix(tokens) == BLOCK_SIZE  # the second block would leave nothing to compute


def test_hashes_chain_over_the_whole_prefix():
    a = prefix_hashes([1] * BLOCK_SIZE + [2] * BLOCK_SIZE)
    b = prefix_hashes([3] * BLOCK_SIZE + [2] * BLOCK_SIZE)
    assert a[1] != b[1], "the same block after different prefixes must hash differently"


def test_blocks_not_yet_computed_are_not_registered():
    pool = BlockPool(32)
    tokens = list(range(2 * BLOCK_SIZE))
    table = BlockTable(pool)
    table.reserve(len(tokens))
    table.register_full(tokens, computed=BLOCK_SIZE + 3)
    assert pool.num_cached == 1


def test_freed_cached_blocks_are_reused_then_evicted_least_recently_freed_first():
    pool = BlockPool(4)  # three usable blocks
    old, new = BlockTable(pool), BlockTable(pool)
    old.reserve(BLOCK_SIZE)
    old.register_full(list(range(BLOCK_SIZE)), BLOCK_SIZE)
    new.reserve(BLOCK_SIZE)
    new.register_full(list(range(100, 100 + BLOCK_SIZE)), BLOCK_SIZE)
    old_block, new_block = old.blocks[0], new.blocks[0]
    old.free()
    new.free()
    plain = pool.allocate()  # the one block that never held a prefix goes first
    assert plain not in (old_block, new_block) and pool.num_cached == 2
    assert pool.allocate() == old_block and pool.num_cached == 1  # then the least recently freed
    revived = BlockTable(pool)
    assert revived.adopt_prefix(list(range(100, 100 + BLOCK_SIZE)) + [0]) == BLOCK_SIZE
    assert revived.blocks == [new_block] and pool.num_free == 0


def test_writing_after_a_truncate_forgets_the_block_it_overwrites():
    pool = BlockPool(8)
    tokens = list(range(BLOCK_SIZE))
    table = BlockTable(pool)
    table.reserve(BLOCK_SIZE)
    table.register_full(tokens, BLOCK_SIZE)
    table.truncate(4)
    assert pool.num_cached == 1  # still holds those tokens until something is written
    table.reserve(1)
    assert pool.num_cached == 0
    assert BlockTable(pool).adopt_prefix(tokens + [1]) == 0


class PoolMachine(RuleBasedStateMachine):
    """Random tables growing, forking, truncating, registering and freeing over one small pool."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(12)
        self.tables: list[tuple[BlockTable, list[int]]] = []  # each with the tokens it holds

    @rule(prompt=st.lists(st.integers(0, 3), min_size=1, max_size=40))
    def start(self, prompt):
        table = BlockTable(self.pool)
        table.adopt_prefix(prompt)
        try:
            table.reserve(len(prompt) - table.num_tokens)
        except OutOfBlocks:
            table.free()
            return
        self.tables.append((table, list(prompt)))

    @precondition(lambda self: self.tables)
    @rule(data=st.data(), count=st.integers(1, 20))
    def grow(self, data, count):
        table, tokens = data.draw(st.sampled_from(self.tables))
        try:
            table.reserve(count)
        except OutOfBlocks:
            return
        tokens.extend(data.draw(st.lists(st.integers(0, 3), min_size=count, max_size=count)))

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def fork(self, data):
        table, tokens = data.draw(st.sampled_from(self.tables))
        self.tables.append((table.fork(), list(tokens)))

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def truncate(self, data):
        table, tokens = data.draw(st.sampled_from(self.tables))
        count = data.draw(st.integers(0, table.num_tokens))
        table.truncate(count)
        del tokens[len(tokens) - count:]

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def register(self, data):
        table, tokens = data.draw(st.sampled_from(self.tables))
        table.register_full(tokens, table.num_tokens)

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def free(self, data):
        entry = data.draw(st.sampled_from(self.tables))
        entry[0].free()
        self.tables.remove(entry)

    @invariant()
    def books_balance(self):
        held = [0] * self.pool.num_blocks
        for table, tokens in self.tables:
            assert table.num_tokens == len(tokens)
            assert len(table.blocks) == -(-table.num_tokens // BLOCK_SIZE)
            for block in table.blocks:
                held[block] += 1
        assert held == self.pool.refs, "reference counts differ from the tables holding each block"
        assert self.pool.refs[NULL_BLOCK] == 0
        assert self.pool.num_free == sum(1 for b in range(1, self.pool.num_blocks) if held[b] == 0)

    @invariant()
    def a_registered_block_holds_its_tokens(self):
        """A registered block that a table holds full names, by its hash, exactly the prefix that table holds."""
        for table, tokens in self.tables:
            for i, prefix_hash in enumerate(prefix_hashes(tokens)):
                block = table.blocks[i]
                if self.pool.is_registered(block):
                    assert self.pool._hash_of[block] == prefix_hash, f"block {block} is cached under another prefix"


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
