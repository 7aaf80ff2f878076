"""Datasets from local files, malformed rows, prompt rendering and the resumable step loader."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.data import PromptBuilder, StepLoader, load_rows, split_validation, synthetic_arithmetic
from shared.errors import UserError
from shared.recipe import load

ROWS = [
    {"question": "What is 1 + 1?", "solution": "2", "domain": "math"},
    {"question": "", "solution": "0", "domain": "math"},            # empty problem: skipped
    {"question": None, "solution": "3", "domain": "math"},          # missing problem: skipped
    {"question": "Name a colour.", "solution": "red", "domain": "art"},
    {"question": "What is 2 * 3?", "solution": 6, "domain": "math"},  # non-string answer: kept as text
]


def write(path, fmt):
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(
            [{**r, "solution": None if r["solution"] is None else str(r["solution"])} for r in ROWS]), path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_local_files_with_malformed_rows(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    write(path, fmt)
    cfg, _ = load("smoke", [f"data.train.data_path={path}", "data.train.dataset_name=ResponseDataset",
                            "data.train.input_key=question", "data.train.output_key=solution"])
    rows, skipped = load_rows(cfg.data.train, cfg)
    assert [r["problem"] for r in rows] == ["What is 1 + 1?", "Name a colour.", "What is 2 * 3?"]
    assert [r["answer"] for r in rows] == ["2", "red", "6"]
    assert [r["index"] for r in rows] == [0, 3, 4]
    assert skipped == {"missing_problem": 1, "empty_problem": 1}


def test_filter_and_missing_column(tmp_path):
    path = tmp_path / "d.jsonl"
    write(path, "jsonl")
    base = [f"data.train.data_path={path}", "data.train.dataset_name=ResponseDataset",
            "data.train.input_key=question", "data.train.output_key=solution"]
    cfg, _ = load("smoke", base + ["data.train.filter_column=domain", "data.train.filter_value=math"])
    rows, _ = load_rows(cfg.data.train, cfg)
    assert [r["problem"] for r in rows] == ["What is 1 + 1?", "What is 2 * 3?"]
    cfg, _ = load("smoke", base[:-2] + ["data.train.input_key=prompt"])
    with pytest.raises(UserError, match="column 'prompt' not in .*Fix: set data.train.input_key"):
        load_rows(cfg.data.train, cfg)


def test_dataset_not_in_cache_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg, _ = load("qwen3-14b-4b")
    with pytest.raises(UserError, match="agentica-org/DeepScaleR-Preview-Dataset is not in the local "
                                        "Hugging Face cache.*Fix: on a login node"):
        load_rows(cfg.data.train, cfg)


def test_prompt_rendering_uses_prompt_file_and_system_prompt(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["student"])
    system = tmp_path / "sys.txt"
    system.write_text("Be brief.\n")
    cfg, _ = load("smoke", [f"data.default.system_prompt_file={system}"])
    b = PromptBuilder(cfg, tok, cfg.data.train)
    msgs = b.messages("What is 1 + 1?")
    assert msgs == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Please solve the following math problem step by step, and put "
                                    "your final answer within \\boxed{}.\n\nProblem: What is 1 + 1?"},
    ]
    text = tok.decode(b.prompt_ids("What is 1 + 1?"))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPlease solve")
    assert text.endswith("<|im_start|>assistant\n")


def test_step_loader_is_resumable_and_covers_epochs():
    loader = StepLoader(n_rows=10, num_prompts=4, seed=7, shuffle=True)
    assert loader.steps_per_epoch == 2
    assert loader.total_steps(max_num_steps=100, max_num_epochs=3) == 6
    epoch1 = loader.rows_for_step(1) + loader.rows_for_step(2)
    assert len(set(epoch1)) == 8  # drop-last: 2 of 10 rows unused in this epoch
    # A pure function of (step, seed): a resumed run sees the same prompts.
    again = StepLoader(n_rows=10, num_prompts=4, seed=7, shuffle=True)
    assert [again.rows_for_step(t) for t in range(1, 7)] == [loader.rows_for_step(t) for t in range(1, 7)]
    assert loader.rows_for_step(3) != loader.rows_for_step(1)  # a new permutation per epoch
    assert StepLoader(10, 4, 7, shuffle=False).rows_for_step(2) == [4, 5, 6, 7]


def test_synthetic_and_held_out_split():
    train = synthetic_arithmetic("train")
    assert len(train) == 512 and synthetic_arithmetic("train") == train
    assert synthetic_arithmetic("validation") != train[:64]
    cfg, _ = load("smoke", ["data.train.split_validation_size=16"])
    rows, _ = load_rows(cfg.data.train, cfg)
    kept, held = split_validation(rows, cfg.data.train)
    assert len(kept) == 512 - 16 and len(held) == 16
    assert not {r["index"] for r in kept} & {r["index"] for r in held}
