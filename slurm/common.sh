# shellcheck shell=bash
# Shared by slurm/stage{1,2,3}.sh and slurm/preflight.sh (sourced, not executed): finds the repository, reads the
# site settings from the environment, and launches one `python -m pretrain.train` (or pretrain.preflight) per task
# with srun. Rank, world size, local rank and
# the master address/port are NOT computed here: every task reads them from SLURM's environment with
# pretrain/train/distributed.py (the same helper torchrun and submitit runs use).
#
# Site settings (environment; all optional; sbatch's own flags/variables cover partition, account, nodes,
# time, e.g. `sbatch -p gpu -A proj --nodes 8 slurm/stage1.sh` or SBATCH_PARTITION / SBATCH_ACCOUNT):
#   MEDDINO_ROOT          repository checkout             [the parent of this file's directory]
#   MEDDINO_PYTHON        python with the package         [$MEDDINO_ROOT/.venv/bin/python, else python3]
#   MEDDINO_CONFIG        stage config file(s), merged in order  [$MEDDINO_ROOT/configs/pretrain/stage<N>.yaml]
#   MEDDINO_OVERLAY       config overlay name, as pretrain.pipeline --overlay: merges configs/pretrain/<name>.yaml
#                         and <name>_stage<N>.yaml (if present) after the stage config (e.g. tiny)
#   MEDDINO_EXTRA_CONFIG  more YAML files merged last (space separated)
#   MEDDINO_OUTPUT_ROOT   parent of the stage dirs        [$SLURM_SUBMIT_DIR/runs/pretrain]
#   MEDDINO_OUTPUT_DIR    this stage's output dir         [$MEDDINO_OUTPUT_ROOT/stage<N>]
#   MEDDINO_DATA          CT-3M shards (data.shards)      [the config's]
#   MEDDINO_INIT_FROM     backbone weights to start from (--init-from, e.g. the official DINOv3 ViT-B/16 .pth)
#   MEDDINO_INIT_CHECKPOINT  stage N>1: checkpoint to continue   [the final checkpoint named by
#                         $MEDDINO_OUTPUT_ROOT/stage<N-1>/stage_complete.json, written only when that stage finished]
#   MEDDINO_GRAM_RUN_DIR  stage N>1: stage-1 run holding the Gram teacher  [$MEDDINO_OUTPUT_ROOT/stage1]
#   MEDDINO_OVERRIDES     extra key=value overrides, space separated (script arguments are appended after them)
#   MEDDINO_SRUN_ARGS     extra srun flags, space separated
#   MEDDINO_DEVICE=cpu    hide GPUs from the tasks (CPU/gloo); submit with `--gpus-per-node=0` or
#                         SBATCH_GPUS_PER_NODE=0 to drop the GPU request as well
#   MEDDINO_SIGNAL_LEAD_S seconds before the time limit at which the trainer gets USR1 (checkpoint, requeue)
#                         [a tenth of the job's time limit, between 30 and 600 s]
#   MEDDINO_MASTER_PORT   rendezvous port [hashed from the job and step ids into 20000-31999]
# Arguments of the batch script (`sbatch slurm/stage1.sh key=value ...`) are passed through to the trainer as
# dot-list config overrides.

meddino_log() { echo "[meddino-slurm] $*" >&2; }
meddino_die() { meddino_log "error: $*"; exit 1; }

