#!/usr/bin/env bash
# The paper's Table 2 on SLURM in one command: pretraining stages 1 -> 2 -> 3 (slurm/pipeline.sh), then the four
# Table 2 finetunes from the final teacher (one slurm/finetune.sh array, afterok on the last stage), then one job
# (afterok on the whole array) that prints our numbers next to the paper's and writes them to
# <finetune root>/table2.md (`python -m finetune.metrics compare`).
#
#   slurm/reproduce.sh [sbatch options for every job ...] [-- pretraining key=value ...]
#   MEDDINO_INIT_FROM=/w/dinov3_vitb16.pth MEDDINO_DATA=/data/ct3m MEDDINO_FT_DATA=/data/finetune \
#       slurm/reproduce.sh -p gpu -A myproj
#
#   sbatch options   given to every job (partition, account, ...); per-kind options below
#   key=value        pretraining overrides (after `--`), as slurm/pipeline.sh
# Environment (plus everything slurm/pipeline.sh, slurm/common.sh and slurm/finetune.sh read):
#   MEDDINO_FT_DATA         dataset root of the finetune tasks (becomes the finetune jobs' MEDDINO_DATA, which
#                           the task configs read; MEDDINO_DATA itself is the pretraining shards)  [data]
#   MEDDINO_FT_TASKS        [amos22_ct_mri kits23 lits btcv] (the paper's AMOS22 is 300 CT + 60 MRI)
#   MEDDINO_FT_FOLDS        [0] (the paper: one fold of nnU-Net's 5-fold split)
#   MEDDINO_FT_SBATCH       extra sbatch options of the finetune array (space separated, e.g. "--gpus-per-node 4")
#   MEDDINO_FT_CHECKPOINT   backbone to finetune  [$MEDDINO_OUTPUT_ROOT/stage<last>/teacher_backbone.pth]
#   MEDDINO_FT_OUTPUT_ROOT  [$MEDDINO_OUTPUT_ROOT/../finetune]
#   MEDDINO_SKIP_PRETRAIN=1 submit only the finetunes and the table (from MEDDINO_FT_CHECKPOINT)
# Prints one line per job: `stage<N> <id>` (from pipeline.sh), `finetune <array id>`, `table <id>`.
set -euo pipefail

SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MEDDINO_ROOT="${MEDDINO_ROOT:-$(cd "$SLURM_DIR/.." && pwd)}"
export MEDDINO_OUTPUT_ROOT="${MEDDINO_OUTPUT_ROOT:-$PWD/runs/pretrain}"

sbatch_opts=()
overrides=()
while (($#)); do
    case "$1" in
        --) shift; overrides=("$@"); break ;;
        -h | --help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) sbatch_opts+=("$1"); shift ;;
    esac
done

last_stage=""
if [[ "${MEDDINO_SKIP_PRETRAIN:-0}" != "1" ]]; then
    pipeline_out="$("$SLURM_DIR/pipeline.sh" "${sbatch_opts[@]}" -- "${overrides[@]}")"
    echo "$pipeline_out"
    last_line="$(grep -E '^stage[0-9]+ [0-9]+' <<<"$pipeline_out" | tail -n 1)"
    [[ -n "$last_line" ]] || { echo "reproduce: slurm/pipeline.sh submitted no stage" >&2; exit 2; }
    last_stage="${last_line#* }"
    stage_name="${last_line%% *}"
    checkpoint="${MEDDINO_FT_CHECKPOINT:-$MEDDINO_OUTPUT_ROOT/$stage_name/teacher_backbone.pth}"
else
    checkpoint="${MEDDINO_FT_CHECKPOINT:?MEDDINO_SKIP_PRETRAIN=1 needs MEDDINO_FT_CHECKPOINT}"
fi

read -r -a tasks <<<"${MEDDINO_FT_TASKS:-amos22_ct_mri kits23 lits btcv}"
read -r -a folds <<<"${MEDDINO_FT_FOLDS:-0}"
export MEDDINO_FT_TASKS="${tasks[*]}" MEDDINO_FT_FOLDS="${folds[*]}"
ft_root="${MEDDINO_FT_OUTPUT_ROOT:-$(dirname "$MEDDINO_OUTPUT_ROOT")/finetune}"
mkdir -p "$ft_root"
head="${MEDDINO_FT_HEAD:-primus}"
# shellcheck disable=SC2206  # space-separated option list, split on purpose
ft_sbatch=(${MEDDINO_FT_SBATCH:-})
dependency=()
if [[ -n "$last_stage" ]]; then dependency=("--dependency=afterok:$last_stage" --kill-on-invalid-dep=yes); fi
array="$("$SLURM_DIR/finetune.sh" --print-array)"
# sbatch captures the environment at submission: the finetune jobs' settings are given for this call only
ft_job="$(env MEDDINO_DATA="${MEDDINO_FT_DATA:-data}" MEDDINO_FT_CHECKPOINT="$checkpoint" \
    MEDDINO_FT_WEIGHTS="${MEDDINO_FT_WEIGHTS:-meddinov3}" MEDDINO_FT_OUTPUT_ROOT="$ft_root" \
    sbatch --parsable "--array=$array" "${dependency[@]}" "${sbatch_opts[@]}" "${ft_sbatch[@]}" \
    "$SLURM_DIR/finetune.sh")"
ft_job="${ft_job%%;*}"
echo "finetune $ft_job"

python="${MEDDINO_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$MEDDINO_ROOT/.venv/bin/python" ]]; then python="$MEDDINO_ROOT/.venv/bin/python"; else python="python3"; fi
fi
runs=()
for task in "${tasks[@]}"; do
    for fold in "${folds[@]}"; do runs+=("$ft_root/$(basename "$task")/$head/fold_$fold"); done
done
printf -v compare '%q ' "$python" -m finetune.metrics compare "${runs[@]}" --out "$ft_root/table2.md"
table_job="$(sbatch --parsable --job-name=meddino-table2 "--dependency=afterok:$ft_job" --kill-on-invalid-dep=yes \
    "${sbatch_opts[@]}" --nodes=1 --ntasks=1 --cpus-per-task=1 --time=30 --output="$ft_root/table2-%j.out" \
    --wrap "cd $(printf '%q' "$MEDDINO_ROOT") && PYTHONPATH=$(printf '%q' "$MEDDINO_ROOT") $compare")"
table_job="${table_job%%;*}"
echo "table $table_job"
echo "our numbers next to the paper's: $ft_root/table2.md (when job $table_job has run)"
