"""The caching allocator model against hand-worked allocation sequences, and the trace it
is fed against the memory replay.

Each sequence below is worked out by hand from the allocator's rules
(../shared/reference/cuda-allocator.md, from c10/cuda/CUDACachingAllocator.cpp): segment
counts, splits, reuse, merging, release-and-retry, out-of-memory, expandable segments.
"""

from __future__ import annotations

import pytest

from vitcost import allocator as A
from vitcost.api import make_model_spec
from vitcost.fit import allocator_stats, events
from vitcost.program import estimate_memory
from vitcost.specs import make_workload

MIB = 2**20


def run(seq, capacity=None, expandable=False):
    """``seq``: (key, bytes) with bytes 0 meaning free."""
    return A.run([k for k, _ in seq], [n for _, n in seq], capacity, expandable)


def test_request_and_segment_sizes():
    assert [A.round_size(n) for n in (1, 511, 512, 513, 1000)] == [512, 512, 512, 1024, 1024]
    assert A.segment_size(1 * MIB) == 2 * MIB  # small pool: 2 MiB segments
    assert A.segment_size(1 * MIB + 512) == 20 * MIB  # up to 10 MiB: 20 MiB segments
    assert A.segment_size(10 * MIB - 512) == 20 * MIB
    assert A.segment_size(10 * MIB) == 10 * MIB  # from 10 MiB: rounded up to 2 MiB
    assert A.segment_size(10 * MIB + MIB // 2) == 12 * MIB


def test_small_requests_share_one_2mib_segment():
    st = run([(1, 1000), (2, 1000), (3, 600_000)])
    assert (st.segments, st.reserved) == (1, 2 * MIB)
    assert st.allocated == 1024 + 1024 + A.round_size(600_000)


def test_a_5mib_tensor_takes_part_of_a_20mib_segment_and_the_rest_is_reused():
    st = run([(1, 5 * MIB), (2, 15 * MIB)])
    # 20 MiB segment split 5 + 15; the 15 MiB request finds the remainder: no second segment
    assert (st.segments, st.reserved, st.allocated) == (1, 20 * MIB, 20 * MIB)


def test_slack_up_to_1mib_is_handed_out_with_the_block():
    st = run([(1, 19 * MIB + MIB // 2)])
    # 20 MiB - 19.5 MiB = 0.5 MiB is not > 1 MiB: the whole block is handed out and counted
    assert (st.segments, st.allocated, st.requested) == (1, 20 * MIB, 19 * MIB + MIB // 2)


def test_best_fit_takes_the_smallest_block_that_is_large_enough():
    st = run([(1, 12 * MIB), (2, 30 * MIB), (1, 0), (2, 0), (3, 11 * MIB), (4, 29 * MIB)])
    # 11 MiB goes into the 12 MiB block (1 MiB left: not split), 29 MiB into the 30 MiB one
    assert (st.segments, st.reserved) == (2, 42 * MIB)
    assert st.allocated == 42 * MIB and st.requested == 40 * MIB


def test_freed_neighbours_merge_inside_a_segment():
    # one 20 MiB segment split 5 + 5 + 10; freeing the first two leaves one 10 MiB free block
    st = run([(1, 5 * MIB), (2, 5 * MIB), (3, 10 * MIB), (1, 0), (2, 0), (4, 10 * MIB)])
    assert (st.segments, st.reserved) == (1, 20 * MIB)


def test_segments_never_merge_with_each_other():
    st = run([(1, 12 * MIB), (2, 12 * MIB), (1, 0), (2, 0), (3, 20 * MIB)])
    # 24 MiB is cached in two free 12 MiB segments, but a 20 MiB tensor fits in neither
    assert (st.segments, st.reserved, st.peak_reserved) == (3, 44 * MIB, 44 * MIB)


def test_release_the_cache_and_retry_when_cudamalloc_fails():
    st = run([(1, 24 * MIB), (1, 0), (2, 30 * MIB)], capacity=40 * MIB)
    # 24 + 30 > 40: the entirely free 24 MiB segment is released and the 30 MiB one fits
    assert (st.releases, st.reserved, st.peak_reserved) == (1, 30 * MIB, 30 * MIB)


def test_free_space_in_a_segment_with_a_live_block_cannot_be_released():
    seq = [(1, 5 * MIB), (2, 5 * MIB), (1, 0), (3, 16 * MIB)]
    # the 20 MiB segment holds block 2: its 15 MiB of free space (5 + 10, not adjacent) is
    # no use to a 16 MiB tensor, nothing is entirely free to release, and 20 + 16 > 30
    with pytest.raises(A.OutOfMemory) as err:
        run(seq, capacity=30 * MIB)
    assert (err.value.reserved_bytes, err.value.allocated_bytes, err.value.request_bytes) == (20 * MIB, 5 * MIB, 16 * MIB)
    assert run(seq, capacity=36 * MIB).peak_reserved == 36 * MIB


def test_empty_cache_releases_only_entirely_free_segments():
    alloc = A.CachingAllocator()
    for key, n in [(1, 12 * MIB), (2, 5 * MIB), (3, 5 * MIB)]:
        alloc.malloc(key, n)
    alloc.free(1)
    alloc.free(2)
    alloc.empty_cache()
    assert alloc.stats.reserved == 20 * MIB  # the 20 MiB segment still holds block 3


def test_expandable_segments_grow_in_pages_and_reuse_the_tail():
    seq = [(1, 5 * MIB), (2, 30 * MIB), (1, 0), (2, 0), (3, 36 * MIB)]
    st = run(seq, expandable=True)
    # 5 + 30 MiB lie in pages 0-1 (40 MiB mapped); freed, they are one 35 MiB range at the
    # segment's end, which a 36 MiB tensor extends by 1 MiB, still inside page 1
    assert (st.reserved, st.peak_reserved) == (40 * MIB, 40 * MIB)
    native = run(seq)
    assert native.peak_reserved == 20 * MIB + 30 * MIB + 36 * MIB


def test_expandable_segments_unmap_free_pages_under_pressure():
    seq = [(1, 30 * MIB), (2, 10 * MIB), (1, 0), (3, 50 * MIB)]
    # 1 and 2 lie in pages 0-1 (40 MiB mapped); no free range holds 50 MiB, so the segment
    # grows from 40 to 90 MiB: pages 2-4, 100 MiB in all. Past the capacity, page 0 (only the
    # freed block 1 touched it) is unmapped: 80 MiB, which a capacity of 60 cannot hold
    with pytest.raises(A.OutOfMemory):
        run(seq, capacity=60 * MIB, expandable=True)
    st = run(seq, capacity=80 * MIB, expandable=True)
    assert (st.releases, st.reserved, st.peak_reserved) == (1, 80 * MIB, 80 * MIB)


# --- the trace against the replay ------------------------------------------------------------

TRACED = [
    ("vit-ti", dict(batch=8)),
    ("vit-ti", dict(batch=1, attention="eager")),
    ("vit-s", dict(batch=16, precision="amp-fp16", attention="eager-postscale", optimizer="sgd-momentum",
                   keep_grads=True)),
    ("vit-s", dict(batch=32, mode="infer", precision="amp-fp16", attention="eager")),
    ("vit-ti", dict(batch=4, checkpointing="full", precision="bf16")),
    ("deit_tiny_distilled_patch16_224", dict(batch=3, optimizer="adam")),
]


@pytest.mark.parametrize("model, workload", TRACED)
def test_the_allocators_tensor_peak_is_the_replays(model, workload):
    """Three steps through the allocator: the rounded requests alive at once peak exactly
    where the replay's step does (the first step is no higher)."""
    spec, _ = make_model_spec(model)
    wl = make_workload(**workload)
    st = allocator_stats(spec, wl)
    assert st.peak_requested == estimate_memory(spec, wl).peak
    assert st.peak_allocated >= st.peak_requested and st.peak_reserved >= st.peak_allocated


def test_events_at_any_batch_are_the_trace_at_that_batch():
    """Sizes read off the lines through batch 2 and 3 are what the replay writes at batch 11."""
    from vitcost.memory import trace

    spec, _ = make_model_spec("vit-ti")
    wl = make_workload(batch=11, precision="amp-fp16", attention="eager")
    for (keys, sizes), traced in zip(events(spec, wl, 11), trace(spec, wl)):
        assert list(keys) == [k for k, _ in traced] and sizes == [n for _, n in traced]


# --- properties on random sequences and configurations ------------------------------------------

from dataclasses import replace  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SIZES = st.one_of(st.integers(1, 2 * MIB), st.integers(MIB, 12 * MIB), st.integers(10 * MIB, 64 * MIB))


@st.composite
def sequences(draw):
    """Random allocations and frees; every tensor freed by the end."""
    live, seq, key = [], [], 0
    for _ in range(draw(st.integers(1, 60))):
        if live and draw(st.booleans()):
            seq.append((live.pop(draw(st.integers(0, len(live) - 1))), 0))
        else:
            seq.append((key, draw(SIZES)))
            live.append(key)
            key += 1
    return seq + [(k, 0) for k in live]


@settings(max_examples=150, deadline=None)
@given(seq=sequences(), expandable=st.booleans())
def test_allocator_invariants(seq, expandable):
    alloc = A.ExpandableAllocator() if expandable else A.CachingAllocator()
    for key, n in seq:
        alloc.run((key,), (n,))
        s = alloc.stats
        assert 0 <= s.requested <= s.allocated <= s.reserved
    s = replace(alloc.stats)  # a copy: empty_cache below changes the allocator's own
    assert s.allocated == s.requested == 0
    assert s.peak_requested <= s.peak_allocated <= s.peak_reserved
    if not expandable:
        # everything freed: every segment is one free block again, and empty_cache returns all
        assert all(len(blocks) == 1 and blocks[0] > 0 for blocks in alloc.signature())
        alloc.empty_cache()
        assert alloc.stats.reserved == 0
    # with the unbounded peak as the capacity nothing is ever released, and all is the same
    bounded = run(seq, capacity=s.peak_reserved, expandable=expandable)
    assert bounded.releases == 0 and bounded == s


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 3), dim_heads=st.sampled_from([(32, 1), (64, 2)]), mode=st.sampled_from(["train", "infer"]),
       precision=st.sampled_from(["fp32", "amp-bf16", "amp-fp16"]), attention=st.sampled_from(["sdpa", "eager"]),
       optimizer=st.sampled_from(["adamw", "sgd-momentum"]), mib=st.integers(8, 400))
def test_largest_batch_fits_and_one_more_does_not(depth, dim_heads, mode, precision, attention, optimizer, mib):
    from vitcost.estimate import max_batch_size
    from vitcost.fit import fits_allocator, max_batch_allocator

    dim, heads = dim_heads
    spec, _ = make_model_spec(None, dim=dim, depth=depth, heads=heads, mlp_hidden=4 * dim, image=64, patch=16,
                              classes=10)
    wl = make_workload(mode=mode, precision=precision, attention=attention, optimizer=optimizer)
    capacity = mib * MIB
    best = max_batch_allocator(spec, wl, capacity)
    assert best <= max_batch_size(spec, wl, capacity)  # the tensors alone bound it
    assert best == 0 or fits_allocator(spec, wl, capacity, batch=best)
    assert not fits_allocator(spec, wl, capacity, batch=best + 1)