# Seconds left before the job's time limit (squeue %L: [D-]HH:MM:SS, MM:SS or UNLIMITED); empty when unknown.
meddino_time_left_s() {
    local left days=0 h=0 m=0 s=0
    left="$(squeue -h -j "${SLURM_JOB_ID:-none}" -o %L 2>/dev/null | head -n 1)" || return 0
    [[ "$left" =~ ^([0-9]+-)?([0-9:]+)$ ]] || return 0
    [[ -n "${BASH_REMATCH[1]}" ]] && days="${BASH_REMATCH[1]%-}"
    IFS=: read -r -a parts <<<"${BASH_REMATCH[2]}"
    case "${#parts[@]}" in
        3) h="${parts[0]}"; m="${parts[1]}"; s="${parts[2]}" ;;
        2) m="${parts[0]}"; s="${parts[1]}" ;;
        1) s="${parts[0]}" ;;
    esac
    echo $(( ((10#$days * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}

# Lead time of the preemption warning: MEDDINO_SIGNAL_LEAD_S, else a tenth of the time left, within [30, 600] s
# (a fixed 600 s would fire at once in a job of 10 minutes or less).
meddino_signal_lead_s() {
    local left="$1"
    if [[ -n "${MEDDINO_SIGNAL_LEAD_S:-}" ]]; then echo "$MEDDINO_SIGNAL_LEAD_S"; return; fi
    local lead=$((left / 10))
    ((lead < 30)) && lead=30
    ((lead > 600)) && lead=600
    echo "$lead"
}

# The final checkpoint of a completed stage (from its stage_complete.json); empty when the stage has not finished.
meddino_completed_checkpoint() {
    local record="$1/stage_complete.json" python="$2"
    [[ -f "$record" ]] || return 0
    "$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["final_checkpoint"])' "$record"
}

MEDDINO_ROOT="${MEDDINO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

# Newest `checkpoint_<8 digits>.pth` in a directory (zero-padded names sort by iteration); empty when none.
meddino_latest_checkpoint() {
    local dir="$1"
    [[ -d "$dir" ]] || return 0
    find "$dir" -maxdepth 1 -name 'checkpoint_[0-9]*.pth' -printf '%f\n' | sort | tail -n 1 | sed "s|^.\+|$dir/&|"
}

# meddino_launch STAGE [override ...] -- runs the stage with srun (or directly when not inside a SLURM job).
# The interpreter with the package: MEDDINO_PYTHON, else the checkout's .venv, else python3.
meddino_python() {
    if [[ -n "${MEDDINO_PYTHON:-}" ]]; then echo "$MEDDINO_PYTHON"
    elif [[ -x "$MEDDINO_ROOT/.venv/bin/python" ]]; then echo "$MEDDINO_ROOT/.venv/bin/python"
    else echo python3; fi
}

# The environment every task starts with: the package on PYTHONPATH, threads, NCCL error handling, GPUs hidden for
# CPU runs, and no launcher variables from the submitting shell (they reach every task; SLURM's own values describe
# this job and pretrain/train/distributed.py reads them, so the others would let two jobs join one world).
meddino_task_env() {
    export PYTHONPATH="$MEDDINO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    if [[ "${MEDDINO_DEVICE:-}" == "cpu" || "${SLURM_GPUS_PER_NODE:-}" == "0" ]]; then
        export CUDA_VISIBLE_DEVICES=""
    fi
    [[ -n "${SLURM_JOB_ID:-}" ]] || return 0
    local var
    for var in RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT TORCHELASTIC_RUN_ID; do
        if [[ -n "${!var+x}" ]]; then
            meddino_log "ignoring $var=${!var} from the submitting shell (SLURM sets rank, world and master)"
            unset "$var"
        fi
    done
}

# srun flags: --cpus-per-task passed on (srun >= 22.05 no longer inherits it), plus MEDDINO_SRUN_ARGS.
meddino_srun_args() {
    local -a out=(--kill-on-bad-exit=1)
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then out+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    # shellcheck disable=SC2206
    out+=(${MEDDINO_SRUN_ARGS:-})
    printf '%s\n' "${out[@]}"
}

# meddino_run_module MODULE [arg ...]: one `python -m MODULE` per task with srun (one process outside SLURM).
meddino_run_module() {
    local module="$1"; shift
    local python
    python="$(meddino_python)"
    meddino_task_env
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        meddino_log "not inside a SLURM job: running one process"
        exec "$python" -m "$module" "$@"
    fi
    local -a srun_args
    mapfile -t srun_args < <(meddino_srun_args)
    meddino_log "$module: job ${SLURM_JOB_ID} on ${SLURM_JOB_NUM_NODES:-?} node(s) ${SLURM_JOB_NODELIST:-}: ${SLURM_NTASKS:-?} tasks"
    srun "${srun_args[@]}" "$python" -m "$module" "$@"
}

meddino_launch() {
    local stage="$1"; shift
    local root="$MEDDINO_ROOT"
    local python
    python="$(meddino_python)"
    local output_root="${MEDDINO_OUTPUT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/runs/pretrain}"
    local output_dir="${MEDDINO_OUTPUT_DIR:-$output_root/stage${stage}}"
    mkdir -p "$output_dir"

    local -a args=() configs
    local config
    # shellcheck disable=SC2206  # space-separated lists of files / overrides are split on purpose
    configs=(${MEDDINO_CONFIG:-$root/configs/pretrain/stage${stage}.yaml})
    if [[ -n "${MEDDINO_OVERLAY:-}" ]]; then
        # same convention as pretrain.pipeline --overlay: <overlay>.yaml, then <overlay>_stage<N>.yaml if present
        [[ -f "$root/configs/pretrain/${MEDDINO_OVERLAY}.yaml" ]] \
            || meddino_die "overlay not found: $root/configs/pretrain/${MEDDINO_OVERLAY}.yaml"
        configs+=("$root/configs/pretrain/${MEDDINO_OVERLAY}.yaml")
        if [[ -f "$root/configs/pretrain/${MEDDINO_OVERLAY}_stage${stage}.yaml" ]]; then
            configs+=("$root/configs/pretrain/${MEDDINO_OVERLAY}_stage${stage}.yaml")
        fi
    fi
    # shellcheck disable=SC2206
    configs+=(${MEDDINO_EXTRA_CONFIG:-})
    for config in "${configs[@]}"; do
        [[ -f "$config" ]] || meddino_die "config not found: $config (set MEDDINO_CONFIG / MEDDINO_EXTRA_CONFIG)"
        args+=(--config "$config")
    done
    args+=(--output-dir "$output_dir" --resume auto)

    if [[ -n "${MEDDINO_INIT_FROM:-}" ]]; then
        args+=(--init-from "$MEDDINO_INIT_FROM")
    elif [[ "$stage" -gt 1 ]]; then
        # continue from the previous stage's FINAL checkpoint (student, teacher, heads), and only once that stage
        # has completed (its stage_complete.json): a preempted or failed stage must not hand on a half-trained
        # model. The Gram teacher of stages 2-3 is read from the stage-1 run (gram.teacher.source=stage1_iteration).
        local prev_dir="$output_root/stage$((stage - 1))" prev_ckpt
        if [[ -n "${MEDDINO_INIT_CHECKPOINT:-}" ]]; then
            prev_ckpt="$MEDDINO_INIT_CHECKPOINT"
            meddino_log "stage $stage continues MEDDINO_INIT_CHECKPOINT=$prev_ckpt"
        else
            prev_ckpt="$(meddino_completed_checkpoint "$prev_dir" "$python")"
            [[ -n "$prev_ckpt" ]] || meddino_die "stage $stage continues stage $((stage - 1)), which has not completed in $prev_dir (no stage_complete.json; newest checkpoint: $(meddino_latest_checkpoint "$prev_dir/checkpoints" || true)). Finish stage $((stage - 1)) first, or set MEDDINO_INIT_CHECKPOINT / MEDDINO_INIT_FROM"
            meddino_log "stage $stage continues the completed stage $((stage - 1)): final checkpoint $prev_ckpt"
        fi
        [[ -f "$prev_ckpt" ]] || meddino_die "checkpoint to continue not found: $prev_ckpt"
        args+=("init.checkpoint=$prev_ckpt" "gram.teacher.run_dir=${MEDDINO_GRAM_RUN_DIR:-$output_root/stage1}")
    fi
    if [[ -n "${MEDDINO_DATA:-}" ]]; then args+=("data.shards=${MEDDINO_DATA}"); fi
    # shellcheck disable=SC2206  # word splitting of the space-separated override list is intended
    local -a env_overrides=(${MEDDINO_OVERRIDES:-})
    args+=("${env_overrides[@]}" "$@")

    meddino_task_env
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        meddino_log "not inside a SLURM job: running one process"
        exec "$python" -m pretrain.train "${args[@]}"
    fi
    meddino_log "stage $stage job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-?} node(s) ${SLURM_JOB_NODELIST:-}: ${SLURM_NTASKS:-?} tasks"
    meddino_log "config ${configs[*]} -> $output_dir"
    local -a srun_args
    mapfile -t srun_args < <(meddino_srun_args)
    # The preemption warning: USR1 to the tasks (not this script) a tenth of the time limit before it ends, at
    # most 600 s and at least 30 s (a fixed #SBATCH --signal=USR1@600 would fire at once in a 10-minute job).
    # The trainer checkpoints, requeues the job (--requeue) and exits 75; the requeued job resumes.
    local left lead watchdog=""
    left="$(meddino_time_left_s)"
    if [[ -n "$left" ]]; then
        lead="$(meddino_signal_lead_s "$left")"
        if ((left > lead)); then
            (
                sleep $((left - lead)) & sleeper=$!
                trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM  # the stage ended first: no stray sleep left
                wait "$sleeper" && meddino_log "time limit in ${lead}s: USR1 to the trainer" \
                    && scancel --signal=USR1 "$SLURM_JOB_ID"
            ) &
            watchdog=$!
            meddino_log "preemption warning scheduled ${lead}s before the time limit (${left}s left)"
        fi
    fi
    local status=0
    srun "${srun_args[@]}" "$python" -m pretrain.train "${args[@]}" || status=$?
    if [[ -n "$watchdog" ]]; then kill "$watchdog" 2>/dev/null || true; fi
    case "$status" in
        0) meddino_log "stage $stage finished" ;;
        75) meddino_log "stage $stage stopped early (preempted, checkpointed): exit 75 keeps afterok dependants waiting" ;;
        *) meddino_log "stage $stage failed with status $status" ;;
    esac
    return "$status"
}
