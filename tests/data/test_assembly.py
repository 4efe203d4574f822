"""Tests for putting slices back into volumes."""

import pytest
import torch

from lightning_fedseg.data.assembly import SliceAssembler


def _slice(case, z):
    """A [1, 2, 2] slice whose values encode its case and z."""
    return torch.full((1, 2, 2), float(case * 100 + z))


def test_assembler_with_interleaved_cases_and_odd_batch_boundaries():
    # Case 0 has 4 slices, case 1 has 5, case 2 has 1; slices arrive interleaved and out of
    # order, in batches of 3 that cut across cases.
    stream = [(1, 4), (0, 2), (1, 0), (0, 0), (2, 0), (1, 3), (0, 3), (1, 1), (0, 1), (1, 2)]
    num_slices = {0: 4, 1: 5, 2: 1}
    assembler = SliceAssembler()
    done = []
    for start in range(0, len(stream), 3):
        chunk = stream[start : start + 3]
        volumes = assembler.add(
            [f"case{c}" for c, _ in chunk],
            torch.tensor([z for _, z in chunk]),
            torch.tensor([num_slices[c] for c, _ in chunk]),
            pred=torch.stack([_slice(c, z) for c, z in chunk]),
            target=torch.stack([_slice(c, z) > 100 for c, z in chunk]),
        )
        done.extend((start, v) for v in volumes)
    assert [(start, v.case_id) for start, v in done] == [(3, "case2"), (6, "case0"), (9, "case1")]
    assert len(assembler) == 0 and assembler.pending == []
    for _, volume in done:
        case = int(volume.case_id[-1])
        z = list(range(num_slices[case]))
        assert volume.slice_index.tolist() == z
        assert volume.tensors["pred"].shape == (1, 2, 2, len(z))
        assert volume.tensors["pred"][0, 0, 0].tolist() == [case * 100 + i for i in z]
        assert volume.tensors["target"].dtype == torch.bool


def test_assembler_keeps_incomplete_cases_pending_and_resets():
    assembler = SliceAssembler()
    assert assembler.add(["a", "a"], [0, 2], [3, 3], pred=torch.zeros(2, 1, 2, 2)) == []
    assert assembler.pending == ["a"]
    assembler.reset()
    assert len(assembler) == 0


def test_assembler_rejects_inconsistent_input():
    assembler = SliceAssembler()
    assembler.add(["a"], [0], [2], pred=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="Slice 0 of case 'a' arrived twice"):
        assembler.add(["a"], [0], [2], pred=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="announced with 2 slices"):
        assembler.add(["a"], [1], [3], pred=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"`pred` to have one entry per slice \(2\)"):
        assembler.add(["b", "b"], [0, 1], [2, 2], pred=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="num_slices"):
        assembler.add(["c"], [0], [0], pred=torch.zeros(1, 1, 2, 2))
