"""Submit a pretraining stage to SLURM with submitit: ``python -m pretrain.submit --nodes N --config ...``.

    python -m pretrain.submit --nodes 4 --config configs/pretrain/stage1.yaml --output-dir runs/stage1 \\
        [--gpus-per-node 8] [--partition P] [--account A] [--timeout-min 2880] [--wait] [key=value ...]

For users who prefer submitit over ``sbatch slurm/stage1.sh``; both run the same trainer the same way: SLURM
starts one task per GPU, and every task runs ``python -m pretrain.train`` as a child process that reads its rank,
world size, local rank and master from SLURM's environment (``pretrain/train/distributed.py``).

Preemption and time limits use submitit's ``checkpoint()`` protocol. SLURM sends SIGUSR1 (``--signal``) to every
process of the job; the trainer finishes its current iteration and writes a checkpoint (with its own
``scontrol requeue`` switched off, ``train.requeue_on_preemption=false``); submitit then calls
:meth:`TrainingJob.checkpoint` on rank 0, which waits for that checkpoint and returns the resubmission
(``--resume auto``); submitit requeues the job and the requeued tasks resume from the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

# submitit reads the preemption signal when it is imported (here and in the job, which inherits the environment).
# USR1 is what slurm/stage*.sh use and what the trainer handles.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")

import submitit  # noqa: E402 - after the signal choice above

REPO_ROOT = Path(__file__).resolve().parents[1]
PREEMPT_WAIT_S = 1800.0  # rank > 0 after a preemption: wait this long for the requeue to end the job


@dataclass
class TrainingJob:
    """The submitted callable: one instance per task, pickled by submitit.

    ``trainer_args`` are the ``python -m pretrain.train`` arguments (always with ``--resume auto``, so a requeued
    job continues from the newest checkpoint in ``output_dir``).
    """

    trainer_args: list[str]
    output_dir: str
    python: str = sys.executable

    def __post_init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._trainer_exited = False
        self._preempted = False

    def __getstate__(self) -> dict:
        return {"trainer_args": self.trainer_args, "output_dir": self.output_dir, "python": self.python}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __call__(self) -> dict:
        """Run the trainer for this task; returns what it produced (see :func:`run_summary`)."""
        self._watch_preemption_signal()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        cmd = [self.python, "-m", "pretrain.train", *self.trainer_args]
        self._proc = subprocess.Popen(cmd, env=env)
        # Poll instead of Popen.wait(): submitit's signal handler runs checkpoint() in this thread, which must be
        # able to wait for the same child (a blocking wait() would hold Popen's lock).
        while self._proc.poll() is None:
            time.sleep(0.5)
        self._trainer_exited = True
        code = self._proc.returncode
        if self._preempted:
            # rank 0 is checkpointing/requeueing through submitit; the requeue ends this task. Returning now would
            # write this task's result file as if the run had finished.
            deadline = time.time() + PREEMPT_WAIT_S
            while time.time() < deadline:
                time.sleep(1.0)
            raise RuntimeError(f"preempted, but the job was not requeued within {PREEMPT_WAIT_S:.0f} s")
        if code != 0:
            raise RuntimeError(f"python -m pretrain.train exited with status {code}: {' '.join(cmd)}")
        return run_summary(Path(self.output_dir))

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Submitit's preemption hook (rank 0): wait for the trainer's checkpoint, then resubmit with resume."""
        self._preempted = True
        proc = self._proc
        if proc is not None and not self._trainer_exited and not _exited(proc.pid):
            try:  # SLURM signals every process of the step; make sure the trainer got it too
                os.kill(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            deadline = time.time() + PREEMPT_WAIT_S
            while not self._trainer_exited and not _exited(proc.pid) and time.time() < deadline:
                time.sleep(0.2)
        args_resume = with_resume_auto(self.trainer_args)
        return submitit.helpers.DelayedSubmission(replace(self, trainer_args=args_resume))

    def _watch_preemption_signal(self) -> None:
        """Note a preemption on every rank, then let submitit's own handler run (it acts on rank 0 only)."""
        sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR1"))
        previous = signal.getsignal(sig)

        def handler(signum, frame):
            self._preempted = True
            if callable(previous):
                previous(signum, frame)

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: submitit's handler stays as it is
            pass


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has ended (gone or a zombie), without reaping it: safe inside a signal handler that
    may have interrupted ``Popen.poll`` in the same thread."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def with_resume_auto(args: list[str]) -> list[str]:
    """``args`` with ``--resume auto`` (replacing any other ``--resume`` value)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        out.append(a)
    return [*out, "--resume", "auto"]


def run_summary(output_dir: Path) -> dict:
    """What a finished stage left in ``output_dir``: teacher export, newest checkpoint and its iteration."""
    from pretrain.train.checkpointing import list_checkpoints

    ckpts = list_checkpoints(output_dir / "checkpoints")
    teacher = output_dir / "teacher_backbone.pth"
    return {
        "output_dir": str(output_dir),
        "teacher_backbone": str(teacher) if teacher.is_file() else None,
        "last_checkpoint": str(ckpts[-1][1]) if ckpts else None,
        "iteration": ckpts[-1][0] if ckpts else 0,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pretrain.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", required=True, help="stage config(s), as for pretrain.train")
    p.add_argument("--output-dir", required=True, help="run directory (checkpoints, metrics, teacher export)")
    p.add_argument("--init-from", default=None, help="initial backbone weights (pretrain.train --init-from)")
    p.add_argument("--nodes", type=int, default=1, help="SLURM nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU-only nodes (gloo)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (data loader workers; default 8)")
    p.add_argument("--mem-gb", type=int, default=None, help="memory per node (default: the site's)")
    p.add_argument("--timeout-min", type=int, default=48 * 60,
                   help="job time limit in minutes (default 2880); preemption/timeout requeues and resumes")
    p.add_argument("--signal-delay-s", type=int, default=600, help="SIGUSR1 this long before the time limit")
    p.add_argument("--partition", default=os.environ.get("SBATCH_PARTITION"),
                   help="SLURM partition (default $SBATCH_PARTITION)")
    p.add_argument("--account", default=os.environ.get("SBATCH_ACCOUNT"), help="SLURM account (default $SBATCH_ACCOUNT)")
    p.add_argument("--qos", default=None, help="SLURM quality of service")
    p.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. a GPU type")
    p.add_argument("--job-name", default="meddino-pretrain", help="SLURM job name (default meddino-pretrain)")
    p.add_argument("--log-dir", default=None, help="submitit folder (default: OUTPUT_DIR/submitit)")
    p.add_argument("--python", default=sys.executable, help="interpreter the tasks run")
    p.add_argument("--wait", action="store_true", help="block until the job ends and print its result")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, passed to pretrain.train")
    return p.parse_args(argv)


def build_job(args: argparse.Namespace) -> TrainingJob:
    """The callable for ``args``: trainer arguments plus the override that leaves requeueing to submitit."""
    output_dir = str(Path(args.output_dir).resolve())
    trainer_args: list[str] = []
    for cfg in args.config:
        trainer_args += ["--config", str(Path(cfg).resolve())]
    trainer_args += ["--output-dir", output_dir]
    if args.init_from:
        trainer_args += ["--init-from", str(Path(args.init_from).resolve())]
    trainer_args += [*args.overrides, "train.requeue_on_preemption=false"]
    return TrainingJob(trainer_args=with_resume_auto(trainer_args), output_dir=output_dir, python=args.python)


def build_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    log_dir = Path(args.log_dir or Path(args.output_dir) / "submitit").resolve()
    executor = submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster="slurm")
    tasks_per_node = args.tasks_per_node or max(args.gpus_per_node, 1)
    params: dict = {
        "name": args.job_name,
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node,
        "cpus_per_task": args.cpus_per_task,
        "gpus_per_node": args.gpus_per_node,
        "timeout_min": args.timeout_min,
        "slurm_signal_delay_s": args.signal_delay_s,
        "slurm_additional_parameters": {"requeue": True},
        # srun (SLURM >= 22.05) does not inherit --cpus-per-task from the allocation
        "slurm_srun_args": [f"--cpus-per-task={args.cpus_per_task}"],
    }
    if args.mem_gb is not None:
        params["mem_gb"] = args.mem_gb
    for key, value in (("slurm_partition", args.partition), ("slurm_account", args.account),
                       ("slurm_qos", args.qos), ("slurm_constraint", args.constraint)):
        if value:
            params[key] = value
    executor.update_parameters(**params)
    return executor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for cfg in args.config:
        if not Path(cfg).is_file():
            raise SystemExit(f"pretrain.submit: config not found: {cfg}")
    job = build_job(args)
    try:
        executor = build_executor(args)
    except RuntimeError as err:  # submitit: no sbatch/srun on this machine
        raise SystemExit(f"pretrain.submit: cannot submit to SLURM here: {err}") from err
    submitted = executor.submit(job)
    print(f"submitted job {submitted.job_id}: logs in {submitted.paths.folder}", flush=True)
    if args.wait:
        results = submitted.results()
        print(json.dumps(results[0]), flush=True)
    return 0


if __name__ == "__main__":
    # submit pretrain.submit.TrainingJob (importable in the job), not a copy defined in __main__
    from pretrain.submit import main as _main

    sys.exit(_main())
