"""Every command the README shows is accepted by the tool it names, and is exercised by a named test or the demo.

A README that drifts from the code is the first thing a new user trips over. This test reads every command from the
README's ``bash`` blocks and its reproduction tables, then checks, without running anything heavy:

- the entry point exists (script, module, Makefile target, SLURM script);
- every ``--flag`` is one the tool's own ``--help`` lists;
- every ``key=value`` override names a key of the configs it merges into;
- the entry point is in :data:`EXERCISED_BY`, which names the test(s) that run it for real, and those tests exist.
A new README command therefore fails here until someone says which test exercises it.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"

# entry point -> (module, function taking argv) used to print its --help
HELP_OF = {
    "data_curation/build_ct3m.py": ("data_curation.build_ct3m", "parse_args"),
    "pretrain.train": ("pretrain.train.__main__", "parse_args"),
    "pretrain.pipeline": ("pretrain.pipeline", "parse_args"),
    "pretrain.preflight": ("pretrain.preflight", "parse_args"),
    "finetune.preflight": ("finetune.preflight", "main"),
    "torchrun pretrain.preflight": ("pretrain.preflight", "parse_args"),
    "pretrain.submit": ("pretrain.submit", "parse_args"),
    "finetune/run.py": ("finetune.run", "parse_args"),
    "meddino-finetune": ("finetune.run", "parse_args"),
    "finetune/predict.py": ("finetune.predict", "main"),
    "meddino-predict": ("finetune.predict", "main"),
    "finetune.metrics": ("finetune.metrics", "main"),
    "finetune.demo": ("finetune.demo", "main"),
    "pretrain.models.summary": ("pretrain.models.summary", "main"),
    "pretrain.models.export": ("pretrain.models.export", "main"),
    "pretrain.visualize": ("pretrain.visualize.cli", "main"),
}

# entry point -> configs its key=value overrides apply to (merged in order)
CONFIGS_OF = {
    "pretrain.train": ["configs/pretrain/base.yaml"],
    "pretrain.pipeline": ["configs/pretrain/base.yaml"],
    "pretrain.preflight": ["configs/pretrain/base.yaml"],
    "torchrun pretrain.preflight": ["configs/pretrain/base.yaml"],
    "slurm/preflight.sh": ["configs/pretrain/base.yaml"],
    "pretrain.submit": ["configs/pretrain/base.yaml"],
    "slurm/stage1.sh": ["configs/pretrain/base.yaml"],
    "finetune/run.py": ["configs/finetune/base.yaml", "configs/finetune/heads/primus.yaml"],
    "finetune/predict.py": ["configs/finetune/base.yaml", "configs/finetune/predict.yaml"],
    "meddino-finetune": ["configs/finetune/base.yaml", "configs/finetune/heads/primus.yaml"],
}

# entry point -> tests that run it for real (path::test function)
EXERCISED_BY = {
    "make demo": ["tests/finetune/test_demo.py::test_demo_runs_end_to_end_and_says_where_outputs_are"],
    "make test": ["tests/test_readme.py::test_make_targets_exist"],  # and CI itself: .ci/run is `make test`
    "data_curation/build_ct3m.py": ["tests/data_curation/test_build_ct3m.py::test_sample_build_reads_back",
                                    "tests/data_curation/test_build_ct3m.py::test_list_sources_and_dry_run",
                                    "tests/data_curation/test_build_ct3m.py::test_holdout_finetune_uses_the_nnunet_split",
                                    "tests/data_curation/test_build_ct3m.py::test_mistyped_root_and_empty_root_are_errors",
                                    "tests/data_curation/test_build_ct3m.py::test_failures_filtered_and_exit_code"],
    "pretrain.train": ["tests/pretrain/test_distributed.py::test_two_gloo_processes_equal_one_process_with_the_same_global_batch",
                       "tests/pretrain/test_meta_arch.py::test_init_from_official_weights_sets_student_and_teacher",
                       "tests/pretrain/test_full_scale_path.py::test_plan_cli_prints_the_plan_without_data_or_weights"],
    "pretrain.preflight": ["tests/pretrain/test_preflight.py::test_tiny_preflight_of_every_stage_and_the_finetune_step_passes",
                           "tests/pretrain/test_preflight.py::test_an_unreachable_batch_fails_naming_the_stage_and_the_check"],
    "torchrun pretrain.preflight": ["tests/pretrain/test_preflight.py::test_a_cpu_tensor_in_a_collective_fails_the_collectives_check"],
    "finetune.preflight": ["tests/pretrain/test_preflight.py::test_tiny_preflight_of_every_stage_and_the_finetune_step_passes"],
    "slurm/preflight.sh": ["tests/pretrain/test_preflight.py::test_slurm_preflight_script_runs_the_preflight"],
    "pretrain.pipeline": ["tests/pretrain/test_train.py::test_pipeline_chains_stage2_and_stage3_after_stage1",
                          "tests/finetune/test_demo.py::test_demo_runs_end_to_end_and_says_where_outputs_are"],
    "torchrun pretrain.train": ["tests/pretrain/test_distributed.py::test_two_gloo_processes_equal_one_process_with_the_same_global_batch"],
    "slurm/stage1.sh": ["tests/slurm/test_stage_scripts.py::test_stage1_sbatch_wait_two_tasks",
                        "tests/slurm/test_stage_scripts.py::test_stage1_preemption_requeues_and_resumes"],
    "slurm/pipeline.sh": ["tests/slurm/test_stage_scripts.py::test_pipeline_runs_stages_in_order"],
    "pretrain.submit": ["tests/slurm/test_submit.py::test_submitit_tiny_run_preempted_and_resumed"],
    "finetune/run.py": ["tests/finetune/test_run.py::test_run_writes_model_predictions_and_metrics",
                        "tests/finetune/test_tasks.py::test_amos22_owners_layout_keeps_ct_only",
                        "tests/finetune/test_tasks.py::test_btcv_kits23_lits_layouts",
                        "tests/finetune/test_heads_mvr.py", "tests/finetune/test_heads_med3d.py",
                        "tests/finetune/test_heads_window3d.py"],
    "finetune/predict.py": ["tests/finetune/test_run.py::test_predict_nifti_and_dicom_keep_original_geometry",
                            "tests/finetune/test_predict.py::test_mr_dicom_is_refused_unless_forced"],
    "meddino-finetune": ["tests/finetune/test_install.py::test_readme_finetune_and_predict_from_another_folder"],
    "meddino-predict": ["tests/finetune/test_install.py::test_readme_finetune_and_predict_from_another_folder"],
    "finetune.metrics": ["tests/finetune/test_metrics.py::test_compare_cli_puts_our_numbers_next_to_the_papers"],
    "slurm/finetune.sh": ["tests/slurm/test_finetune_scripts.py::test_finetune_array_on_the_cluster",
                          "tests/slurm/test_finetune_scripts.py::test_finetune_array_index_runs_its_task_and_fold"],
    "slurm/reproduce.sh": ["tests/slurm/test_finetune_scripts.py::test_reproduce_chains_stages_finetunes_and_table",
                           "tests/slurm/test_finetune_scripts.py::test_reproduce_on_the_cluster"],
    "finetune.demo": ["tests/finetune/test_demo.py::test_demo_runs_end_to_end_and_says_where_outputs_are"],
    "pretrain.models.summary": ["tests/pretrain/test_summary.py::test_cli_prints_parameters_and_gflops"],
    "pretrain.models.export": ["tests/pretrain/test_checkpoint.py::test_export_cli"],
    "pretrain.visualize": ["tests/pretrain/test_visualize.py::test_pca_cli_writes_png",
                           "tests/pretrain/test_visualize.py::test_similarity_cli_several_checkpoints"],
}


def _strip_comment(line: str) -> str:
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def readme_commands() -> list[str]:
    """Commands from ```bash blocks (continuations joined, comments dropped) and from the reproduction tables."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = _strip_comment(line)
            if line:
                commands.append(line)
    previous = None
    prose = re.sub(r"```.*?```", " ", text, flags=re.S).replace("\n", " ")
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if span.startswith(("finetune/run.py ", "python -m ")):
            commands.append(span)
            previous = span.split(" --")[0].split()[0] if span.startswith("finetune/") else None
        elif span.startswith("... --") and previous:
            commands.append(previous + span[3:])
    return commands


def _tokens(command: str) -> list[str]:
    """shell words; README notation: ``[--opt]`` optional, ``a|b`` alternatives (first taken), ``...`` elided."""
    out = []
    for tok in shlex.split(re.sub(r"\[(--[^\]]*)\]", r"\1", command)):
        if tok == "...":
            continue
        out.append(tok.split("|")[0] if "|" in tok else tok)
    return out


def parse_command(command: str) -> tuple[str, list[str]]:
    """(entry point, its arguments) of one README command."""
    toks = _tokens(command)
    head = toks[0]
    if head == "make":
        return f"make {toks[1]}", toks[2:]
    if head in ("sbatch", "bash") or head.endswith(".sh"):
        i = next(i for i, t in enumerate(toks) if t.endswith(".sh"))
        return toks[i], toks[i + 1:]
    if head == "torchrun":
        i = toks.index("-m")
        return f"torchrun {toks[i + 1]}", toks[i + 2:]
    if head == "python":
        toks = toks[1:]
    if toks[0] == "-m":
        return toks[1], toks[2:]
    return toks[0], toks[1:]


COMMANDS = readme_commands()


def test_readme_has_the_commands_we_expect():
    entries = {parse_command(c)[0] for c in COMMANDS}
    assert {"make demo", "make test", "data_curation/build_ct3m.py", "pretrain.train", "finetune/run.py"} <= entries
    assert len(COMMANDS) >= 15, COMMANDS


def test_make_targets_exist():
    makefile = (REPO_ROOT / "Makefile").read_text()
    for target in ("demo", "test", "test-fast", "evidence"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
    # the full suite is what CI runs; test-fast only deselects the slow end-to-end tests
    assert re.search(r"^test:.*\n\t\$\(PY\) -m pytest \$\(ARGS\)$", makefile, flags=re.M)
    assert re.search(r'^test-fast:.*\n\t\$\(PY\) -m pytest -m "not slow" \$\(ARGS\)$', makefile, flags=re.M)


def _help_text(entry: str, args: list[str]) -> str:
    module, fn_name = HELP_OF[entry]
    fn = getattr(importlib.import_module(module), fn_name)
    sub = [args[0]] if entry in ("pretrain.visualize", "finetune.metrics") else []
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        fn([*sub, "--help"])
    assert exit_info.value.code in (0, None)
    return buf.getvalue()


def _config_has(files: list[str], key: str) -> bool:
    cfg = OmegaConf.merge(*[OmegaConf.load(REPO_ROOT / f) for f in files])
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return node is not None and leaf in node


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_is_accepted_and_exercised(command: str):
    entry, args = parse_command(command)
    script = entry.split()[-1]
    if entry.startswith("make "):
        assert re.search(rf"^{entry.split()[1]}:", (REPO_ROOT / "Makefile").read_text(), flags=re.M), command
    elif script.endswith((".py", ".sh")):
        assert (REPO_ROOT / script).is_file(), f"{command}: {script} does not exist"
    if script in HELP_OF:
        help_text = _help_text(script, args)
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), f"{command}: {flag} is not an option of {script}"
    if script in CONFIGS_OF:
        for key in (a.split("=")[0] for a in args if "=" in a and not a.startswith("-")):
            key = key.split(":")[-1]  # pipeline's stageN:key=value
            assert _config_has(CONFIGS_OF[script], key), f"{command}: no config key {key!r} in {CONFIGS_OF[script]}"
    tests = EXERCISED_BY.get(entry)
    assert tests, f"README command {command!r} ({entry}) is exercised by no test: add it to EXERCISED_BY"
    for node in tests:
        path, _, name = node.partition("::")
        source = (REPO_ROOT / path).read_text()
        assert not name or re.search(rf"^def {name}\(", source, flags=re.M), f"{node} does not exist"
