"""Datasets, prompts and the resumable step loader.

    from shared.data import load_rows, PromptBuilder, StepLoader
    rows, skipped = load_rows(cfg.data.train, cfg)           # [{problem, answer, trace, index}]
    builder = PromptBuilder(cfg, tokenizer, cfg.data.train)   # problem -> prompt_ids
    loader = StepLoader(n_rows=len(valid), num_prompts=8, seed=42, shuffle=True)
    loader.rows_for_step(3)                                   # dataset row positions of step 3

Datasets are named as in the runbook (DeepScaler, OpenMathInstruct-2, AIME2024,
OpenThoughts-114k, ResponseDataset) and read from the local Hugging Face cache or a local
json / jsonl / parquet file (`data_path`), never downloaded at run time. `synthetic_arithmetic`
is built in (tiny smoke runs and tests).

Malformed rows (missing or empty problem, problem not text) are skipped and counted; prompts
longer than `data.max_input_seq_length` tokens are skipped and counted by the caller that
tokenizes them. The loader is a pure function of (step, seed), so a resumed run sees the same
prompts for the same step.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from shared.config import DatasetConfig, SluiceConfig
from shared.config_check import resolve_path
from shared.errors import UserError

# name -> (HF dataset id, subset, split, problem column, answer column)
KNOWN_DATASETS: Dict[str, Tuple[str, Optional[str], str, str, str]] = {
    "DeepScaler": ("agentica-org/DeepScaleR-Preview-Dataset", None, "train", "problem", "answer"),
    "OpenMathInstruct-2": ("nvidia/OpenMathInstruct-2", None, "train", "problem", "expected_answer"),
    "AIME2024": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
    "OpenThoughts-114k": ("open-thoughts/OpenThoughts-114k", "metadata", "train", "problem",
                          "ground_truth_solution"),
}
SYNTHETIC = "synthetic_arithmetic"
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def synthetic_arithmetic(split: str = "train", n: Optional[int] = None) -> List[Dict[str, Any]]:
    """Single-digit arithmetic problems with exact integer answers; deterministic per split.

    Single digits: the tiny models of the smoke runs and the learning check (tinymodels/thinker.py)
    learn these in CPU minutes; two-digit products they do not."""
    n = n or (512 if split == "train" else 64)
    rng = random.Random({"train": 0, "validation": 1}.get(split, 2))
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op = rng.choice("+-*")
        ans = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"problem": f"What is {a} {op} {b}?", "answer": str(ans),
                     "trace": f"{a} {op} {b} = {ans}"})
    return rows


def _load_table(ds: DatasetConfig, name: str):
    """A `datasets.Dataset` from a local file/dir or the local HF cache."""
    # lazy: 0.6 s to import; only loading a dataset needs it
    import datasets

    if ds.data_path:
        path = Path(ds.data_path).expanduser()
        if not path.exists():
            raise UserError(f"data error: data.{name}.data_path={ds.data_path!r}: not found. "
                            "Fix: give an existing json, jsonl or parquet file or dataset directory.")
        if path.is_file():
            kind = LOCAL_SUFFIXES.get(path.suffix)
            if kind is None:
                raise UserError(f"data error: data.{name}.data_path={ds.data_path!r}: unsupported "
                                f"file type {path.suffix!r}. Fix: use .json, .jsonl or .parquet.")
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        try:
            return datasets.load_from_disk(str(path))[ds.split or "train"] \
                if (path / "dataset_dict.json").exists() else datasets.load_from_disk(str(path))
        except FileNotFoundError:
            return datasets.load_dataset(str(path), name=ds.subset, split=ds.split or "train")
    hf_id, subset, split, _, _ = KNOWN_DATASETS[ds.dataset_name]
    try:
        return datasets.load_dataset(hf_id, name=ds.subset or subset, split=ds.split or split)
    except Exception as e:  # datasets raises several types for "not cached while offline"
        raise UserError(
            f"data error: data.{name}.dataset_name={ds.dataset_name!r}: {hf_id} is not in the "
            f"local Hugging Face cache ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Fix: on a login node with internet run `python -c \"import datasets; "
            f"datasets.load_dataset('{hf_id}'{', name=' + repr(ds.subset or subset) if ds.subset or subset else ''})\"`, "
            f"or set data.{name}.data_path to a local file."
        ) from None


def load_rows(ds: DatasetConfig, cfg: SluiceConfig, name: str = "train") -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """The dataset's usable rows as dicts {problem, answer, trace, index, dataset}, and the
    counts of skipped malformed rows by reason."""
    trace_col = None
    cd = cfg.distillation.context_distillation
    if cd.enabled and cd.trace_source == "static_dataset":
        trace_col = cd.static_trace.answer_column
    label = ds.dataset_name or Path(ds.data_path or "data").name
    if ds.dataset_name == SYNTHETIC and not ds.data_path:
        raw = synthetic_arithmetic(ds.split or name)
        in_key, out_key = "problem", "answer"
        table_rows = raw
    else:
        if ds.dataset_name not in KNOWN_DATASETS and ds.dataset_name not in (None, "ResponseDataset") \
                and not ds.data_path:
            raise UserError(f"data error: data.{name}.dataset_name={ds.dataset_name!r}: unknown "
                            f"dataset. Fix: use one of {', '.join(KNOWN_DATASETS)}, {SYNTHETIC}, or "
                            f"set data.{name}.data_path to a local file.")
        table = _load_table(ds, name)
        default_in, default_out = ("problem", "answer")
        if ds.dataset_name in KNOWN_DATASETS:
            default_in, default_out = KNOWN_DATASETS[ds.dataset_name][3:]
        in_key, out_key = ds.input_key or default_in, ds.output_key or default_out
        if in_key not in table.column_names:
            raise UserError(f"data error: data.{name}: column {in_key!r} not in {label} (columns: "
                            f"{', '.join(table.column_names)}). Fix: set data.{name}.input_key.")
        if trace_col and trace_col not in table.column_names:
            raise UserError(
                f"data error: distillation.context_distillation.static_trace.answer_column="
                f"{trace_col!r} not in {label} (columns: {', '.join(table.column_names)}). "
                "Fix: name the column that holds the traces.")
        if ds.filter_column:
            if ds.filter_column not in table.column_names:
                raise UserError(f"data error: data.{name}.filter_column={ds.filter_column!r} not in "
                                f"{label}. Fix: use one of {', '.join(table.column_names)}.")
            want = ds.filter_value
            table = table.filter(lambda r: str(r[ds.filter_column]) == str(want))
        keep = [c for c in {in_key, out_key, trace_col} if c and c in table.column_names]
        table_rows = table.select_columns(keep).to_list()

    rows: List[Dict[str, Any]] = []
    skipped = {"missing_problem": 0, "empty_problem": 0}
    for i, r in enumerate(table_rows):
        problem = r.get(in_key)
        if not isinstance(problem, str):
            skipped["missing_problem"] += 1
            continue
        if not problem.strip():
            skipped["empty_problem"] += 1
            continue
        answer = r.get(out_key)
        rows.append({"problem": problem, "answer": None if answer is None else str(answer),
                     "trace": r.get(trace_col) if trace_col else None,
                     "index": i, "dataset": label})
    if ds.repeat > 1:
        rows = [dict(r) for r in rows for _ in range(ds.repeat)]
    return rows, skipped


def split_validation(rows: List[Dict[str, Any]], ds: DatasetConfig):
    """Hold out `split_validation_size` rows of train for validation (seeded)."""
    if ds.split_validation_size <= 0:
        return rows, []
    rng = np.random.default_rng(ds.seed)
    order = rng.permutation(len(rows))
    held = set(order[: ds.split_validation_size].tolist())
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


def save_prompt_rows(path: Path, rows: List[Dict[str, Any]]) -> None:
    """Tokenized prompt rows (problem, answer, trace, index, dataset, prompt_ids) as an Arrow
    file, written atomically: the run's fixed training or validation prompts."""
    table = pa.table({
        "problem": pa.array([r["problem"] for r in rows], pa.string()),
        "answer": pa.array([r["answer"] for r in rows], pa.string()),
        "trace": pa.array([r.get("trace") for r in rows], pa.string()),
        "index": pa.array([r["index"] for r in rows], pa.int64()),
        "dataset": pa.array([r["dataset"] for r in rows], pa.string()),
        "prompt_ids": pa.array([r["prompt_ids"] for r in rows], pa.list_(pa.int32())),
    })
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    os.replace(tmp, path)


