"""`StepTensors` is built complete and frozen: new values come from `dataclasses.replace`."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from moepost.recipes.step_tensors import StepTensors, tensors_for_step


def _tensors(**kwargs: bool) -> StepTensors:
    batch = SimpleNamespace(
        prompt_ids=[[5, 6, 7], [8]], completion_ids=[[9, 10], [11]], logprobs=torch.zeros(2, 2)
    )
    return tensors_for_step(batch, torch.tensor([1.0, -1.0]), 0, torch.device("cpu"), **kwargs)


def test_built_with_its_layout_flags() -> None:
    t = _tensors(packed=True, shared_prefix=True)
    assert (t.packed, t.shared_prefix, tuple(t.micro_batches)) == (True, True, ())
    assert t.old_logprobs is None and t.ref_logprobs is None
    assert t.num_rows == 2 and t.completion_ids.shape == (2, 2)


def test_frozen_replace_makes_a_new_value() -> None:
    t = _tensors()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.old_logprobs = torch.zeros(2, 2)  # type: ignore[misc]
    old = torch.full((2, 2), -1.0)
    u = dataclasses.replace(t, old_logprobs=old, micro_batches=(slice(0, 1), slice(1, 2)))
    assert t.old_logprobs is None and tuple(t.micro_batches) == ()
    assert u.old_logprobs is old and u.input_ids is t.input_ids
    assert list(u.micro_batches) == [slice(0, 1), slice(1, 2)]
