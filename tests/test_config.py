"""The config tree, every shipped recipe, and each fail-fast validation error.

Errors are checked through `launch.run`'s real entry point: the message, exit status 2, no
traceback, and nothing written to the run directory.
"""

import os
import subprocess
import sys

import pytest

from launch import run as launch_run
from shared.config_check import validate
from shared.partition import plan as make_plan
from shared.recipe import REPO_ROOT, load, recipe_names

# Expected partition of every shipped recipe: role -> (nodes, gpus per node, tasks).
EXPECTED_PLANS = {
    "smoke": (False, {"training": (1, 2, 1), "generation": (1, 1, 1), "teacher": (1, 1, 1)}),
    "smoke-slurm": (True, {"training": (1, 1, 1), "generation": (1, 1, 1), "teacher": (1, 1, 1)}),
    "smoke-self": (False, {"training": (1, 2, 1), "generation": (1, 1, 1), "teacher": (1, 1, 1)}),
    "smoke-real-shape": (False, {"training": (1, 2, 1), "generation": (1, 1, 1), "teacher": (1, 1, 1)}),
    "learn": (False, {"training": (1, 2, 1), "generation": (1, 1, 1), "teacher": (1, 1, 1)}),
    "distillation_math": (False, {"training": (1, 2, 1), "generation": (1, 4, 4), "teacher": (1, 2, 2)}),
    "qwen3-4b-0.6b": (False, {"training": (1, 2, 1), "generation": (1, 1, 1), "teacher": (1, 1, 1)}),
    "qwen3-32b-1.7b": (False, {"training": (1, 1, 1), "generation": (1, 1, 1), "teacher": (1, 2, 1)}),
    "qwen3-32b-4b": (False, {"training": (1, 2, 1), "generation": (1, 4, 4), "teacher": (1, 2, 1)}),
    "qwen3-14b-4b": (False, {"training": (1, 2, 1), "generation": (1, 4, 4), "teacher": (1, 2, 1)}),
    "qwen3-32b-4b-isolated": (True, {"training": (1, 4, 1), "generation": (1, 4, 4), "teacher": (1, 4, 1)}),
    "qwen3-14b-4b-isolated-smoke": (True, {"training": (1, 4, 1), "generation": (1, 4, 4), "teacher": (1, 4, 2)}),
    "qwen3-8b-4b-isolated-smoke": (True, {"training": (1, 4, 1), "generation": (1, 4, 4), "teacher": (1, 4, 4)}),
    "qwen3-4b-1.7b-isolated-smoke": (True, {"training": (1, 4, 1), "generation": (1, 4, 4), "teacher": (1, 4, 4)}),
    "context-self-qwen3-0.6b": (False, {"training": (1, 2, 1), "generation": (1, 1, 1), "teacher": (1, 1, 1)}),
    "context-self-qwen3-1.7b-16k": (True, {"training": (1, 4, 1), "generation": (1, 4, 4), "teacher": (1, 4, 4)}),
    "context-self-qwen3-4b-16k": (True, {"training": (2, 4, 1), "generation": (1, 4, 4), "teacher": (1, 4, 2)}),
    "context-self-qwen3-8b-16k": (True, {"training": (1, 4, 1), "generation": (1, 4, 4), "teacher": (1, 4, 2)}),
    "context-self-qwen3-14b-16k": (True, {"training": (1, 4, 1), "generation": (1, 4, 2), "teacher": (1, 4, 1)}),
}


def test_every_recipe_is_covered():
    assert sorted(EXPECTED_PLANS) == recipe_names()


@pytest.mark.parametrize("name", sorted(EXPECTED_PLANS))
def test_recipe_validates_with_expected_plan(name):
    cfg, _ = load(name)
    plan = validate(cfg)
    isolated, roles = EXPECTED_PLANS[name]
    assert plan.isolated == isolated
    got = {r: (p.num_nodes, p.gpus_per_node, p.num_tasks) for r, p in plan.roles.items()}
    assert got == roles
    # No GPU is given to two roles.
    used = [(n, g) for p in plan.roles.values() for n, ids in zip(p.nodes, p.gpu_ids) for g in ids]
    assert len(used) == len(set(used))
    if isolated:
        assert plan.shared_nodes() == {}
    assert sum(p.total_gpus for p in plan.roles.values()) <= cfg.cluster.num_nodes * cfg.cluster.gpus_per_node


