#!/usr/bin/env bash
# Submit MedDINOv3 pretraining stages 1 -> 2 -> 3 as SLURM jobs chained with `afterok` dependencies: a stage starts
# only when the previous one completed successfully (a requeued stage keeps its dependants waiting).
#
#   slurm/pipeline.sh [sbatch options ...] [-- key=value ...]
#
#   sbatch options   passed to every stage (e.g. -p gpu -A proj --nodes 8 --time 24:00:00)
#   key=value        config overrides passed to every stage (after `--`)
#   --wait           (an sbatch option too) return when the last stage ends; exit status = its status
#
# Environment (plus everything slurm/common.sh reads, e.g. MEDDINO_OUTPUT_ROOT, MEDDINO_DATA, MEDDINO_INIT_FROM):
#   MEDDINO_STAGES             stages to submit, in order            [1 2 3]
#   MEDDINO_STAGE<N>_CONFIG    config file(s) of stage N             [configs/pretrain/stage<N>.yaml]
#   MEDDINO_STAGE<N>_OVERRIDES extra key=value overrides of stage N (space separated)
#   MEDDINO_STAGE<N>_SBATCH    extra sbatch options of stage N (space separated, e.g. "--time 4:00:00")
#   MEDDINO_AFTER              job id the first stage waits for (afterok)
# Prints one line per stage: `stage<N> <job id>`.
set -euo pipefail

SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# MEDDINO_INIT_FROM only means something for the stage that starts the chain; later stages continue it
first_init_from="${MEDDINO_INIT_FROM:-}"
unset MEDDINO_INIT_FROM

sbatch_opts=()
overrides=()
wait_last=0
while (($#)); do
    case "$1" in
        --) shift; overrides=("$@"); break ;;
        --wait | -W) wait_last=1; shift ;;
        -h | --help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) sbatch_opts+=("$1"); shift ;;
    esac
done

# one output root for all stages, fixed now (each stage finds its predecessor's run under it)
export MEDDINO_OUTPUT_ROOT="${MEDDINO_OUTPUT_ROOT:-$PWD/runs/pretrain}"
export MEDDINO_ROOT="${MEDDINO_ROOT:-$(cd "$SLURM_DIR/.." && pwd)}"

read -r -a stages <<<"${MEDDINO_STAGES:-1 2 3}"
previous="${MEDDINO_AFTER:-}"
last_index=$((${#stages[@]} - 1))
for i in "${!stages[@]}"; do
    n="${stages[$i]}"
    script="$SLURM_DIR/stage${n}.sh"
    [[ -f "$script" ]] || { echo "pipeline: no such stage script: $script" >&2; exit 2; }
    config_var="MEDDINO_STAGE${n}_CONFIG"
    overrides_var="MEDDINO_STAGE${n}_OVERRIDES"
    sbatch_var="MEDDINO_STAGE${n}_SBATCH"
    # shellcheck disable=SC2206  # space-separated option lists are split on purpose
    stage_sbatch=(${!sbatch_var:-})
    # shellcheck disable=SC2206
    stage_overrides=(${!overrides_var:-})
    opts=(--parsable "${sbatch_opts[@]}" "${stage_sbatch[@]}")
    if [[ -n "$previous" ]]; then opts+=("--dependency=afterok:${previous}" --kill-on-invalid-dep=yes); fi
    if ((wait_last && i == last_index)); then opts+=(--wait); fi
    # sbatch captures the environment at submission: set this stage's settings for its call only
    stage_env=()
    if [[ -n "${!config_var:-}" ]]; then stage_env+=("MEDDINO_CONFIG=${!config_var}"); fi
    if ((i == 0)) && [[ -n "$first_init_from" ]]; then stage_env+=("MEDDINO_INIT_FROM=$first_init_from"); fi
    if ((wait_last && i == last_index)); then
        printf 'stage%s ' "$n"  # sbatch --parsable prints the id on submission, then waits
        env "${stage_env[@]}" sbatch "${opts[@]}" "$script" "${overrides[@]}" "${stage_overrides[@]}"
        exit $?
    fi
    job_id="$(env "${stage_env[@]}" sbatch "${opts[@]}" "$script" "${overrides[@]}" "${stage_overrides[@]}")"
    job_id="${job_id%%;*}"  # --parsable prints "id[;cluster]"
    echo "stage${n} ${job_id}"
    previous="$job_id"
done
