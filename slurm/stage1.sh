#!/usr/bin/env bash
# MedDINOv3 pretraining, stage 1: DINO + iBOT + KoLeo self-distillation on CT-3M (paper: 100k iterations, global batch 512, lr 2e-4).
#
#   sbatch slurm/stage1.sh [key=value ...]                 # from the repository root; overrides go to the trainer
#   sbatch -p PART -A ACCOUNT --nodes 8 slurm/stage1.sh    # site values: sbatch flags or SBATCH_* variables
#   MEDDINO_OUTPUT_ROOT=/scratch/run1 MEDDINO_DATA=/data/ct3m sbatch slurm/stage1.sh
#   SBATCH_GPUS_PER_NODE=0 MEDDINO_DEVICE=cpu sbatch --ntasks-per-node 2 slurm/stage1.sh   # CPU only (gloo)
#
# One task per GPU: srun starts one `python -m pretrain.train` per task; each reads its rank, world size, local
# rank and master (first node, per-job port) from SLURM's environment (pretrain/train/distributed.py).
# Preemption / time limit: slurm/common.sh sends SIGUSR1 to the tasks before the end; the trainer checkpoints
# after the current iteration and requeues the job (--requeue), which resumes with --resume auto.
# All MEDDINO_* settings are described in slurm/common.sh.
#SBATCH --job-name=meddino-stage1
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --requeue
# (no #SBATCH --signal: slurm/common.sh sends USR1 a tenth of the time limit before it ends, 30-600 s)
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# sbatch runs a spooled copy of this file: find slurm/common.sh via MEDDINO_ROOT, the path SLURM recorded at
# submission (scontrol Command=), this file's directory (run without sbatch), or the submission directory.
submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)" || true
for dir in ${MEDDINO_ROOT:+"$MEDDINO_ROOT/slurm"} "$(dirname "${submitted:-.}")" "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-$PWD}/slurm"; do
    # shellcheck source=slurm/common.sh
    if [[ -f "$dir/common.sh" ]]; then source "$dir/common.sh"; break; fi
done
declare -F meddino_launch >/dev/null || { echo "[meddino-slurm] error: slurm/common.sh not found; set MEDDINO_ROOT" >&2; exit 1; }
meddino_launch 1 "$@"