def load_prompt_rows(path: Path) -> pa.Table:
    """The table save_prompt_rows wrote (memory-mapped)."""
    with pa.memory_map(str(path)) as f:
        return pa.ipc.open_file(f).read_all()


def read_text_file(path: Optional[str]) -> Optional[str]:
    """A prompt or system-prompt file's text; one trailing newline (editors add it) dropped."""
    if path is None:
        return None
    p = resolve_path(path)
    if p is None:
        raise UserError(f"data error: prompt file {path!r} not found. Fix: check data.*.prompt_file.")
    text = p.read_text()
    return text[:-1] if text.endswith("\n") else text


class PromptBuilder:
    """Problem text -> the student's prompt token ids (runbook section 5 semantics)."""

    def __init__(self, cfg: SluiceConfig, tokenizer, ds: Optional[DatasetConfig] = None):
        d = cfg.data.default
        self.template = read_text_file((ds.prompt_file if ds and ds.prompt_file else None) or d.prompt_file)
        self.system = read_text_file((ds.system_prompt_file if ds and ds.system_prompt_file else None)
                                     or d.system_prompt_file)
        self.tokenizer = tokenizer
        self.kwargs = dict(cfg.policy.tokenizer.chat_template_kwargs or {})

    def messages(self, problem: str) -> List[Dict[str, str]]:
        user = self.template.format(problem) if self.template is not None else problem
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]

    def prompt_ids(self, problem: str) -> List[int]:
        return chat_ids(self.tokenizer, self.messages(problem), self.kwargs)


def chat_ids(tokenizer, messages, kwargs) -> List[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        **kwargs)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


@dataclass
class StepLoader:
    """Which dataset rows each step uses: epochs of `n_rows // num_prompts` steps, each epoch
    a fresh seeded permutation (drop-last, as the runbook's dataloader)."""

    n_rows: int
    num_prompts: int
    seed: int
    shuffle: bool = True

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.num_prompts

    def total_steps(self, max_num_steps: int, max_num_epochs: int) -> int:
        return min(max_num_steps, self.steps_per_epoch * max_num_epochs)

    def rows_for_step(self, step: int) -> List[int]:
        if step < 1:
            raise ValueError(f"steps start at 1, got {step}")
        epoch, b = divmod(step - 1, self.steps_per_epoch)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        else:
            order = np.arange(self.n_rows)
        return order[b * self.num_prompts:(b + 1) * self.num_prompts].tolist()
