"""The learning check (issue 8): does on-policy distillation through the real pipeline teach?

    .venv/bin/python -m bench.bench_learn [--keep DIR] [override ...]   # prints the entries
    make learn                                # the same, written into BENCHMARKS.md/json

1. Models: `tiny:thinker` (the teacher: the tiny teacher architecture trained in-process for a
   few minutes to answer `What is a op b?` with `<think>a op b = c</think> The answer is
   \\boxed{c}.`, tinymodels/thinker.py; built once and cached) and `tiny:student` (random weights,
   tinymodels/random_weights.py), through `launch.start.ensure_models` on the `learn` recipe.
2. START: the student on the held-out problems (`tinymodels.thinker.heldout_problems(64)`, duplicates
   dropped; none of them is in the training file conf/learn-train.jsonl), prompts rendered by
   the pipeline's PromptBuilder:
   - reverse KL: one response per problem sampled from the student with transformers
     (temperature = policy.generation.temperature = 1, no top-k/top-p, like the pipeline's vLLM
     sampling; fixed torch seed), then per response token the full-vocabulary
     KL(student || teacher) = sum_v s_v (log s_v - log t_v) of softmax(logits / T) of both
     models (float64), averaged over all response tokens (the stop token included): the
     on-policy reverse KL, measured exactly (the pipeline itself sees only the teacher's top-k;
     the learn recipe trains on the mixed KL, half forward, half reverse, see conf/learn.yaml).
   - accuracy: greedy exact match of the last \\boxed{int} (tinymodels.thinker.evaluate_model), and,
     as a note, the exact match of the sampled responses.
   The teacher's greedy accuracy on the same problems is reported for reference.
3. `python -m launch.run conf=learn launch.detach=false launch.run_dir=RUN_DIR` (local
   executor: vLLM generation, teacher scoring, FSDP2 training), as a subprocess.
4. END: the same measurements with the student of RUN_DIR/weights/<last step>.
5. Entries: reverse KL end over start (target <= 0.5: "falls by at least half") and the greedy
   accuracy gain end - start (target >= +0.2 absolute, fixed before any run as what a reader
   would call "clearly above its start" on 54 problems, i.e. >= 11 more problems right).
6. Which loss teaches fastest: the pipeline again once per loss_fn.kl_type (forward, reverse,
   mixed, jsd, sampled_reverse), each for LOSS_STEPS steps from the same random student with
   the same data and seed (only kl_type differs), measured as in 4; plus the teacher stage's
   cost per step (bytes of the committed scored shards, and timing/teacher from
   metrics.jsonl). One row per loss in BENCHMARKS.md ("report": no target).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RECIPE = "learn"
TRAIN_FILE = REPO / "conf" / "learn-train.jsonl"
HELDOUT_N = 64
KL_RATIO_TARGET = 0.5     # end / start
ACC_GAIN_TARGET = 0.2     # end - start, absolute
EVAL_SEED = 1234
DEFAULT_RUN_DIR = REPO / ".cache" / "bench" / "learn-run"
PIPELINE_TIMEOUT_S = 1500
LOSS_STEPS = 20  # steps per loss in the comparison: 5 losses fit ~15 minutes on 2 cores


# ----------------------------------------------------------------------------------------------
# Problems

def heldout() -> List[Dict[str, str]]:
    """The held-out problems: the thinker's evaluation set without repeats (order kept)."""
    from tinymodels.thinker import heldout_problems

    seen, rows = set(), []
    for r in heldout_problems(HELDOUT_N):
        if r["problem"] not in seen:
            seen.add(r["problem"])
            rows.append(r)
    return rows


def train_rows() -> List[Dict[str, str]]:
    """Every `a op b` with a, b in 0..OPERAND_MAX (the thinker's range), minus the held-out ones:
    the content of conf/learn-train.jsonl."""
    from tinymodels.thinker import OPERAND_MAX, problem_row

    held = {r["problem"] for r in heldout()}
    rows = [problem_row(a, op, b) for op in "+-*" for a in range(OPERAND_MAX + 1)
            for b in range(OPERAND_MAX + 1)]
    return [r for r in rows if r["problem"] not in held]


