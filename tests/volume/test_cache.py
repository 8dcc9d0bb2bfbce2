"""The block cache on its own (snapfs/volume/cache.py): its totals, its transitions, eviction
in LRU order, pinned blocks, and the checks of `assert_invariants`."""

import pytest

from snapfs.volume.cache import CacheSpace, VolumeCache
from snapfs.volume.catalog import VolumeRow
from snapfs.volume.files import BlockFile

BS = 4096


def volume(tmp_path, space: CacheSpace, vid: int, blocks: int = 8) -> VolumeCache:
    row = VolumeRow(vid, f"v{vid}", blocks * BS, BS, None, 0, 0, 0, 0.0, None)
    return VolumeCache(space, row, BlockFile(str(tmp_path / f"v{vid}"), blocks * BS))


def test_dirty_and_clean_move_between_the_totals(tmp_path):
    space = CacheSpace(size=6 * BS, dirty_fraction=0.5)
    a = volume(tmp_path, space, 1)
    a.fill(0, b"x" * BS)
    a.fill(1, None)  # a hole: cached as zeros
    assert (space.clean_bytes, space.dirty_bytes) == (2 * BS, 0)
    a.mark_written(0, epoch=0, gen=1, now=0.0, new=False)  # clean -> dirty
    assert (space.clean_bytes, space.dirty_bytes) == (BS, BS)
    assert a.present(0) and not a.cached_clean(0)
    a.mark_written(2, epoch=0, gen=2, now=0.0, new=True)
    assert space.dirty_room()  # 2 dirty blocks of the 3 that half the cache holds
    space.saves_changed(BS)  # a copy-on-write save takes room too
    assert not space.dirty_room()
    space.saves_changed(-BS)
    a.mark_clean(0, mapped=True)
    a.mark_clean(2, mapped=False)  # all zeros: a hole, punched, not cached
    assert (space.clean_bytes, space.dirty_bytes) == (2 * BS, 0)
    assert a.present(0) and not a.present(2)
    space.assert_invariants()


def test_eviction_takes_the_oldest_clean_blocks_but_never_a_pinned_one(tmp_path):
    space = CacheSpace(size=3 * BS, dirty_fraction=0.5)
    a, b = volume(tmp_path, space, 1), volume(tmp_path, space, 2)
    for blk in range(3):
        a.fill(blk, b"a" * BS)
    a.touch(0)  # block 0 is the youngest now
    with space.pinned(1, 1):
        b.fill(0, b"b" * BS)
        b.mark_written(1, epoch=0, gen=1, now=0.0, new=True)
        space.evict()  # 4 clean + 1 dirty in room for 3: two go, block 1 stays
        assert not a.present(2) and a.present(1) and not a.present(0)
        assert b.present(0)
    space.evict(limit=2 * BS)  # unpinned, it is the oldest: it goes first
    assert not a.present(1) and b.present(0)
    space.assert_invariants()
    space.evict(limit=0)
    assert space.clean_bytes == 0 and b.present(1)  # dirty blocks are never evicted


def test_a_closed_volume_takes_no_room(tmp_path):
    space = CacheSpace(size=64 * BS, dirty_fraction=0.5)
    a = volume(tmp_path, space, 1)
    a.fill(0, b"x" * BS)
    a.mark_written(1, epoch=0, gen=1, now=0.0, new=True)
    a.close()
    assert (space.clean_bytes, space.dirty_bytes) == (0, 0)
    assert space.volume_ids() == set()


def test_the_invariants_catch_a_total_that_drifted(tmp_path):
    space = CacheSpace(size=64 * BS, dirty_fraction=0.5)
    a = volume(tmp_path, space, 1)
    a.mark_written(1, epoch=0, gen=1, now=0.0, new=True)
    space.dirty_bytes += 1  # only a test writes a total from outside
    with pytest.raises(AssertionError, match="dirty bytes"):
        space.assert_invariants()
