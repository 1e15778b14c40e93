#!/usr/bin/env bash
# MedDINOv3 preflight on one node with all its GPUs: every pretraining stage of the shipped configs (bf16, compile,
# activation checkpointing in stage 3, the real batch plan) for a few iterations on real CT, a bitwise/tolerance
# resume check, throughput, memory, MFU and the projected wall-clock of each stage, then one finetune step and one
# 896 px sliding-window inference. Minutes, not days: run it before queueing slurm/pipeline.sh.
#
#   sbatch slurm/preflight.sh [--out DIR] [key=value ...]      # default DIR: runs/preflight
#   sbatch -p gpu -A proj slurm/preflight.sh data.shards=/data/ct3m compute.distributed=fsdp
#
# Result: DIR/preflight.json and a table in the job log; the job fails (non-zero exit) naming every failed check.
# Site settings as for the stage scripts (MEDDINO_ROOT, MEDDINO_PYTHON, MEDDINO_SRUN_ARGS; see slurm/common.sh).
#SBATCH --job-name=meddino-preflight
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)" || true
for dir in ${MEDDINO_ROOT:+"$MEDDINO_ROOT/slurm"} "$(dirname "${submitted:-.}")" "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-$PWD}/slurm"; do
    # shellcheck source=slurm/common.sh
    if [[ -f "$dir/common.sh" ]]; then source "$dir/common.sh"; break; fi
done
declare -F meddino_launch >/dev/null || { echo "[meddino-slurm] error: slurm/common.sh not found; set MEDDINO_ROOT" >&2; exit 1; }

out="${SLURM_SUBMIT_DIR:-$PWD}/runs/preflight"
if [[ "${1:-}" == "--out" ]]; then out="$2"; shift 2; fi
meddino_run_module pretrain.preflight --out "$out" "$@"