def train_file_text() -> str:
    return "".join(json.dumps(r) + "\n" for r in train_rows())


def check_train_file(write: bool = False) -> None:
    """conf/learn-train.jsonl must hold exactly train_rows() (no held-out problem in it)."""
    want = train_file_text()
    if write:
        TRAIN_FILE.write_text(want)
    elif not TRAIN_FILE.is_file() or TRAIN_FILE.read_text() != want:
        raise RuntimeError(f"{TRAIN_FILE} is missing or stale (e.g. tinymodels.thinker's range or "
                           "held-out set changed); rewrite it with "
                           "`python -m bench.bench_learn --write-train-file`")


# ----------------------------------------------------------------------------------------------
# Measurements

def _load(path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def _sample(model, tokenizer, prompts: List[List[int]], max_new_tokens: int, temperature: float,
            seed: int, batch_size: int = 64) -> List[List[int]]:
    """One sampled response per prompt (token ids, cut after the first stop token, which is
    kept: the pipeline trains on it too)."""
    import torch

    from tinymodels.thinker import generate_batched

    stops = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    torch.manual_seed(seed)
    out: List[List[int]] = []
    for row in generate_batched(model, tokenizer, prompts, max_new_tokens, batch_size,
                                do_sample=True, temperature=temperature, top_k=0, top_p=1.0):
        resp = []
        for t in row:
            resp.append(t)
            if t in stops:
                break
        out.append(resp)
    return out


def reverse_kl(student, teacher, prompts: List[List[int]], responses: List[List[int]],
               temperature: float) -> Dict[str, float]:
    """Per-token KL(student || teacher) over the full vocabulary at the response positions,
    both models on the same (unpadded) sequence; mean over all response tokens."""
    import torch

    total, tokens, per_sample = 0.0, 0, []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            if not r:
                continue
            ids = torch.tensor([p + r])
            lo, hi = len(p) - 1, len(p) - 1 + len(r)  # logits at t predict token t + 1
            ls = torch.log_softmax(student(input_ids=ids).logits[0, lo:hi].double() / temperature, -1)
            lt = torch.log_softmax(teacher(input_ids=ids).logits[0, lo:hi].double() / temperature, -1)
            kl = (ls.exp() * (ls - lt)).sum(-1)
            total += float(kl.sum())
            tokens += len(r)
            per_sample.append(float(kl.mean()))
    return {"reverse_kl": total / max(tokens, 1), "tokens": tokens,
            "mean_response_tokens": tokens / max(len(per_sample), 1)}


def measure(student_path, teacher, tokenizer, builder, problems, cfg) -> Dict[str, float]:
    """Reverse KL on student samples, sampled and greedy exact match of the student."""
    from tinymodels.thinker import evaluate_model, has_trace, parse_boxed

    student = _load(student_path)
    gen = cfg.policy.generation
    prompts = [builder.prompt_ids(r["problem"]) for r in problems]
    responses = _sample(student, tokenizer, prompts, gen.max_new_tokens, gen.temperature, EVAL_SEED)
    result = reverse_kl(student, teacher, prompts, responses, gen.temperature)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    ok = [parse_boxed(t) is not None and str(parse_boxed(t)) == str(row["answer"])
          for t, row in zip(texts, problems)]
    result["sampled_accuracy"] = sum(ok) / len(problems)
    result["sampled_trace_rate"] = sum(map(has_trace, texts)) / len(problems)
    greedy = evaluate_model(student, tokenizer, problems, max_new_tokens=gen.max_new_tokens,
                            return_texts=True)
    result["accuracy"] = greedy["accuracy"]
    result["trace_rate"] = greedy["trace_rate"]
    result["accuracy_by_op"] = greedy["accuracy_by_op"]
    result["examples"] = [{"problem": problems[i]["problem"], "greedy": greedy["texts"][i],
                           "sampled": texts[i]} for i in range(3)]
    return result


# ----------------------------------------------------------------------------------------------
# The pipeline run

def run_pipeline(run_dir: Path, overrides: Sequence[str], timeout_s: float) -> float:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "launch.run", f"conf={RECIPE}", "launch.detach=false",
           f"launch.run_dir={run_dir}", *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log_path = run_dir.parent / f"{run_dir.name}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout_s)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return wall


def last_weights(run_dir: Path) -> Path:
    from shared.rundir import RunDir, latest_weights

    step, path = latest_weights(RunDir(run_dir))
    if path is None:
        raise RuntimeError(f"no committed weights under {RunDir(run_dir).weights_root}")
    return path


def train_curve(run_dir: Path) -> List[dict]:
    from shared.rundir import RunDir, read_metrics, trained_steps

    rows = []
    rd = RunDir(run_dir)
    for step in trained_steps(rd):
        t = json.loads(rd.train_record(step).read_text())
        rows.append({k: t.get(k) for k in ("step", "loss", "reverse_kl", "forward_kl",
                                           "student_topk_mass", "grad_norm", "lr")})
    metrics = {}
    for m in read_metrics(rd):
        metrics.setdefault(m.get("step"), {}).update(m)  # the end-of-run validation row too
    for r in rows:
        m = metrics.get(r["step"], {})
        r["gen_tokens"] = m.get("train/mean_gen_tokens_per_sample")
        r["step_s"] = m.get("timing/step")
        if "validation/accuracy" in m:
            r["validation_accuracy"] = m["validation/accuracy"]
    return rows


def _curve_summary(curve: List[dict]) -> str:
    if not curve:
        return "no train.json found"
    n = len(curve)
    picks = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
    parts = []
    for i in picks:
        c = curve[i]
        tokens = "?" if c["gen_tokens"] is None else f"{c['gen_tokens']:.1f}"
        parts.append(f"step {c['step']}: loss {c['loss']:.3f}, reverse KL (top-k) "
                     f"{c['reverse_kl']:.3f}, response tokens {tokens}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------

def teacher_cost(run_dir: Path) -> Dict[str, float]:
    """The teacher stage per trained step: bytes of the committed scored shards, and its time
    (timing/teacher of metrics.jsonl)."""
    from shared.queue import StageQueue
    from shared.rundir import RunDir, read_metrics, trained_steps

    rd = RunDir(run_dir)
    steps = trained_steps(rd)
    sizes = [sum(rec["bytes"] for rec in StageQueue(rd, t, "scored").committed().values())
             for t in steps]
    times = [r["timing/teacher"] for r in read_metrics(rd) if "timing/teacher" in r]
    return {"scored_bytes_per_step": sum(sizes) / max(len(sizes), 1),
            "teacher_s_per_step": sum(times) / max(len(times), 1)}


def compare_losses(out: dict, teacher, tokenizer, builder, problems, cfg, start: dict,
                   overrides: Sequence[str], timeout_s: float, steps: int = LOSS_STEPS) -> None:
    """Step 6 of the module docstring: one short run per loss_fn.kl_type."""
    from typing import get_args

    from shared.config import KLType

    rows = []
    for kl in get_args(KLType):
        run_dir = DEFAULT_RUN_DIR.parent / f"learn-{kl}"
        wall = run_pipeline(run_dir, [*overrides, f"loss_fn.kl_type={kl}",
                                      f"distillation.max_num_steps={steps}"], timeout_s)
        end = measure(last_weights(run_dir), teacher, tokenizer, builder, problems, cfg)
        rows.append({"kl_type": kl, "reverse_kl": end["reverse_kl"], "accuracy": end["accuracy"],
                     **teacher_cost(run_dir), "wall_s": round(wall, 1)})
    for r in rows:
        label = f"learn by loss ({steps} steps), kl_type={r['kl_type']}"
        out.setdefault("entries", []).extend([
            {"name": f"{label}: held-out reverse KL to teacher", "value": round(r["reverse_kl"], 4),
             "unit": "nats/token", "baseline": round(start["reverse_kl"], 4),
             "ratio": round(r["reverse_kl"] / start["reverse_kl"], 4), "target": "report"},
            {"name": f"{label}: exact-match accuracy (greedy); ratio = end - start",
             "value": round(r["accuracy"], 4), "unit": "fraction",
             "baseline": round(start["accuracy"], 4), "ratio": round(r["accuracy"] - start["accuracy"], 4),
             "target": "report"},
            {"name": f"{label}: teacher-stage bytes per step (scored shards)",
             "value": round(r["scored_bytes_per_step"] / 2**20, 3), "unit": "MiB", "baseline": None,
             "ratio": None, "target": "report"},
            {"name": f"{label}: teacher-stage time per step", "value": round(r["teacher_s_per_step"], 2),
             "unit": "s", "baseline": None, "ratio": None, "target": "report"},
        ])
    out.setdefault("notes", []).append(loss_table(rows, steps, start, cfg.loss_fn.jsd_beta))
    out["learn_by_loss"] = rows


def loss_table(rows: List[dict], steps: int, start: dict, jsd_beta: float) -> str:
    """The comparison of loss types as a markdown table (a note of BENCHMARKS.md)."""
    lines = [f"Which loss teaches fastest: {steps} steps per loss_fn.kl_type from the same random "
             f"student (held-out reverse KL {start['reverse_kl']:.3f}, accuracy "
             f"{start['accuracy']:.3f}), same data, seed and settings as the check above "
             f"(jsd_beta {jsd_beta}; sampled_reverse: the teacher scores one log-prob per token, "
             "no top-k). The learn recipe's tuning notes (conf/learn.yaml) explain why losses "
             "led by the reverse KL struggle on this saturated random student.",
             "",
             "| kl_type | held-out reverse KL | exact match | teacher MiB / step | "
             "teacher s / step | run s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['kl_type']} | {r['reverse_kl']:.3f} | {r['accuracy']:.3f} | "
              f"{r['scored_bytes_per_step'] / 2**20:.2f} | {r['teacher_s_per_step']:.1f} | "
              f"{r['wall_s']:.0f} |" for r in rows]
    return "\n".join(lines)


def run(out: dict, overrides: Sequence[str] = (), run_dir: Optional[Path] = None,
        timeout_s: float = PIPELINE_TIMEOUT_S, compare: bool = True) -> dict:
    import torch
    from transformers import AutoTokenizer

    from launch.start import ensure_models
    from shared.data import PromptBuilder
    from shared.models import find_model
    from shared.recipe import load
    from tinymodels.thinker import build_info, evaluate_model, prompt_builder

    t_start = time.time()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    check_train_file()
    cfg, _ = load(RECIPE, list(overrides))
    ensure_models(cfg)  # builds tiny:thinker (a few CPU minutes) the first time
    t_models = time.time() - t_start
    student0 = find_model(cfg.policy.model_name)
    teacher_path = find_model(cfg.teacher.model_name)
    tokenizer = AutoTokenizer.from_pretrained(str(student0))
    builder = PromptBuilder(cfg, tokenizer, cfg.data.train)
    problems = heldout()
    # tinymodels.thinker.evaluate_model renders with the smoke recipe; the learn recipe must agree.
    assert all(builder.prompt_ids(r["problem"]) == prompt_builder(tokenizer).prompt_ids(r["problem"])
               for r in problems[:4]), "learn and smoke render prompts differently"
    teacher = _load(teacher_path)
    teacher_eval = evaluate_model(teacher, tokenizer, problems,
                                  max_new_tokens=cfg.policy.generation.max_new_tokens)
    start = measure(student0, teacher, tokenizer, builder, problems, cfg)

    run_dir = Path(run_dir) if run_dir else DEFAULT_RUN_DIR
    wall = run_pipeline(run_dir, overrides, timeout_s)
    weights = last_weights(run_dir)
    end = measure(weights, teacher, tokenizer, builder, problems, cfg)
    curve = train_curve(run_dir)

    kl_ratio = end["reverse_kl"] / start["reverse_kl"]
    gain = end["accuracy"] - start["accuracy"]
    out.setdefault("entries", []).extend([
        {"name": "learn: student reverse KL to teacher (per token, held-out)",
         "value": round(end["reverse_kl"], 4), "unit": "nats/token",
         "baseline": round(start["reverse_kl"], 4), "ratio": round(kl_ratio, 4),
         "target": f"<= {KL_RATIO_TARGET}", "better": "lower"},
        {"name": "learn: student exact-match accuracy (held-out, greedy); ratio = end - start",
         "value": round(end["accuracy"], 4), "unit": "fraction",
         "baseline": round(start["accuracy"], 4), "ratio": round(gain, 4),
         "target": f">= {ACC_GAIN_TARGET}", "better": "higher"},
        {"name": "learn: teacher (tiny:thinker) exact-match accuracy (held-out, greedy)",
         "value": round(teacher_eval["accuracy"], 4), "unit": "fraction", "baseline": None,
         "ratio": None, "target": None, "better": "higher"},
    ])
    total = time.time() - t_start
    info = build_info(Path(teacher_path).parent) or {}
    notes = out.setdefault("notes", [])
    notes.append(
        f"Learning check: `python -m launch.run conf=learn` ({len(curve)} steps of "
        f"{cfg.distillation.num_prompts_per_step} prompts x {cfg.distillation.num_generations_per_prompt} "
        f"samples, kl_type={cfg.loss_fn.kl_type}, zero_outside_topk={cfg.loss_fn.zero_outside_topk}, "
        f"top-k {cfg.distillation.topk_logits_k}, lr {cfg.policy.optimizer.kwargs.get('lr')}) took "
        f"{wall:.0f} s; the whole check {total:.0f} s (models ready after {t_models:.0f} s). "
        f"{len(problems)} held-out problems, none in conf/learn-train.jsonl "
        f"({len(train_rows())} training problems).")
    notes.append(
        f"Reverse KL KL(student||teacher) per response token, full vocabulary, on one student "
        f"sample per problem (temperature {cfg.policy.generation.temperature}, seed {EVAL_SEED}): "
        f"{start['reverse_kl']:.4f} -> {end['reverse_kl']:.4f} nats "
        f"({start['mean_response_tokens']:.1f} -> {end['mean_response_tokens']:.1f} tokens/response). "
        f"Student greedy exact match {start['accuracy']:.3f} -> {end['accuracy']:.3f} "
        f"(by op {end['accuracy_by_op']}), sampled {start['sampled_accuracy']:.3f} -> "
        f"{end['sampled_accuracy']:.3f}; greedy <think> rate {start['trace_rate']:.2f} -> "
        f"{end['trace_rate']:.2f}. Teacher greedy exact match {teacher_eval['accuracy']:.3f} "
        f"(by op {teacher_eval['accuracy_by_op']}; thinker build: {info.get('steps')} steps, "
        f"{info.get('seconds')} s, stopped by {info.get('stopped_by')}).")
    notes.append("Per-step training (train.json, top-k estimates on the student's own samples): "
                 + _curve_summary(curve) + ".")
    val = [c["validation_accuracy"] for c in curve if "validation_accuracy" in c]
    if val:
        notes.append(f"The pipeline's own end-of-run validation (vLLM samples at temperature "
                     f"{cfg.policy.generation.temperature}, math-verify, "
                     f"{cfg.distillation.max_val_samples} validation problems): accuracy {val[-1]:.3f}.")
    if compare:
        compare_losses(out, teacher, tokenizer, builder, problems, cfg, start, overrides, timeout_s)
    out["learn"] = {"start": start, "end": end, "teacher": {k: teacher_eval[k] for k in
                                                            ("accuracy", "trace_rate", "accuracy_by_op")},
                    "curve": curve, "pipeline_wall_s": round(wall, 1), "total_s": round(total, 1),
                    "run_dir": str(run_dir), "weights": str(weights), "overrides": list(overrides)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="learning check (see the module docstring)")
    p.add_argument("--run-dir", help=f"run directory (default {DEFAULT_RUN_DIR}; wiped first)")
    p.add_argument("--write-train-file", action="store_true",
                   help="rewrite conf/learn-train.jsonl from tinymodels.thinker and exit")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the comparison of loss types (step 6 of the module docstring)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the learn recipe")
    args = p.parse_args()
    if args.write_train_file:
        check_train_file(write=True)
        print(f"wrote {TRAIN_FILE}")
        return
    out = run({}, args.overrides, Path(args.run_dir) if args.run_dir else None,
              compare=not args.no_compare)
    print(json.dumps({k: out[k] for k in ("entries", "notes")}, indent=1, default=str))


if __name__ == "__main__":
    main()
