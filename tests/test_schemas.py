"""Shard schemas: building, validation, top-k precision and the tensor read path.

    .venv/bin/python -m pytest tests/test_schemas.py -q
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from shared import schemas
from shared.pipeline import STAGES

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151_936


def prompt_columns(n: int = 3) -> dict:
    return {
        "sample_id": [f"s{i}" for i in range(n)],
        "step": [7] * n,
        "problem": [f"problem {i}" for i in range(n)],
        "answer": [None] + ["42"] * (n - 1),
        "prompt_ids": [[1, 2, 3]] * n,
        "dataset": ["gsm8k"] * n,
        "index": list(range(n)),
    }


def rollout_columns(lengths: list[int]) -> dict:
    n = len(lengths)
    return {
        **prompt_columns(n),
        "response_ids": [list(range(m)) for m in lengths],
        "response_text": ["x" * m for m in lengths],
        "finish_reason": ["stop"] * n,
        "policy_version": [6] * n,
        "gen_logprobs": [[-0.5] * m for m in lengths],
    }


def scored_columns(lengths: list[int], k: int = 8, seed: int = 0, mask: list[int] | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    topk_lengths = [m if (mask is None or mask[i]) else 0 for i, m in enumerate(lengths)]
    total = sum(topk_lengths)
    ids = torch.randint(0, VOCAB, (total, k), generator=g)
    lps = -torch.rand(total, k, generator=g) * 30
    ids_arr, lps_arr = schemas.topk_to_arrow(ids, lps, topk_lengths)
    cols = {
        **rollout_columns(lengths),
        "teacher_topk_ids": ids_arr,
        "teacher_topk_logprobs": lps_arr,
        "sample_mask": mask or [1] * len(lengths),
        "teacher_model": ["Qwen/Qwen3-14B"] * len(lengths),
        "alignment_offset": [2] * len(lengths),
    }
    return cols, ids, lps


def ipc_roundtrip(table: pa.Table) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return pa.ipc.open_file(pa.BufferReader(sink.getvalue())).read_all()


# ------------------------------------------------------------------------- building


@pytest.mark.parametrize("stage", STAGES)
def test_build_table_has_versioned_schema(stage):
    cols = {"prompts": prompt_columns(), "rollouts": rollout_columns([2, 0, 5])}.get(stage) or scored_columns([2, 0, 5])[0]
    table = schemas.build_table(stage, cols)
    assert table.num_rows == 3
    meta = table.schema.metadata
    assert meta[b"sluice.schema_version"] == str(schemas.SCHEMA_VERSION).encode()
    assert meta[b"sluice.stage"] == stage.encode()
    k = schemas.check_schema(ipc_roundtrip(table).schema, stage)
    assert k == (8 if stage == "scored" else None)
    if stage == "scored":  # optional context-distillation columns default to null
        assert table.column("teacher_prompt_ids").null_count == 3
        assert table.column("trace_found").null_count == 3


def test_missing_column_is_named():
    cols = prompt_columns()
    del cols["prompt_ids"]
    with pytest.raises(ValueError, match="missing required column 'prompt_ids'"):
        schemas.build_table("prompts", cols)
    cols, _, _ = scored_columns([3])
    del cols["teacher_model"]
    with pytest.raises(ValueError, match="missing required column 'teacher_model'"):
        schemas.build_table("scored", cols)


def test_unknown_column_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['promt'\]; valid columns: sample_id"):
        schemas.build_table("prompts", {**prompt_columns(), "promt": ["a"] * 3})


def test_null_in_required_column_names_row():
    cols = prompt_columns()
    cols["dataset"] = ["a", None, "c"]
    with pytest.raises(ValueError, match="column 'dataset' is null at row 1"):
        schemas.build_table("prompts", cols)


def test_rows_input_and_nullable_answer():
    rows = [dict(zip(prompt_columns(2), vals)) for vals in zip(*prompt_columns(2).values())]
    del rows[0]["answer"]  # absent key = null for a nullable column
    table = schemas.build_table("prompts", rows)
    assert table.column("answer").to_pylist() == [None, "42"]
    del rows[1]["problem"]
    with pytest.raises(ValueError, match="'problem' is null at row 1"):
        schemas.build_table("prompts", rows)


def test_bad_type_names_column():
    cols = prompt_columns()
    cols["step"] = ["seven"] * 3
    with pytest.raises(ValueError, match="column 'step': cannot convert to int64"):
        schemas.build_table("prompts", cols)


def test_rollout_lengths_must_match():
    cols = rollout_columns([2, 3])
    cols["gen_logprobs"] = [[-0.1, -0.2], [-0.1]]
    with pytest.raises(ValueError, match="row 1: gen_logprobs has 1 values for 3 response tokens"):
        schemas.build_table("rollouts", cols)


def test_topk_tokens_must_match_response_unless_dropped():
    cols, _, _ = scored_columns([4, 3], mask=[1, 0])  # dropped row 1: empty top-k is fine
    table = schemas.build_table("scored", cols)
    assert schemas.topk_from_arrow(table).offsets.tolist() == [0, 4, 4]
    cols, _, _ = scored_columns([4, 3], mask=[1, 0])
    cols["sample_mask"] = [1, 1]  # a used row without top-k is a teacher bug
    with pytest.raises(ValueError, match="row 1: teacher_topk_ids has 0 tokens for 3 response tokens"):
        schemas.build_table("scored", cols)


# --------------------------------------------------------------------------- top-k


def test_topk_roundtrip_precision_and_floor():
    g = torch.Generator().manual_seed(1)
    total, k = 5000, 64
    ids = torch.randint(0, VOCAB, (total, k), generator=g)
    ids[0, :3] = torch.tensor([0, VOCAB - 1, 2**31 - 1])
    lps = -torch.rand(total, k, generator=g, dtype=torch.float64) * 30
    lps[1, :4] = torch.tensor([-float("inf"), -1e6, -70000.0, -0.0])
    lps[2, :3] = torch.tensor([-1e-7, -3e-5, -1e-3])  # subnormal and small normals
    ids_arr, lps_arr = schemas.topk_to_arrow(ids, lps, [2500, 0, 2500])
    table = pa.table({"teacher_topk_ids": ids_arr, "teacher_topk_logprobs": lps_arr})
    out = schemas.topk_from_arrow(ipc_roundtrip(table))
    assert out.ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32
    assert torch.equal(out.ids, ids)  # ids exactly
    expected = lps.clamp(min=schemas.LOGPROB_FLOOR)
    err = (out.logprobs.double() - expected).abs()
    # The documented bound: 2**-11 relative for normal float16, 2**-25 absolute below.
    assert torch.all(err <= 2**-11 * expected.abs() + 2**-25), err.max()
    assert out.logprobs[1, :3].tolist() == [schemas.LOGPROB_FLOOR] * 3
    in_range = (expected >= -30) & (expected <= -1e-4)
    assert ((err / expected.abs())[in_range]).max() < 1e-3
    assert out.offsets.tolist() == [0, 2500, 2500, 5000]


def test_topk_refuses_nan_and_bad_shapes():
    ids = torch.zeros(3, 4, dtype=torch.int64)
    lps = torch.zeros(3, 4)
    lps[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        schemas.topk_to_arrow(ids, lps, [3])
    with pytest.raises(ValueError, match="lengths sum to 2 tokens but the top-k tensors have 3 rows"):
        schemas.topk_to_arrow(ids, torch.zeros(3, 4), [2])
    with pytest.raises(ValueError, match=r"must both be \[total_tokens, k\]"):
        schemas.topk_to_arrow(ids, torch.zeros(3, 5), [3])
    with pytest.raises(ValueError, match="token ids"):
        schemas.topk_to_arrow(ids - 1, torch.zeros(3, 4), [3])
    with pytest.raises(ValueError, match="token ids"):
        schemas.topk_to_arrow(ids + 2**31, torch.zeros(3, 4), [3])
    with pytest.raises(ValueError, match="above 10000.0; log-probs are <= 0"):
        schemas.topk_to_arrow(ids, torch.full((3, 4), float("inf")), [3])


def test_float16_input_is_clamped_without_touching_the_callers_tensor():
    lps = torch.tensor([[-0.5, -float("inf")], [-65504.0, -3.0]], dtype=torch.float16)
    before = lps.clone()
    _, arr = schemas.topk_to_arrow(torch.zeros(2, 2, dtype=torch.int32), lps, [2])
    out = schemas.topk_from_arrow(pa.table({"teacher_topk_ids": _, "teacher_topk_logprobs": arr}))
    assert out.logprobs.tolist() == [[-0.5, schemas.LOGPROB_FLOOR], [schemas.LOGPROB_FLOOR, -3.0]]
    assert torch.equal(lps, before)


def test_topk_accepts_bf16_and_int32_inputs():
    ids = torch.randint(0, VOCAB, (10, 4), dtype=torch.int32)
    lps = (-torch.rand(10, 4) * 5).to(torch.bfloat16)
    ids_arr, lps_arr = schemas.topk_to_arrow(ids, lps, torch.tensor([4, 6]))
    out = schemas.topk_from_arrow(pa.table({"teacher_topk_ids": ids_arr, "teacher_topk_logprobs": lps_arr}))
    assert torch.equal(out.ids, ids.long())
    assert torch.allclose(out.logprobs, lps.float(), rtol=2**-10)


def test_tensor_read_path_handles_chunks_and_slices_without_copies():
    cols, ids, lps = scored_columns([5, 0, 7, 3], k=16, mask=[1, 0, 1, 1])
    table = ipc_roundtrip(schemas.build_table("scored", cols))
    # One chunk: int32 ids come back as a view of the Arrow buffer, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        view = schemas.topk_from_arrow(table, ids_dtype=torch.int32, logprobs_dtype=torch.float16)
        copy = schemas.topk_from_arrow(table)
    for name, tensor in [("teacher_topk_ids", view.ids), ("teacher_topk_logprobs", view.logprobs)]:
        buf = table.column(name).chunk(0).flatten().flatten().buffers()[1]
        assert buf.address <= tensor.data_ptr() < buf.address + buf.size, name
    assert view.ids.dtype == torch.int32 and view.logprobs.dtype == torch.float16
    assert torch.equal(view.ids.long(), ids) and torch.equal(view.logprobs.float(), copy.logprobs)
    copy.ids[0, 0] = 1  # the default tensors are fresh and writable
    # Several chunks and a sliced table: offsets follow the rows that are there.
    two = pa.concat_tables([table.slice(0, 2), table.slice(2)])
    assert two.column("teacher_topk_ids").num_chunks == 2
    out = schemas.topk_from_arrow(two)
    assert torch.equal(out.ids, ids) and out.offsets.tolist() == [0, 5, 5, 12, 15]
    tail = schemas.topk_from_arrow(table.slice(2, 2))
    assert torch.equal(tail.ids, ids[5:15]) and tail.offsets.tolist() == [0, 7, 10]
    assert torch.allclose(tail.logprobs, lps[5:15], rtol=2**-10)


def test_nested_python_lists_are_clamped_like_tensors():
    cols = rollout_columns([2])
    cols.update(
        teacher_topk_ids=[[[5, 6], [7, 8]]],
        teacher_topk_logprobs=[[[-0.25, float("-inf")], [-1.0, -2.0]]],
        sample_mask=[1],
        teacher_model=["t"],
        alignment_offset=[2],
        trace_found=[True],
        prefix_truncated=[False],
        teacher_prompt_ids=[[9, 9, 9]],
    )
    table = schemas.build_table("scored", cols)
    out = schemas.topk_from_arrow(table)
    assert out.ids.tolist() == [[5, 6], [7, 8]]
    assert out.logprobs.tolist() == [[-0.25, schemas.LOGPROB_FLOOR], [-1.0, -2.0]]


def test_scored_arrow_columns_below_floor_are_refused():
    cols, _, _ = scored_columns([2], k=2)
    raw = pa.array([[[-1.0, -float("inf")], [-1.0, -2.0]]], schemas.topk_logprobs_type(2))
    cols["teacher_topk_logprobs"] = raw
    with pytest.raises(ValueError, match="below the floor"):
        schemas.build_table("scored", cols)


def test_floor_boundaries_on_float16_bits():
    f16 = lambda *v: np.array(v, dtype=np.float16)  # noqa: E731
    assert not schemas._needs_clamp(f16(-1e4, 1e4, -0.0, 0.0, -6e-8, -65504 / 8), "x")
    assert schemas._needs_clamp(f16(-0.5, -10008.0), "x")  # the next float16 below the floor
    assert schemas._needs_clamp(f16(-float("inf")), "x")
    with pytest.raises(ValueError, match="above 10000.0"):
        schemas._needs_clamp(f16(-1.0, 10008.0), "x")
    with pytest.raises(ValueError, match="x hold NaN"):
        schemas._needs_clamp(f16(-1.0, -float("nan")), "x")
    with pytest.raises(ValueError, match="x hold NaN"):
        schemas._needs_clamp(f16(float("nan")), "x")


def test_ragged_from_arrow():
    table = schemas.build_table("rollouts", rollout_columns([3, 0, 2]))
    values, offsets = schemas.ragged_from_arrow(table.column("response_ids"), torch.int64)
    assert values.tolist() == [0, 1, 2, 0, 1] and offsets.tolist() == [0, 3, 3, 5]


def test_topk_entry_is_six_bytes_on_disk():
    total, k = 20_000, 64
    ids_arr, lps_arr = schemas.topk_to_arrow(
        np.random.default_rng(0).integers(0, VOCAB, (total, k)), -np.random.default_rng(1).random((total, k)) * 20, [total]
    )
    sink = pa.BufferOutputStream()
    table = pa.table({"teacher_topk_ids": ids_arr, "teacher_topk_logprobs": lps_arr})
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    assert sink.getvalue().size / (total * k) < 6.01


# -------------------------------------------------------------------------- checks


def test_check_schema_errors_name_source_and_fix():
    table = schemas.build_table("prompts", prompt_columns())
    meta = dict(table.schema.metadata)
    meta[b"sluice.schema_version"] = b"2"
    with pytest.raises(schemas.SchemaVersionError, match=r"x\.arrow: written with shard schema version 2.*launch.resubmit"):
        schemas.check_schema(table.schema.with_metadata(meta), "prompts", source="x.arrow")
    with pytest.raises(schemas.SchemaError, match="holds a prompts table where a rollouts shard belongs"):
        schemas.check_schema(table.schema, "rollouts", source="y.arrow")
    with pytest.raises(schemas.SchemaError, match="no sluice.schema_version"):
        schemas.check_schema(table.schema.remove_metadata(), "prompts")
    wrong = table.schema.set(5, pa.field("dataset", pa.int64(), nullable=False))
    with pytest.raises(schemas.SchemaError, match="column 'dataset' is int64 not null, expected string not null"):
        schemas.check_schema(wrong, "prompts")
    with pytest.raises(ValueError, match="valid stages: prompts, rollouts, scored"):
        schemas.check_schema(table.schema, "../prompts")


def test_schemas_and_queue_import_without_torch():
    code = "import sys, shared.schemas, shared.queue; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
