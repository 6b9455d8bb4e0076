"""The rank-aware loader: disjoint ranks, exact resume, and the same global order for any number of ranks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipeline.loader import DistributedBatchLoader, PackedSequences


def ids_per_step(loader: DistributedBatchLoader, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        out.append([i for a in range(loader.accum) for i in loader.sample_ids(a)])
        loader.next_step()
    return out


@pytest.fixture(scope="module")
def seqs(tiny_data):
    return PackedSequences(tiny_data, "train", 64)


def test_sequences_are_shifted_windows(seqs):
    a, b = seqs[0], seqs[1]
    assert len(a) == 65 and a[-1] == b[0]


def test_ranks_read_disjoint_parts_covering_the_global_batch(seqs):
    world = 2
    loaders = [DistributedBatchLoader(seqs, 2, 3, r, world, seed=1) for r in range(world)]
    for _ in range(3):
        got = [set(i for a in range(3) for i in ld.sample_ids(a)) for ld in loaders]
        assert not got[0] & got[1]
        assert len(got[0] | got[1]) == 12
        for ld in loaders:
            ld.next_step()


def test_global_order_does_not_depend_on_world_size(seqs):
    one = DistributedBatchLoader(seqs, 4, 2, 0, 1, seed=3)
    two = [DistributedBatchLoader(seqs, 2, 2, r, 2, seed=3) for r in range(2)]
    for _ in range(4):
        expected = set(i for a in range(2) for i in one.sample_ids(a))
        got = set(i for ld in two for a in range(2) for i in ld.sample_ids(a))
        assert got == expected
        one.next_step()
        for ld in two:
            ld.next_step()


def test_resume_repeats_and_skips_nothing(seqs):
    full = ids_per_step(DistributedBatchLoader(seqs, 2, 2, 0, 1, seed=5), 6)
    first = DistributedBatchLoader(seqs, 2, 2, 0, 1, seed=5)
    part1 = ids_per_step(first, 3)
    resumed = DistributedBatchLoader(seqs, 2, 2, 0, 1, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert part1 + ids_per_step(resumed, 3) == full


def test_resume_with_more_ranks_keeps_the_global_order(seqs):
    ref = DistributedBatchLoader(seqs, 4, 1, 0, 1, seed=7)
    ref_ids = ids_per_step(ref, 4)
    before = DistributedBatchLoader(seqs, 4, 1, 0, 1, seed=7)
    ids_per_step(before, 2)
    after = [DistributedBatchLoader(seqs, 2, 1, r, 2, seed=7) for r in range(2)]
    for ld in after:
        ld.load_state_dict(before.state_dict())
    for step in (2, 3):
        got = sorted(i for ld in after for i in ld.sample_ids(0))
        assert got == sorted(ref_ids[step])
        for ld in after:
            ld.next_step()


def test_changed_dataset_is_refused(seqs):
    ld = DistributedBatchLoader(seqs, 2, 1, 0, 1, seed=0)
    state = {**ld.state_dict(), "num_sequences": len(seqs) + 1}
    with pytest.raises(ValueError, match="resume with the same data"):
        ld.load_state_dict(state)


@settings(max_examples=25, deadline=None)
@given(
    world_before=st.sampled_from([1, 2, 4]),
    world_after=st.sampled_from([1, 2, 4]),
    stop=st.integers(0, 6),
    seed=st.integers(0, 3),
)
def test_resume_at_any_step_with_any_world_size_repeats_and_skips_nothing(seqs, world_before, world_after, stop, seed):
    """Record every sample id read by every rank, across a resume that changes the number of ranks."""
    global_micro, steps = 4, 8

    def loaders(world):
        return [DistributedBatchLoader(seqs, global_micro // world, 1, r, world, seed=seed) for r in range(world)]

    ref = loaders(1)[0]
    expected = [i for _ in range(steps) for i in (ref.sample_ids(0), ref.next_step())[0]]
    seen, ranks = [], loaders(world_before)
    for _ in range(stop):
        seen += [i for ld in ranks for i in ld.sample_ids(0)]
        for ld in ranks:
            ld.next_step()
    state = ranks[0].state_dict()
    ranks = loaders(world_after)
    for ld in ranks:
        ld.load_state_dict(state)
    for _ in range(steps - stop):
        seen += [i for ld in ranks for i in ld.sample_ids(0)]
        for ld in ranks:
            ld.next_step()
    assert seen == expected
