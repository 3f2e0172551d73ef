"""BlockManager: allocation, growth across block boundaries, refcounts, prefix hashing, no leaks."""
from __future__ import annotations

import torch

from engine import SamplingParams
from engine.kv_cache import BlockManager, KVCache, slots
from engine.sequence import Sequence


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence("s", list(tokens), SamplingParams())


def test_block_table_grows_across_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = seq_of(range(5))
    assert bm.allocate(seq, 5) and len(seq.block_table) == 2
    assert bm.allocate(seq, 8) and len(seq.block_table) == 2  # still fits
    assert bm.allocate(seq, 9) and len(seq.block_table) == 3
    assert bm.num_free_blocks == 5


def test_slots_follow_the_block_table():
    table = [5, 2, 7]
    assert slots(table, 0, 9, 4) == [20, 21, 22, 23, 8, 9, 10, 11, 28]
    assert slots(table, 3, 6, 4) == [23, 8, 9]  # a run that starts and ends inside blocks
    assert slots(table, 8, 9, 4) == [28]


def test_cache_writes_land_in_their_slots_of_every_layer():
    cache = KVCache(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                    device="cpu")
    kv = torch.arange(2 * 2 * 3 * 2, dtype=torch.float32).view(2, 2, 3, 1, 2)
    cache.write([5, 9, 2], kv)
    assert torch.equal(cache.k(1)[1, 1], kv[1, 0, 0]) and torch.equal(cache.v(0)[2, 1], kv[0, 1, 1])
    assert torch.equal(cache.read([5, 9, 2]), kv)
    cache.copy(torch.tensor([9, 2]), torch.tensor([0, 1]))
    assert torch.equal(cache.read([0, 1]), kv[:, :, 1:])
    assert torch.count_nonzero(cache.read([3, 4, 6])) == 0


def test_allocation_is_all_or_nothing_and_freeing_returns_everything():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq_of(range(8)), seq_of(range(8))
    assert bm.allocate(a, 8)
    assert not bm.allocate(b, 12)  # needs 3, only 2 free
    assert b.block_table == [] and bm.num_free_blocks == 2
    bm.free_sequence(a)
    assert bm.num_free_blocks == 4 and a.block_table == []


def test_prefix_blocks_are_shared_refcounted_and_evicted_lazily():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = seq_of(range(10))
    assert bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.register_full_blocks(a, cache_key=b"0", num_computed_before=0)

    b = seq_of(list(range(8)) + [50, 51])
    assert bm.match_prefix(b, cache_key=b"0") == 8  # two full blocks shared
    assert b.block_table == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    assert bm.match_prefix(seq_of(range(10)), cache_key=b"1") == 0  # another adapter: no hit

    bm.free_sequence(a)
    bm.free_sequence(b)
    assert bm.num_free_blocks == 6
    c = seq_of(range(9))  # the freed blocks still hold the prefix
    assert bm.match_prefix(c, cache_key=b"0") == 8
    bm.free_sequence(c)
    # reusing every block evicts the cached hashes
    d = seq_of(range(100, 124))
    assert bm.allocate(d, 24)
    assert bm.cached == {} and bm.match_prefix(seq_of(range(9)), cache_key=b"0") == 0


def test_block_hashes_are_a_sha256_chain():
    """A client who could make its prompt's block collide with another's would be served (or poison) that K/V:
    Python's hash() of token tuples is no cryptographic hash (vLLM's CVE-2025-25183); the chain is SHA-256."""
    import hashlib
    from array import array

    bm = BlockManager(num_blocks=4, block_size=4)
    seq = seq_of(range(9))
    first = hashlib.sha256(hashlib.sha256(b"gorgon-kv key").digest() + array("q", range(4)).tobytes()).digest()
    assert bm._hash_of_block(seq, 0, b"key") == first
    assert bm._hash_of_block(seq, 1, b"key") == hashlib.sha256(first + array("q", range(4, 8)).tobytes()).digest()


def test_the_last_prompt_token_is_never_served_from_cache():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq_of(range(8))
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.register_full_blocks(a, b"0", 0)
    assert bm.match_prefix(seq_of(range(8)), b"0") == 4


def test_truncate_releases_blocks_beyond_the_kept_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = seq_of(range(16))
    bm.allocate(seq, 16)
    bm.truncate(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
