"""The precision record as a type: what results files write under ``precision``, unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bdpruning.numerics.precision import PrecisionRecord, precision_context, precision_record


@pytest.mark.parametrize("tf32", [False, True])
def test_the_record_writes_the_json_of_the_context_and_reads_it_back(tf32):
    with precision_context(tf32) as inside:
        record = PrecisionRecord.current()
    assert record.to_json() == inside == precision_record(tf32) == PrecisionRecord.current(tf32).to_json()
    assert list(inside)[0] == "tf32" and list(inside)[-2:] == ["api", "torch"]  # the files' key order
    assert PrecisionRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert dict(record.operations)["cuda_matmul"] == ("tf32" if tf32 else "ieee")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.tf32 = not tf32