def test_recipe_files_start_with_their_command():
    for path in sorted((REPO_ROOT / "conf").glob("*.yaml")):
        head = path.read_text().split("defaults:")[0]
        assert f"python -m launch.run conf={path.stem}" in head, path.name


def test_runbook_keys_and_defaults():
    cfg, _ = load("distillation_math")
    assert cfg.distillation.topk_logits_k == 64
    assert cfg.loss_fn.kl_type == "mixed" and cfg.loss_fn.mixed_kl_weight == 0.5
    # Interpolated defaults follow the sequence length like the runbook's configs.
    cfg, _ = load("qwen3-32b-4b", ["policy.max_total_sequence_length=1024",
                                   "policy.generation.vllm_cfg.max_model_len=1024"])
    assert cfg.policy.generation.max_new_tokens == 1024
    assert cfg.data.max_input_seq_length == 1024
    cfg, _ = load("context-self-qwen3-4b-16k")
    c = cfg.distillation.context_distillation
    assert c.enabled and c.teacher_prefix_template.startswith("You are given a problem and a trace")
    assert cfg.policy.generation.max_new_tokens == 16384
    assert cfg.policy.max_total_sequence_length == 20480
    assert cfg.data.train.dataset_name == "OpenThoughts-114k" and cfg.data.train.subset == "metadata"
    assert cfg.data.train.input_key == "problem"
    assert cfg.logger.wandb_enabled is True
    assert cfg.teacher.model_name == cfg.policy.model_name == "Qwen/Qwen3-4B"


