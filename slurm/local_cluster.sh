#!/usr/bin/env bash
# A real single-host SLURM cluster for tests and CI: one slurmctld, one private munged and N slurmd
# daemons (`slurmd -N name`, one port each) that emulate N compute nodes on this machine.
#
#   slurm/local_cluster.sh start       install Debian's packages if missing, write the config, start daemons
#   slurm/local_cluster.sh wait-idle   wait until every node is idle (ready to run jobs)
#   slurm/local_cluster.sh status      daemons started by us and `sinfo`
#   slurm/local_cluster.sh env         print `export SLURM_CONF=...` for client commands (sbatch, squeue...)
#   slurm/local_cluster.sh stop        cancel our jobs, stop exactly the daemons we started (pid files)
#
# Everything (config, state, spool, logs, pid files, munge socket) lives under one directory,
# MEDDINO_SLURM_DIR (default: $TMPDIR/meddino-slurm). Client commands find the cluster through
# SLURM_CONF=$MEDDINO_SLURM_DIR/slurm.conf. Needs root (daemons run as root; munged as the munge user).
#
# Settings (environment):
#   MEDDINO_SLURM_DIR     state directory                       [${TMPDIR:-/tmp}/meddino-slurm]
#   MEDDINO_SLURM_NODES   number of emulated nodes              [2]
#   MEDDINO_SLURM_CPUS    CPUs each emulated node advertises    [4]
#   MEDDINO_SLURM_PORT    slurmctld port; node i uses PORT+i    [16817]
#   MEDDINO_SLURM_PREFIX  node name prefix (nodes PREFIX1..N)   [meddino]
#   MEDDINO_SLURM_TIMEOUT seconds wait-idle waits               [60]
#
# Processes on the emulated nodes share this machine's hostname: identify nodes by SLURM_NODEID /
# SLURMD_NODENAME, not by `hostname`. Node names are made resolvable with /etc/hosts lines tagged with the
# state directory; `stop` removes exactly those lines.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin, which some CI shells leave out

STATE_DIR="${MEDDINO_SLURM_DIR:-${TMPDIR:-/tmp}/meddino-slurm}"
N_NODES="${MEDDINO_SLURM_NODES:-2}"
NODE_CPUS="${MEDDINO_SLURM_CPUS:-4}"
CTLD_PORT="${MEDDINO_SLURM_PORT:-16817}"
NODE_PREFIX="${MEDDINO_SLURM_PREFIX:-meddino}"
TIMEOUT_S="${MEDDINO_SLURM_TIMEOUT:-60}"
PACKAGES=(slurmctld slurmd slurm-client munge)
CONF="$STATE_DIR/slurm.conf"
MUNGE_DIR="$STATE_DIR/munge"
HOSTS_TAG="# meddino-local-slurm $STATE_DIR"

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

node_names() { local i; for ((i = 1; i <= N_NODES; i++)); do echo "${NODE_PREFIX}${i}"; done; }

# --- installation -------------------------------------------------------------------------------------
ensure_packages() {
    local missing=0 bin
    for bin in slurmctld slurmd sbatch munged; do
        command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    ((missing == 0)) && return 0
    [[ $(id -u) -eq 0 ]] || die "SLURM is not installed and installing it needs root: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null 2>&1 || die "SLURM is not installed and apt-get is unavailable (need ${PACKAGES[*]})"
    log "installing ${PACKAGES[*]} (apt-get, --no-install-recommends)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$STATE_DIR/apt.log" 2>&1; then
        apt-get update -q >>"$STATE_DIR/apt.log" 2>&1 || die "apt-get update failed (see $STATE_DIR/apt.log)"
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$STATE_DIR/apt.log" 2>&1 \
            || die "apt-get install ${PACKAGES[*]} failed (see $STATE_DIR/apt.log)"
    fi
}

# --- pid files ----------------------------------------------------------------------------------------
# A pid file counts only while its process is alive AND is the daemon we expect (pids get reused).
pid_alive() {  # pid_alive FILE COMM -> prints pid, status 0 when that daemon runs
    local file="$1" comm="$2" pid
    [[ -s "$file" ]] || return 1
    pid="$(tr -dc '0-9' <"$file")"
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$comm" ]] || return 1
    echo "$pid"
}

