#!/usr/bin/env bash
# MedDINOv3 finetuning on SLURM: one array task per (task, fold), each `finetune/run.py` on one GPU, or DDP over the
# GPUs of its node (`--gpus-per-node N`: torchrun starts N processes; data.batch_size stays the GLOBAL batch).
#
#   sbatch --array=0-3 slurm/finetune.sh [key=value ...]          # 4 tasks x fold 0 (the defaults below)
#   MEDDINO_FT_TASKS="kits23 lits" MEDDINO_FT_FOLDS="0 1 2 3 4" sbatch --array=0-9 slurm/finetune.sh
#   sbatch --array=0-3 --gpus-per-node 4 slurm/finetune.sh       # DDP: 4 GPUs per (task, fold)
#   slurm/finetune.sh --print-array                              # the --array range for the current settings
#
# Array index i -> task MEDDINO_FT_TASKS[i / n_folds], fold MEDDINO_FT_FOLDS[i % n_folds] (no array: index 0).
# Re-running a (task, fold) resumes its training (train.resume=auto), so --requeue after a preemption continues.
# Environment (plus MEDDINO_ROOT, MEDDINO_PYTHON and MEDDINO_DEVICE=cpu as in slurm/common.sh):
#   MEDDINO_FT_TASKS        registered task names or nnU-Net raw folders   [amos22_ct_mri kits23 lits btcv]
#   MEDDINO_FT_FOLDS        folds                                          [0]
#   MEDDINO_FT_HEAD         head                                           [primus]
#   MEDDINO_FT_CHECKPOINT   backbone weights (--checkpoint); unset = the config's model.init
#   MEDDINO_FT_WEIGHTS      meddinov3 | dinov3: origin of the weights (encoder lr)
#   MEDDINO_FT_OUTPUT_ROOT  runs go to <root>/<task>/<head>/fold_<k>     [$SLURM_SUBMIT_DIR/runs/finetune]
#   MEDDINO_FT_CONFIG       extra --config files, space separated
#   MEDDINO_DATA            dataset root of the registered tasks (their dataset_dir is $MEDDINO_DATA/<task>)
#   MEDDINO_OVERRIDES       extra key=value overrides, space separated (script arguments are appended after them)
#SBATCH --job-name=meddino-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail

# sbatch runs a spooled copy of this file: find slurm/common.sh as the stage scripts do (an array's record lists
# every element, hence the first Command= only).
submitted="$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)" || true
for dir in ${MEDDINO_ROOT:+"$MEDDINO_ROOT/slurm"} "$(dirname "${submitted:-.}")" "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-$PWD}/slurm"; do
    # shellcheck source=slurm/common.sh
    if [[ -f "$dir/common.sh" ]]; then source "$dir/common.sh"; break; fi
done
declare -F meddino_log >/dev/null || { echo "[meddino-slurm] error: slurm/common.sh not found; set MEDDINO_ROOT" >&2; exit 1; }

read -r -a tasks <<<"${MEDDINO_FT_TASKS:-amos22_ct_mri kits23 lits btcv}"
read -r -a folds <<<"${MEDDINO_FT_FOLDS:-0}"
((${#tasks[@]} && ${#folds[@]})) || meddino_die "MEDDINO_FT_TASKS and MEDDINO_FT_FOLDS must not be empty"
n_jobs=$((${#tasks[@]} * ${#folds[@]}))
if [[ "${1:-}" == "--print-array" ]]; then echo "0-$((n_jobs - 1))"; exit 0; fi

index="${SLURM_ARRAY_TASK_ID:-0}"
((index >= 0 && index < n_jobs)) \
    || meddino_die "array index $index out of range: ${#tasks[@]} task(s) x ${#folds[@]} fold(s) = --array=0-$((n_jobs - 1))"
task="${tasks[$((index / ${#folds[@]}))]}"
fold="${folds[$((index % ${#folds[@]}))]}"
head="${MEDDINO_FT_HEAD:-primus}"
output_root="${MEDDINO_FT_OUTPUT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/runs/finetune}"
output_dir="$output_root/$(basename "$task")/$head/fold_$fold"
mkdir -p "$output_dir"

root="$MEDDINO_ROOT"
python="$(meddino_python)"
args=(--task "$task" --head "$head" --fold "$fold" --output "$output_dir")
if [[ -n "${MEDDINO_FT_CHECKPOINT:-}" ]]; then
    [[ -f "$MEDDINO_FT_CHECKPOINT" ]] || meddino_die "MEDDINO_FT_CHECKPOINT not found: $MEDDINO_FT_CHECKPOINT"
    args+=(--checkpoint "$MEDDINO_FT_CHECKPOINT")
fi
if [[ -n "${MEDDINO_FT_WEIGHTS:-}" ]]; then args+=(--weights "$MEDDINO_FT_WEIGHTS"); fi
# shellcheck disable=SC2206  # space-separated lists of files / overrides are split on purpose
extra_configs=(${MEDDINO_FT_CONFIG:-})
for config in "${extra_configs[@]}"; do
    [[ -f "$config" ]] || meddino_die "config not found: $config (MEDDINO_FT_CONFIG)"
    args+=(--config "$config")
done
# shellcheck disable=SC2206
env_overrides=(${MEDDINO_OVERRIDES:-})
args+=("${env_overrides[@]}" "$@")

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
if [[ "${MEDDINO_DEVICE:-}" == "cpu" || "${SLURM_GPUS_PER_NODE:-}" == "0" ]]; then
    export CUDA_VISIBLE_DEVICES=""
fi
# processes on this node: one per allocated GPU (SLURM_GPUS_ON_NODE), or MEDDINO_FT_NPROC (e.g. CPU/gloo tests)
nproc="${MEDDINO_FT_NPROC:-${SLURM_GPUS_ON_NODE:-1}}"
[[ "${CUDA_VISIBLE_DEVICES-unset}" == "" && -z "${MEDDINO_FT_NPROC:-}" ]] && nproc=1
meddino_log "finetune ${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}_${index}: task $task fold $fold head $head, $nproc process(es) -> $output_dir"
cd "$root"
if ((nproc > 1)); then
    exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" finetune/run.py "${args[@]}"
fi
exec "$python" finetune/run.py "${args[@]}"
