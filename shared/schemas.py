"""Arrow schemas of the shards in ``RUN_DIR/steps/<step>/<stage>/`` (DESIGN section 3).

    python -c "from shared import schemas; print(schemas.schema_for('scored', topk_k=64))"

Every shard is an Arrow IPC *file* (``pyarrow.ipc.new_file``) holding one table whose
schema is exactly ``schema_for(stage, topk_k)``. The schema metadata carries:

    sluice.schema_version   "1"   checked on every read; a mismatch raises SchemaVersionError
    sluice.stage            "prompts" | "rollouts" | "scored"
    sluice.topk_k           "64"  (scored only) k of the teacher top-k, fixed per shard
    sluice.logprob_floor    "-10000.0" (scored only) the clamp floor described below

Columns (``!`` = non-null, checked by ``build_table``; the rest may hold nulls):

    prompts   sample_id! string   unique in the run
              step!      int64
              problem!   string   original problem text
              answer     string   ground truth, null when the dataset has none
              prompt_ids! list<int32>   chat template applied
              dataset!   string
              index!     int64    row in the dataset
              static_trace string context distillation with trace_source=static_dataset:
                                  the dataset's trace text; else null
    rollouts  prompts' columns, then
              response_ids!   list<int32>
              response_text!  string
              finish_reason!  string   "stop" | "length" | ... as the engine reports it
              policy_version! int64    weights step that generated the response
              gen_logprobs!   list<float32>  sampled-token logprob, one per response token
    scored    rollouts' columns, then
              teacher_topk_ids!      list<fixed_size_list<int32, k>>
              teacher_topk_logprobs! list<fixed_size_list<float16, k>>
              sample_mask!       int8    0 = dropped sample (no loss), 1 = used
              teacher_model!     string  provenance: the teacher's model name
              alignment_offset!  int32   teacher position that predicts response token 0
                                         (len(teacher prompt) - 1)
              teacher_prompt_ids list<int32>  context distillation: the teacher's prompt;
                                         null = the teacher saw the student prompt
              trace_found        bool    context distillation only, else null
              prefix_truncated   bool    context distillation only, else null

Top-k layout. Row r holds one fixed-size list of k entries per *response* token (never for
prompt tokens), so the flattened children are contiguous ``[total_tokens, k]`` matrices:
int32 ids (4 bytes) + float16 log-probs (2 bytes) = 6 bytes per entry, uncompressed.
``topk_from_arrow`` turns them into torch tensors from numpy views of the Arrow buffers,
with no Python loop over rows or tokens: int64/float32 copies by default, or zero-copy
int32/float16 views to ship to a GPU as they are. A row's top-k has exactly
``len(response_ids)`` tokens, except a dropped row (``sample_mask == 0``) may have none
(the teacher did not score it).

Precision of the log-probs (float16, 10-bit mantissa, one rounding from the input): a value
x in [-1e4, -6.1e-5] round-trips with |x16 - x| <= 2**-11 * |x| (4.9e-4 relative; 0.015
absolute at x = -30); smaller magnitudes are subnormal, absolute error <= 2**-25. Values
below ``LOGPROB_FLOOR`` (-1e4), -inf included, are clamped to it: exp(-1e4) is 0 in
float32, so the renormalised teacher distribution is the same as with -inf, and the loss's
``exp(q) * (q - p)`` stays 0 instead of NaN. NaN and values above +1e4 are refused (a
broken teacher).

This module imports torch only inside the tensor helpers: the coordinator uses it without
torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.pipeline import PRODUCER, check_stage

if TYPE_CHECKING:
    # lazy: the coordinator uses this module without torch
    import torch

SCHEMA_VERSION = 1
LOGPROB_FLOOR = -1.0e4

# The floor's float16 magnitude bits: a float16 x has |x| > |floor| (or is inf/NaN) exactly
# when its magnitude bits are larger, which numpy checks with integer ops.
_FLOOR_BITS = int(np.array(LOGPROB_FLOOR, np.float16).view(np.uint16)) & 0x7FFF

META_VERSION = b"sluice.schema_version"
META_STAGE = b"sluice.stage"
META_TOPK_K = b"sluice.topk_k"
META_FLOOR = b"sluice.logprob_floor"


class SchemaError(ValueError):
    """A table or shard does not have the schema its stage requires."""


class SchemaVersionError(SchemaError):
    """A shard was written with another schema version than this code reads."""


def _field(name: str, type_: pa.DataType, required: bool) -> pa.Field:
    return pa.field(name, type_, nullable=not required)


_PROMPTS = [
    _field("sample_id", pa.string(), True),
    _field("step", pa.int64(), True),
    _field("problem", pa.string(), True),
    _field("answer", pa.string(), False),
    _field("prompt_ids", pa.list_(pa.int32()), True),
    _field("dataset", pa.string(), True),
    _field("index", pa.int64(), True),
    _field("static_trace", pa.string(), False),
]
_ROLLOUTS = _PROMPTS + [
    _field("response_ids", pa.list_(pa.int32()), True),
    _field("response_text", pa.string(), True),
    _field("finish_reason", pa.string(), True),
    _field("policy_version", pa.int64(), True),
    _field("gen_logprobs", pa.list_(pa.float32()), True),
]


def topk_ids_type(k: int) -> pa.DataType:
    return pa.list_(pa.list_(pa.int32(), k))


def topk_logprobs_type(k: int) -> pa.DataType:
    return pa.list_(pa.list_(pa.float16(), k))


def _scored_fields(k: int) -> list[pa.Field]:
    return _ROLLOUTS + [
        _field("teacher_topk_ids", topk_ids_type(k), True),
        _field("teacher_topk_logprobs", topk_logprobs_type(k), True),
        _field("sample_mask", pa.int8(), True),
        _field("teacher_model", pa.string(), True),
        _field("alignment_offset", pa.int32(), True),
        _field("teacher_prompt_ids", pa.list_(pa.int32()), False),
        _field("trace_found", pa.bool_(), False),
        _field("prefix_truncated", pa.bool_(), False),
    ]


def _check_k(topk_k: Any) -> int:
    if isinstance(topk_k, bool) or not isinstance(topk_k, (int, np.integer)) or topk_k < 1:
        raise ValueError(f"topk_k={topk_k!r} must be a positive int (the teacher top-k of the shard)")
    return int(topk_k)


def schema_for(stage: str, topk_k: int | None = None) -> pa.Schema:
    """The exact schema (with metadata) of a ``stage`` shard; ``topk_k`` only for scored."""
    check_stage(stage)
    meta = {META_VERSION: str(SCHEMA_VERSION).encode(), META_STAGE: stage.encode()}
    if stage == "scored":
        if topk_k is None:
            raise ValueError("scored shards need topk_k (the teacher top-k, e.g. 64)")
        k = _check_k(topk_k)
        meta[META_TOPK_K] = str(k).encode()
        meta[META_FLOOR] = repr(LOGPROB_FLOOR).encode()
        fields = _scored_fields(k)
    else:
        if topk_k is not None:
            raise ValueError(f"topk_k is only for scored shards, not {stage}")
        fields = _PROMPTS if stage == "prompts" else _ROLLOUTS
    return pa.schema(fields, metadata=meta)


def required_columns(stage: str) -> list[str]:
    return [f.name for f in schema_for(stage, 1 if stage == "scored" else None) if not f.nullable]


def check_schema(schema: pa.Schema, stage: str, source: str = "<table>") -> int | None:
    """Verify ``schema`` is a Sluice ``stage`` schema of this version; return its top-k k.

    ``source`` (usually the shard path) is named in every error.
    """
    check_stage(stage)
    meta = schema.metadata or {}
    if META_VERSION not in meta:
        raise SchemaError(
            f"{source}: not a Sluice {stage} shard (no {META_VERSION.decode()} in the schema "
            "metadata); build tables with shared.schemas.build_table"
        )
    version = meta[META_VERSION].decode()
    if version != str(SCHEMA_VERSION):
        raise SchemaVersionError(
            f"{source}: written with shard schema version {version}, this code reads version "
            f"{SCHEMA_VERSION}; read it with the Sluice version that wrote the run, or redo the "
            f"stage with this one (python -m launch.resubmit RUN_DIR --stage {PRODUCER[stage]})"
        )
    found_stage = meta.get(META_STAGE, b"").decode()
    if found_stage != stage:
        raise SchemaError(f"{source}: holds a {found_stage or '?'} table where a {stage} shard belongs")
    k = None
    if stage == "scored":
        try:
            k = _check_k(int(meta.get(META_TOPK_K, b"")))
        except ValueError:
            raise SchemaError(f"{source}: scored shard without a valid {META_TOPK_K.decode()}") from None
    expected = schema_for(stage, k)
    if not schema.equals(expected, check_metadata=False):
        want = {f.name: f for f in expected}
        have = {f.name: f for f in schema}
        problems = [f"missing column {n!r}" for n in want if n not in have]
        problems += [f"unexpected column {n!r}" for n in have if n not in want]
        problems += [
            f"column {n!r} is {have[n].type}{'' if have[n].nullable else ' not null'}, "
            f"expected {want[n].type}{'' if want[n].nullable else ' not null'}"
            for n in want
            if n in have and not have[n].equals(want[n])
        ]
        if not problems:
            problems = [f"columns in order {list(have)}, expected {list(want)}"]
        raise SchemaError(f"{source}: {stage} schema v{SCHEMA_VERSION} mismatch: " + "; ".join(problems))
    return k


# ---------------------------------------------------------------------------- building


def _to_column(name: str, values: Any, type_: pa.DataType, n_rows: int | None) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    try:
        if isinstance(values, pa.Array):
            arr = values if values.type.equals(type_) else values.cast(type_)
        else:
            if hasattr(values, "detach"):  # a torch tensor: numpy without importing torch here
                values = values.detach().cpu().numpy()
            arr = pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError) as e:
        raise ValueError(f"column {name!r}: cannot convert to {type_}: {e}") from e
    if n_rows is not None and len(arr) != n_rows:
        raise ValueError(f"column {name!r} has {len(arr)} rows, other columns have {n_rows}")
    return arr


def _rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    # A key absent from some row becomes a null there; required columns then fail by name.
    return {n: [row.get(n) for row in rows] for n in names}


def _infer_k(values: Any) -> int | None:
    if isinstance(values, pa.ChunkedArray):
        values = values.type
    if isinstance(values, pa.Array):
        values = values.type
    if isinstance(values, pa.DataType):
        inner = getattr(values, "value_type", None)
        return getattr(inner, "list_size", None)
    for row in values:
        if row is not None and len(row) > 0:
            return len(row[0])
    return None


def build_table(
    stage: str,
    data: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    topk_k: int | None = None,
) -> pa.Table:
    """A validated ``stage`` table from columns (name -> values) or a list of row dicts.

    Values may be Python lists, numpy arrays, or Arrow arrays (cast to the schema type).
    For scored tables give ``teacher_topk_ids``/``teacher_topk_logprobs`` as the arrays of
    ``topk_to_arrow`` (fast path) or as nested lists ``[row][token][k]``; ``topk_k`` is
    inferred from them when not given. Missing nullable columns are filled with nulls.
    Raises ValueError naming the missing, unknown, null or inconsistent column.
    """
    check_stage(stage)
    columns = dict(data) if isinstance(data, Mapping) else _rows_to_columns(data)
    if stage == "scored" and topk_k is None:
        topk_k = _infer_k(columns.get("teacher_topk_ids", []))
        if topk_k is None:
            raise ValueError("scored table: cannot infer topk_k from teacher_topk_ids (no tokens); pass topk_k=")
    schema = schema_for(stage, topk_k)
    unknown = [n for n in columns if schema.get_field_index(n) < 0]
    if unknown:
        raise ValueError(
            f"{stage} table: unknown column(s) {unknown}; valid columns: {', '.join(schema.names)}"
        )
    missing = [f.name for f in schema if not f.nullable and f.name not in columns]
    if missing:
        raise ValueError(
            f"{stage} table is missing required column {missing[0]!r}"
            + (f" (and {missing[1:]})" if len(missing) > 1 else "")
            + f"; required: {', '.join(required_columns(stage))}"
        )
    n_rows = None
    arrays = []
    for f in schema:
        if f.name in columns:
            if f.name == "teacher_topk_logprobs" and not isinstance(columns[f.name], (pa.Array, pa.ChunkedArray)):
                arr = _nested_logprobs_to_arrow(columns[f.name], topk_k)
            else:
                arr = _to_column(f.name, columns[f.name], f.type, n_rows)
            if not f.nullable and arr.null_count:
                first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"{stage} table: column {f.name!r} is null at row {first}; it is required")
        else:
            arr = pa.nulls(n_rows or 0, f.type)
        if n_rows is None:
            n_rows = len(arr)
            arrays = [a if len(a) == n_rows else pa.nulls(n_rows, a.type) for a in arrays]
        elif len(arr) != n_rows:
            raise ValueError(f"{stage} table: column {f.name!r} has {len(arr)} rows, other columns have {n_rows}")
        arrays.append(arr)
    table = pa.Table.from_arrays(arrays, schema=schema)
    _check_consistency(table, stage)
    return table


def _nested_logprobs_to_arrow(values: Any, k: int) -> pa.Array:
    # Nested Python lists: through float64 (one rounding to float16) and the same clamp and
    # NaN check as topk_to_arrow.
    as64 = _to_column("teacher_topk_logprobs", values, pa.list_(pa.list_(pa.float64(), k)), None)
    flat = as64.flatten().flatten().to_numpy(zero_copy_only=False)
    lengths = _lengths(as64)
    return _logprobs_array(flat.reshape(-1, k), _offsets(lengths, len(flat) // k), as64.is_null())


def _lengths(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)


def _check_consistency(table: pa.Table, stage: str) -> None:
    if stage == "prompts":
        return
    resp = _lengths(table.column("response_ids"))
    gen = _lengths(table.column("gen_logprobs"))
    bad = np.flatnonzero(gen != resp)
    if bad.size:
        r = int(bad[0])
        raise ValueError(
            f"{stage} table row {r}: gen_logprobs has {gen[r]} values for {resp[r]} response tokens"
        )
    if stage != "scored":
        return
    mask = table.column("sample_mask").to_numpy()
    for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
        n = _lengths(table.column(name))
        bad = np.flatnonzero((n != resp) & ~((n == 0) & (mask == 0)))
        if bad.size:
            r = int(bad[0])
            raise ValueError(
                f"scored table row {r}: {name} has {n[r]} tokens for {resp[r]} response tokens; "
                "top-k is stored for every response token (a row may be empty only with sample_mask=0)"
            )
    if _needs_clamp(_flat_values(table.column("teacher_topk_logprobs")), "scored table: teacher_topk_logprobs"):
        raise ValueError(
            f"scored table: teacher_topk_logprobs below the floor {LOGPROB_FLOOR} (e.g. -inf); "
            "build the top-k columns with shared.schemas.topk_to_arrow, which clamps them"
        )


# ----------------------------------------------------------------------- top-k helpers


def _offsets(lengths: Any, total: int) -> np.ndarray:
    lengths = np.asarray(lengths.cpu() if hasattr(lengths, "cpu") else lengths, dtype=np.int64).reshape(-1)
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.min()}")
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] != total:
        raise ValueError(f"lengths sum to {offsets[-1]} tokens but the top-k tensors have {total} rows")
    if total >= 2**31:
        raise ValueError(f"{total} top-k tokens in one shard exceed Arrow's int32 list offsets; use smaller shards")
    return offsets.astype(np.int32)


def _needs_clamp(values16: np.ndarray, what: str) -> bool:
    """True if float16 ``values16`` has values below the floor; raises on NaN or > +1e4.

    Two max-reductions over the bits and no temporaries on the common path: as uint16,
    negative floats sort above positive ones and by growing magnitude; as int16, positive
    floats are the non-negative values, again by magnitude.
    """
    if not values16.size:
        return False
    neg_max = int(values16.view(np.uint16).max())
    pos_max = int(values16.view(np.int16).max())
    if neg_max <= (0x8000 | _FLOOR_BITS) and pos_max <= _FLOOR_BITS:
        return False
    if ((values16.view(np.uint16) & np.uint16(0x7FFF)) > 0x7C00).any():
        raise ValueError(f"{what} hold NaN; the teacher produced NaN logits")
    if pos_max > _FLOOR_BITS:
        raise ValueError(f"{what} hold values above {-LOGPROB_FLOOR}; log-probs are <= 0")
    return True


def _logprobs16(values: Any) -> np.ndarray:
    """Float16 numpy ``[total_tokens, k]``: NaN refused, below ``LOGPROB_FLOOR`` clamped.

    Everything on the CPU is single-threaded numpy/Arrow: torch's OpenMP kernels slow down
    ~20x on a node whose cores are busy, and these passes are memory-bound anyway. The
    rounding to float16 is Arrow's cast (IEEE round-to-nearest-even, bit-identical to numpy's
    and ~2x faster). Checks and clamp work on the float16 bits with integer ops (numpy's
    float16 arithmetic is ~10x slower).
    """
    if hasattr(values, "detach"):
        # lazy: the coordinator uses this module without torch
        import torch

        if not values.dtype.is_floating_point:
            raise ValueError(f"top-k logprobs must be floats, got {values.dtype}")
        t = values.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:  # no numpy bfloat16: its bits are float32's top half
            values = (t.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = t.numpy()
    values = np.asarray(values)
    if values.dtype == np.float16:
        values16 = values
    else:
        if not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"top-k logprobs must be floats, got {values.dtype}")
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        values16 = pc.cast(flat, pa.float16(), safe=False).to_numpy(zero_copy_only=True).reshape(values.shape)
    if _needs_clamp(values16, "teacher top-k logprobs"):
        bits = values16.view(np.uint16)
        # Below the floor (-inf and values under -65504 included, which float16 made -inf).
        values16 = np.where(bits > (0x8000 | _FLOOR_BITS), np.float16(LOGPROB_FLOOR), values16)
    return values16


def _logprobs_array(values: Any, offsets: np.ndarray, null_mask: pa.Array | None = None) -> pa.Array:
    """``list<fixed_size_list<float16, k>>`` from float values ``[total_tokens, k]``."""
    values16 = _logprobs16(values)
    child = pa.FixedSizeListArray.from_arrays(pa.array(values16.reshape(-1)), values16.shape[1])
    if null_mask is not None and not null_mask.true_count:
        null_mask = None
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), child, mask=null_mask)


def topk_to_arrow(ids: Any, logprobs: Any, lengths: Any) -> tuple[pa.Array, pa.Array]:
    """Arrow columns ``(teacher_topk_ids, teacher_topk_logprobs)`` from packed tensors.

    ``ids``: int tensor/array ``[total_tokens, k]``; ``logprobs``: float tensor/array of the
    same shape; ``lengths``: response tokens per row, summing to ``total_tokens``. Log-probs
    are clamped to ``LOGPROB_FLOOR`` and stored as float16. Fastest: cast on the GPU first
    (``ids.int()``, ``logprobs.half()``): the copy to the CPU halves and no conversion is left.
    CPU int32/float16 inputs are wrapped without a copy, so leave them unchanged until the
    table is committed.
    """
    shape, ids_shape = tuple(logprobs.shape), tuple(ids.shape)
    if ids_shape != shape or len(shape) != 2:
        raise ValueError(f"top-k ids {ids_shape} and logprobs {shape} must both be [total_tokens, k]")
    if shape[1] < 1:
        raise ValueError("top-k tensors have k = 0 columns")
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"top-k ids must be integers, got {ids.dtype}")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= 2**31:
            raise ValueError(f"top-k ids must be token ids in [0, 2**31), got [{lo}, {hi}]")
    offsets = _offsets(lengths, shape[0])
    ids32 = np.ascontiguousarray(ids) if ids.dtype == np.int32 else _pool_copy(ids, np.int32)
    ids_child = pa.FixedSizeListArray.from_arrays(pa.array(ids32.reshape(-1)), shape[1])
    ids_arr = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), ids_child)
    return ids_arr, _logprobs_array(logprobs, offsets)


def _flat_values(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The innermost values of a list<fixed_size_list<T>> column as one numpy array.

    ``flatten`` honours slice offsets; for a single chunk the result is a view of the Arrow
    buffer (no copy), otherwise chunks are concatenated once.
    """
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = [c.flatten().flatten().to_numpy(zero_copy_only=True) for c in chunks]
    if not parts:
        return np.zeros(0, dtype=col.type.value_type.value_type.to_pandas_dtype())
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TopK(NamedTuple):
    ids: "torch.Tensor"  # [total_tokens, k], ids_dtype
    logprobs: "torch.Tensor"  # [total_tokens, k] float32
    offsets: "torch.Tensor"  # [rows + 1] int64; row r is ids[offsets[r]:offsets[r + 1]]