stop_daemon() {  # stop_daemon FILE COMM
    local file="$1" comm="$2" pid i
    pid="$(pid_alive "$file" "$comm")" || { rm -f "$file"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$comm ($pid) ignored SIGTERM for 10 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
    log "stopped $comm ($pid)"
}

wait_for_pidfile() {  # wait_for_pidfile FILE COMM LOG
    local i
    for ((i = 0; i < 100; i++)); do
        pid_alive "$1" "$2" >/dev/null && return 0
        sleep 0.1
    done
    log "$2 did not start; last lines of $3:"
    tail -n 20 "$3" >&2 2>/dev/null || true
    return 1
}

# --- configuration ------------------------------------------------------------------------------------
write_hosts() {
    local name line
    [[ -s /etc/hosts && "$(tail -c 1 /etc/hosts)" != "" ]] && printf '\n' >>/etc/hosts  # no final newline
    for name in $(node_names); do
        if ! getent hosts "$name" >/dev/null 2>&1; then
            line="127.0.0.1 $name $HOSTS_TAG"
            # append in place (no rename: /etc/hosts may be a bind mount)
            printf '%s\n' "$line" >>/etc/hosts
        fi
    done
}

remove_hosts() {
    [[ -w /etc/hosts ]] || return 0
    grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
    local kept
    kept="$(grep -vF "$HOSTS_TAG" /etc/hosts || true)"
    printf '%s\n' "$kept" >/etc/hosts  # rewrite in place, keeps the inode
}

write_config() {
    local ctld_host i name
    ctld_host="$(hostname -s)"
    mkdir -p "$STATE_DIR"/{ctld,spool,log,tmp} "$MUNGE_DIR"
    chmod 755 "$STATE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR"  # munged requires the socket directory to be searchable by all
    {
        echo "# generated by slurm/local_cluster.sh; single-host test cluster"
        echo "ClusterName=meddino-local"
        echo "SlurmctldHost=${ctld_host}(127.0.0.1)"
        echo "SlurmctldPort=${CTLD_PORT}"
        echo "SlurmdPort=$((CTLD_PORT + 1))"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=${MUNGE_DIR}/munge.socket,cred_expire=10"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "StateSaveLocation=${STATE_DIR}/ctld"
        echo "SlurmdSpoolDir=${STATE_DIR}/spool/%n"
        echo "SlurmctldPidFile=${STATE_DIR}/slurmctld.pid"
        echo "SlurmdPidFile=${STATE_DIR}/slurmd-%n.pid"
        echo "SlurmctldLogFile=${STATE_DIR}/log/slurmctld.log"
        echo "SlurmdLogFile=${STATE_DIR}/log/slurmd-%n.log"
        echo "SlurmctldDebug=info"
        echo "SlurmdDebug=info"
        echo "TmpFS=${STATE_DIR}/tmp"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "MpiDefault=none"
        echo "SwitchType=switch/none"
        echo "SchedulerType=sched/builtin"
        echo "SchedulerParameters=sched_interval=1"
        echo "MinJobAge=5"
        echo "KillWait=5"
        echo "InactiveLimit=0"
        echo "MessageTimeout=10"
        echo "ReturnToService=2"
        echo "SlurmdParameters=config_overrides"
        echo "JobRequeue=1"
        for ((i = 1; i <= N_NODES; i++)); do
            name="${NODE_PREFIX}${i}"
            echo "NodeName=${name} NodeAddr=127.0.0.1 NodeHostname=${name} Port=$((CTLD_PORT + i)) CPUs=${NODE_CPUS} State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
}

# --- commands -----------------------------------------------------------------------------------------
cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd runs jobs as any user; munged as the munge user)"
    mkdir -p "$STATE_DIR"
    ensure_packages
    getent passwd munge >/dev/null || die "user 'munge' is missing (the munge package creates it)"
    [[ -r /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (the munge package creates it)"
    if pid_alive "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
        log "already running (state in $STATE_DIR)"
        return 0
    fi
    write_config
    write_hosts

    setpriv --reuid=munge --regid=munge --init-groups test -x "$MUNGE_DIR" \
        || die "the munge user cannot reach $MUNGE_DIR: choose a MEDDINO_SLURM_DIR whose parents are searchable by all"
    if ! pid_alive "$MUNGE_DIR/munged.pid" munged >/dev/null; then
        # a private munged on its own socket: leaves any system munged alone
        setpriv --reuid=munge --regid=munge --init-groups \
            munged --socket="$MUNGE_DIR/munge.socket" --pid-file="$MUNGE_DIR/munged.pid" \
            --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" --num-threads=4 \
            || { tail -n 20 "$MUNGE_DIR/munged.log" >&2 2>/dev/null; die "munged failed to start"; }
        wait_for_pidfile "$MUNGE_DIR/munged.pid" munged "$MUNGE_DIR/munged.log" || die "munged failed to start"
    fi

    # -i: ignore state left by an earlier run in the same directory; -c: clear jobs from it
    slurmctld -c -i -f "$CONF" || die "slurmctld failed to start (see $STATE_DIR/log/slurmctld.log)"
    wait_for_pidfile "$STATE_DIR/slurmctld.pid" slurmctld "$STATE_DIR/log/slurmctld.log" \
        || die "slurmctld failed to start"
    local name
    for name in $(node_names); do
        mkdir -p "$STATE_DIR/spool/$name"
        slurmd -N "$name" -f "$CONF" || die "slurmd $name failed to start (see $STATE_DIR/log/slurmd-$name.log)"
        wait_for_pidfile "$STATE_DIR/slurmd-$name.pid" slurmd "$STATE_DIR/log/slurmd-$name.log" \
            || die "slurmd $name failed to start"
    done
    log "started: slurmctld + $N_NODES slurmd ($(node_names | paste -sd, -)); export SLURM_CONF=$CONF"
}

cmd_wait_idle() {
    [[ -f "$CONF" ]] || die "no cluster config at $CONF (run start first)"
    pid_alive "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null || die "slurmctld is not running (run start first)"
    local deadline=$((SECONDS + TIMEOUT_S)) states
    while ((SECONDS < deadline)); do
        states="$(SLURM_CONF="$CONF" sinfo -h -N -o '%T' 2>/dev/null | sort -u | paste -sd, -)" || states=""
        if [[ "$states" == "idle" ]]; then
            log "all $N_NODES nodes idle"
            return 0
        fi
        sleep 0.5
    done
    log "nodes not idle after ${TIMEOUT_S}s (states: ${states:-unknown})"
    SLURM_CONF="$CONF" sinfo -N -l >&2 2>/dev/null || true
    tail -n 20 "$STATE_DIR/log/slurmctld.log" >&2 2>/dev/null || true
    return 1
}

cmd_status() {
    local name pid rc=0
    if pid="$(pid_alive "$MUNGE_DIR/munged.pid" munged)"; then echo "munged     running ($pid)"; else echo "munged     stopped"; rc=1; fi
    if pid="$(pid_alive "$STATE_DIR/slurmctld.pid" slurmctld)"; then echo "slurmctld  running ($pid)"; else echo "slurmctld  stopped"; rc=1; fi
    for name in $(node_names); do
        if pid="$(pid_alive "$STATE_DIR/slurmd-$name.pid" slurmd)"; then echo "slurmd $name running ($pid)"; else echo "slurmd $name stopped"; rc=1; fi
    done
    if ((rc == 0)); then SLURM_CONF="$CONF" sinfo -N 2>/dev/null || true; fi
    return "$rc"
}

cmd_stop() {
    local name i
    if pid_alive "$STATE_DIR/slurmctld.pid" slurmctld >/dev/null; then
        # jobs first, so no slurmstepd outlives its slurmd
        SLURM_CONF="$CONF" scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            [[ -z "$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    for name in $(node_names); do
        stop_daemon "$STATE_DIR/slurmd-$name.pid" slurmd
    done
    stop_daemon "$STATE_DIR/slurmctld.pid" slurmctld
    stop_daemon "$MUNGE_DIR/munged.pid" munged
    remove_hosts
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    wait-idle) cmd_wait_idle ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|wait-idle|env" >&2; exit 2 ;;
esac
