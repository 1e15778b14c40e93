"""SLURM's warning signal as a flag, and the requeue: no torch import, so the handler is in place within
milliseconds of ``python -m pretrain.train`` starting (jobs with a short ``--time`` get their ``--signal``
warning while the process is still importing torch, and the default action of SIGUSR1 kills it).

:class:`PreemptionHandler` turns SIGUSR1 / SIGTERM into a flag that the training loop polls after each iteration
(agreed across ranks with one tiny all-reduce); the loop checkpoints, and under SLURM rank 0 calls
:func:`requeue_slurm_job` before every rank exits.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Mapping


class PreemptionHandler:
    """Records SIGUSR1 / SIGTERM (SLURM's ``--signal=USR1@s`` warning and its kill) instead of dying mid-step.

    ``requested`` becomes true on the first signal; the loop finishes the iteration, checkpoints and exits.
    Previous handlers are restored by :meth:`uninstall`.
    """

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "PreemptionHandler":
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): polling simply never fires
                pass
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def in_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get("SLURM_JOB_ID"))


def requeue_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` (call on rank 0 only). Returns whether SLURM accepted it.

    For array jobs the requeued id is ``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID``.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    scontrol = shutil.which("scontrol")
    if not job_id or not scontrol:
        return False
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        print(f"[pretrain] scontrol requeue {job_id} failed: {result.stderr.strip()}", flush=True)
        return False
    print(f"[pretrain] requeued SLURM job {job_id}", flush=True)
    return True