def test_dry_run_prints_isolated_plan():
    out = subprocess.run(
        [sys.executable, "-m", "launch.run", "conf=qwen3-32b-4b-isolated", "launch.dry_run=true"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Isolated clusters created: train=1x4GPUs, inference=1x4GPUs, teacher=1x4GPUs" in out.stdout
    assert "topk_logits_k: 64" in out.stdout


def run_cli(args, capsys, tmp_path):
    """Run launch.run in-process; return (exit status, stderr). The run dir must stay absent."""
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        launch_run.main(list(args) + [f"launch.run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert not run_dir.exists(), "a failed validation must not write the run directory"
    assert "Traceback" not in err
    return exc.value.code, err


ISO = ["conf=qwen3-32b-4b-isolated"]
SELF = ["conf=context-self-qwen3-0.6b"]

ERROR_CASES = {
    "colocated_with_isolation": (ISO + ["policy.generation.colocated.enabled=true"],
                                 "requires policy.generation.colocated.enabled=false"),
    "nodes_do_not_partition": (ISO + ["cluster.num_nodes=4"], "must exactly partition cluster nodes"),
    "role_gpus_not_whole_node": (ISO + ["distillation.resource_isolation.roles.teacher.gpus_per_node=2"],
                                 "enforces node-level role isolation"),
    "colocated_without_isolation": (["conf=smoke", "policy.generation.colocated.enabled=true"],
                                    "cannot share GPUs with the training job"),
    "roles_do_not_fit": (["conf=smoke", "distillation.resource_isolation.roles.training.gpus_per_node=3"],
                         "the roles do not fit the cluster"),
    "teacher_tp_not_dividing": (ISO + ["teacher.dtensor_cfg.tensor_parallel_size=3"],
                                "teacher.dtensor_cfg.tensor_parallel_size=3: must divide"),
    "vllm_tp_not_dividing": (ISO + ["policy.generation.vllm_cfg.tensor_parallel_size=3"],
                             "policy.generation.vllm_cfg.tensor_parallel_size=3: must divide"),
    "max_model_len_short": (["conf=smoke", "policy.generation.vllm_cfg.max_model_len=64"],
                            "policy.generation.vllm_cfg.max_model_len=64: shorter than "
                            "policy.max_total_sequence_length"),
    "missing_prompt_file": (["conf=smoke", "data.default.prompt_file=prompts/nope.txt"],
                            "data.default.prompt_file='prompts/nope.txt': file not found"),
    "template_without_trace": (SELF + ["distillation.context_distillation.teacher_prefix_template='Solve {problem}.'"],
                               "must contain {problem} and {trace}"),
    "cd_rollout_turns": (SELF + ["distillation.max_rollout_turns=2"],
                         "requires distillation.max_rollout_turns == 1"),
    "cd_model_names": (SELF + ["teacher.model_name=Qwen/Qwen3-4B"],
                       "requires policy.model_name == teacher.model_name"),
    "cd_mode": (SELF + ["distillation.context_distillation.mode=online"],
                "distillation.context_distillation.mode to be self_frozen"),
    "cd_alignment": (SELF + ["distillation.context_distillation.alignment=retokenize"],
                     "distillation.context_distillation.alignment to be response_token_index"),
    "cd_problem_source": (SELF + ["distillation.context_distillation.problem_source=student_prompt"],
                          "distillation.context_distillation.problem_source to be original_user_problem"),
    "cd_overflow_policy": (SELF + ["distillation.context_distillation.overflow_policy=truncate"],
                           "overflow_policy to be truncate_prefix_only or truncate_prefix_from_end "
                           "or shorten_trace"),
    "cd_missing_policy": (SELF + ["distillation.context_distillation.trace_extractor.missing_trace_policy=skip"],
                          "missing_trace_policy to be empty or drop_sample"),
    "unknown_key": (["conf=smoke", "distillation.max_num_step=5"],
                    "unknown key distillation.max_num_step (command line). Did you mean: distillation.max_num_steps"),
    "refused_runbook_key": (["conf=smoke", "+policy.megatron_cfg.enabled=true"], "not used by Sluice"),
    "bad_type": (["conf=smoke", "distillation.max_num_steps=many"], "distillation.max_num_steps"),
    "unknown_recipe": (["conf=qwen3-14b-4", ], "Did you mean: qwen3-14b-4b"),
    "kl_type": (["conf=smoke", "loss_fn.kl_type=gkd"], "use one of: forward, reverse, mixed, jsd, sampled_reverse"),
    "jsd_beta": (["conf=smoke", "loss_fn.kl_type=jsd", "loss_fn.jsd_beta=1.0"], "the JSD interpolation must be strictly between 0 and 1"),
    "queue_compression": (["conf=smoke", "queue.compression=gzip"], "queue.compression='gzip': unsupported value"),
    "batch_not_dividing": (["conf=smoke", "policy.train_global_batch_size=5"],
                           "must divide the samples of a step"),
    "checkpoint_dir": (["conf=smoke", "checkpointing.checkpoint_dir=/scratch/ckpt"],
                       "checkpoints are always RUN_DIR/checkpoints"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_validation_error(case, capsys, tmp_path):
    args, expected = ERROR_CASES[case]
    code, err = run_cli(args, capsys, tmp_path)
    assert code == 2
    assert expected in err, err
    assert err.count("\n") <= 2, f"one clear message, got:\n{err}"


@pytest.mark.parametrize("content,count", [("Solve: {} and {}", "found 2"), ("Solve it.", "found 0"),
                                           ("Solve {problem}", "found 1 placeholder(s) ['problem']")])
def test_prompt_file_placeholders(content, count, capsys, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text(content)
    code, err = run_cli(["conf=smoke", f"data.default.prompt_file={prompt}"], capsys, tmp_path)
    assert code == 2 and "exactly one {} placeholder" in err and count in err, err


def test_literal_braces_allowed_in_prompt(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Answer in \\boxed{{}}.\n{}")
    cfg, _ = load("smoke", [f"data.default.prompt_file={prompt}"])
    validate(cfg)


def test_user_yaml_can_extend_a_recipe(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("defaults:\n  - qwen3-14b-4b\n  - _self_\ndistillation:\n  max_num_steps: 7\n")
    # A user recipe outside conf/ may still name Sluice's recipes through the search path.
    cfg, _ = load(str(mine))
    assert cfg.distillation.max_num_steps == 7 and cfg.teacher.model_name == "Qwen/Qwen3-14B"


def test_errors_exit_2_in_a_real_process(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "launch.run", "conf=qwen3-32b-4b-isolated", "cluster.num_nodes=2",
         f"launch.run_dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert out.returncode == 2
    assert "must exactly partition cluster nodes" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_missing_model_fails_real_launch(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, err = run_cli(["conf=qwen3-14b-4b"], capsys, tmp_path)
    assert code == 2
    assert "policy.model_name='Qwen/Qwen3-4B': model not found" in err
    assert "huggingface-cli download Qwen/Qwen3-4B" in err


def test_plan_single_node_split_has_distinct_gpus():
    cfg, _ = load("qwen3-32b-1.7b")
    p = make_plan(cfg)
    ids = sorted(g for r in p.roles.values() for g in r.gpu_ids[0])
    assert ids == [0, 1, 2, 3]


def _field_paths(cls, prefix=""):
    """(dotted path, field name) of every leaf field of the config tree."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(t)]
        if inner:
            yield from _field_paths(inner[0], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f.name


def test_every_config_field_is_read_or_accepted_for_compatibility():
    """A key is read by the code (an attribute access `.name` or a string "name" outside
    shared/config.py), or listed in shared.config.COMPATIBILITY_ONLY, which lists only keys
    nothing reads."""
    import fnmatch
    import re

    from shared.config import COMPATIBILITY_ONLY, SluiceConfig

    code = "".join(p.read_text() for folder in ("shared", "stages", "launch")
                   for p in sorted((REPO_ROOT / folder).rglob("*.py")) if p.name != "config.py")
    code += (REPO_ROOT / "bench" / "synthetic.py").read_text()  # synthetic.*: the synthetic workers
    compat = lambda path: any(fnmatch.fnmatchcase(path, pat) for pat in COMPATIBILITY_ONLY)  # noqa: E731
    unread, listed_but_read = [], []
    for path, name in _field_paths(SluiceConfig):
        read = re.search(rf"\.{re.escape(name)}\b(?!\()|[\"']{re.escape(name)}[\"']", code) is not None
        if not read and not compat(path):
            unread.append(path)
        if read and compat(path):
            listed_but_read.append(path)
    assert not unread, f"config fields nothing reads (implement, refuse, or list in COMPATIBILITY_ONLY): {unread}"
    assert not listed_but_read, f"listed in COMPATIBILITY_ONLY but read: {listed_but_read}"
    paths = [p for p, _ in _field_paths(SluiceConfig)]
    for pattern in COMPATIBILITY_ONLY:
        assert any(fnmatch.fnmatchcase(p, pattern) for p in paths), pattern


def _choice_fields(cls, prefix=""):
    """(dotted path, allowed values) of every fixed-choice key of the config tree: a field
    annotated Annotated[str, Literal[...]] (shared/config.py), None included when optional."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        parts = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        nested = [t for t in parts if dataclasses.is_dataclass(t)]
        if nested:
            yield from _choice_fields(nested[0], f"{prefix}{f.name}.")
            continue
        for t in parts:
            if typing.get_origin(t) is typing.Annotated:
                literal = next(m for m in t.__metadata__ if typing.get_origin(m) is typing.Literal)
                none = (None,) if type(None) in parts else ()
                yield prefix + f.name, none + typing.get_args(literal)


def test_every_choice_key_is_checked_before_submission():
    """A value outside a choice key's Literal is refused by validate, naming the key and a
    valid value (context distillation's keys: when it is enabled)."""
    import typing

    from shared.config import KLType, SluiceConfig
    from shared.errors import ConfigError

    choices = dict(_choice_fields(SluiceConfig))
    assert choices["loss_fn.kl_type"] == typing.get_args(KLType)
    assert choices["queue.compression"] == (None, "zstd")
    checked = []
    for path, allowed in choices.items():
        if path.startswith("teacher.optimizer."):  # the teacher does not train
            continue
        cfg, _ = load("context-self-qwen3-0.6b" if ".context_distillation." in path else "smoke")
        *parents, name = path.split(".")
        owner = cfg
        for p in parents:
            owner = getattr(owner, p, None)
        if owner is None:  # under teacher.generation: the teacher samples nothing
            continue
        setattr(owner, name, "not-a-choice")
        with pytest.raises(ConfigError) as exc:
            validate(cfg)
        assert exc.value.key == path, exc.value.message
        assert any(f"{a}" in exc.value.fix for a in allowed), exc.value.message  # names a valid value
        checked.append(path)
    assert {"policy.precision", "teacher.precision", "policy.generation.vllm_cfg.precision",
            "loss_fn.kl_type", "cluster.memory_check", "launch.executor",
            "distillation.context_distillation.trace_extractor.missing_trace_policy"} <= set(checked)