def ragged_from_arrow(col: pa.Array | pa.ChunkedArray, dtype: "torch.dtype | None" = None):
    """``(values, offsets)`` torch tensors of a ``list<primitive>`` column (e.g. response_ids).

    Row r is ``values[offsets[r]:offsets[r + 1]]``; null rows are empty.
    """
    # lazy: the coordinator uses this module without torch
    import torch

    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = [c.flatten().to_numpy(zero_copy_only=True) for c in chunks]
    values = parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.int32)
    offsets = np.zeros(len(col) + 1, dtype=np.int64)
    np.cumsum(_lengths(col), out=offsets[1:])
    return _tensor(values, dtype), torch.from_numpy(offsets)


def _pool_copy(arr: np.ndarray, dtype: Any) -> np.ndarray:
    """``arr.astype(dtype)`` into memory from Arrow's pool (mimalloc), which recycles freed
    buffers: malloc hands back fresh pages for large arrays, each page a fault, and that
    was half the read time on a busy node."""
    dtype = np.dtype(dtype)
    out = np.frombuffer(pa.allocate_buffer(arr.size * dtype.itemsize), dtype=dtype).reshape(arr.shape)
    np.copyto(out, arr, casting="unsafe")
    return out


def _tensor(arr: np.ndarray, dtype: "torch.dtype | None") -> "torch.Tensor":
    """A torch tensor of ``arr``: a zero-copy view when the dtype matches, else a converted copy.

    Conversions run in numpy (single-threaded): torch's OpenMP threads can be 10x slower
    on a node whose cores are busy, and these copies are memory-bound anyway.
    """
    # lazy: the coordinator reads and writes shards with this module, never loading torch
    import torch

    numpy_dtypes = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32,
                    torch.float16: np.float16, torch.float64: np.float64}
    target = numpy_dtypes.get(dtype) if dtype is not None else arr.dtype
    if target is not None and arr.dtype != target:
        return torch.from_numpy(_pool_copy(arr, target))
    with warnings.catch_warnings():
        # Arrow buffers are read-only and torch warns on wrapping them; callers asking for
        # the stored dtype get this view and are documented not to write to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(arr)
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def topk_from_arrow(
    table: pa.Table,
    ids_dtype: "torch.dtype | None" = None,
    logprobs_dtype: "torch.dtype | None" = None,
) -> TopK:
    """The teacher top-k of a scored table as torch tensors, with no loop over tokens.

    Defaults: int64 ids (what ``torch.gather`` takes) and float32 log-probs, fresh tensors.
    ``ids_dtype=torch.int32`` / ``logprobs_dtype=torch.float16`` return zero-copy, read-only
    views of the Arrow buffers instead (one-chunk tables): the fastest way to a GPU, where
    the casts are free. Do not write to such views.
    """
    # lazy: the coordinator uses this module without torch
    import torch

    k = _infer_k(table.schema.field("teacher_topk_ids").type)
    if k is None:
        raise SchemaError("teacher_topk_ids is not a list<fixed_size_list<int32, k>> column")
    ids = _flat_values(table.column("teacher_topk_ids")).reshape(-1, k)
    lps = _flat_values(table.column("teacher_topk_logprobs")).reshape(-1, k)
    offsets = np.zeros(table.num_rows + 1, dtype=np.int64)
    np.cumsum(_lengths(table.column("teacher_topk_ids")), out=offsets[1:])
    return TopK(
        _tensor(ids, torch.int64 if ids_dtype is None else ids_dtype),
        _tensor(lps, torch.float32 if logprobs_dtype is None else logprobs_dtype),
        torch.from_numpy(offsets),
    )
