#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, with accounting (sacct), for running and testing the workflow's
# Slurm profile (workflow/profiles/slurm) without a real cluster. Root only; Debian/Ubuntu (apt-get).
#
#   scripts/slurm-localhost.sh [start] [DIR]   install what is missing, configure, start; wait for the node
#   scripts/slurm-localhost.sh stop [DIR]      cancel its jobs and stop every daemon it started
#   scripts/slurm-localhost.sh status [DIR]    exit 0 when the node answers
#
# Everything lives under DIR (default $SLURM_LOCALHOST_DIR, else /tmp/slurm-localhost): configs, munge key,
# database, spool, logs, pid files. Ports: $SLURM_LOCALHOST_PORT (default 6817) for slurmctld, +1 slurmd,
# +2 slurmdbd, +3 MariaDB (127.0.0.1 only). The one file outside DIR is the symlink /etc/slurm/slurm.conf (the
# clients' default config), made only where no other Slurm config is: inside a job, the Slurm plugin's jobstep
# (snakemake-executor-plugin-slurm-jobstep 0.6.1) drops every SLURM_* variable, SLURM_CONF too, before its srun.
set -euo pipefail

cmd=start
case "${1:-}" in start | stop | status) cmd=$1; shift ;; esac
DIR=$(realpath -m "${1:-${SLURM_LOCALHOST_DIR:-/tmp/slurm-localhost}}")
PORT=${SLURM_LOCALHOST_PORT:-6817}
DB_PORT=$((PORT + 3))
CLUSTER=localhost
NODE=localhost
export SLURM_CONF=$DIR/etc/slurm.conf # the daemons' config (slurmdbd.conf: the same folder)
ETC_CONF=/etc/slurm/slurm.conf
HEADER="# Written by scripts/slurm-localhost.sh"
MUNGE_SOCKET=$DIR/munge/munge.socket
DB_SOCKET=$DIR/mysql.sock

die() {
    echo "slurm-localhost: error: $1" >&2
    local log
    for log in "${@:2}"; do [ -s "$log" ] && { echo "--- last lines of $log:" >&2; tail -n 20 "$log" >&2; }; done
    exit 1
}
say() { echo "slurm-localhost: $*"; }

# running NAME: the daemon whose pid file is $DIR/run/NAME.pid is alive (and is that program, not a reused pid)
running() {
    local pid
    pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null &&
        grep -q "$1" "/proc/$pid/cmdline" 2>/dev/null
}

# wait_for SECONDS WHAT LOG COMMAND...: retry COMMAND (5 s at most each) until it succeeds, else fail naming WHAT
wait_for() {
    local limit=$1 what=$2 log=$3
    local deadline=$((SECONDS + limit))
    shift 3
    until timeout 5 "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "$what did not come up within ${limit}s" "$log"
        sleep 0.25
    done
}

stop_daemons() { # stop_daemons NAME...: SIGTERM to those running, then wait up to 30 s until all have exited
    local d i pid left pids=() names=()
    for d in "$@"; do
        running "$d" || continue
        pid=$(cat "$DIR/run/$d.pid") && kill "$pid" && pids+=("$pid") && names+=("$d")
    done
    for ((i = 0; i < 120; i++)); do
        left=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        [ $left = 1 ] || { [ ${#names[@]} = 0 ] || say "stopped ${names[*]}"; return 0; }
        sleep 0.25
    done
    die "${names[*]} did not stop within 30 s"
}

if [ "$cmd" = status ]; then
    [ -f "$SLURM_CONF" ] && running slurmctld && running slurmd && sinfo -h -n "$NODE" -o %t 2>/dev/null | grep -q .
    exit
fi

if [ "$cmd" = stop ]; then
    if running slurmctld; then # jobs first: their processes outlive slurmd otherwise
        squeue -h -o %A 2>/dev/null | xargs -r scancel --full 2>/dev/null || true
        for _ in $(seq 40); do [ -z "$(squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.25; done
    fi
    stop_daemons slurmd slurmctld # in waves: what still runs can flush to what it talks to
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    [ "$(readlink $ETC_CONF)" != "$SLURM_CONF" ] || rm -f $ETC_CONF
    exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (it installs Debian packages and runs the daemons as root)"

# --- 1. Debian packages (bookworm: Slurm 22.05, MariaDB 10.11). slurmdbd + MariaDB give sacct its data.
# Recommends are skipped (they pull ~60 more packages, plugin -dev files among them).
missing=()
for p in slurmctld slurmd slurm-client slurmdbd munge mariadb-server; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "no apt-get here: install ${missing[*]} yourself"
    say "installing ${missing[*]}"
    # The packages must not start their own services (with Debian's default config, beside ours):
    # policy-rc.d exit 101 = "action forbidden", only while we install (a container often has one already).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    log=/tmp/slurm-localhost-apt.log
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; }
    apt_install >$log 2>&1 || { apt-get update -q && apt_install; } >>$log 2>&1 ||
        die "apt-get install ${missing[*]} failed" $log
fi

mkdir -p "$DIR"/{etc,munge,run,log,spool/ctld,spool/d,mysql}
chmod 711 "$DIR/munge" # munged: nobody else may write here, everyone may reach the socket

# --- 2. Configuration, sized to this machine. Rewritten at every start (same machine: the same content).
cpus=$(nproc)
mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
real_mb=$((mem_mb - (mem_mb / 10 > 1024 ? mem_mb / 10 : 1024))) # slurmd drains a node that has less than this
[ -s "$DIR/etc/db.pass" ] || (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$DIR/etc/db.pass")
db_pass=$(cat "$DIR/etc/db.pass")

cat >"$SLURM_CONF" <<EOF
$HEADER: a one-node cluster on this machine ($cpus CPUs, $real_mb MB).
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
# root runs everything: no slurm user, no file ownership to get right in a container
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups (a container has no writable cgroup tree): processes are tracked through /proc, not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# a job without --mem gets 1 GB per CPU, not the whole node
DefMemPerCPU=1024
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
# Accounting through slurmdbd, so that sacct lists every job; the comment is stored too (the Snakemake
# plugin puts the rule name there).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
# (for munge, the "password" of the slurmdbd connection is the munge socket: AuthInfo is not used for it)
AccountingStoragePass=$MUNGE_SOCKET
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
# Short timeouts: a test cluster should start, and fail, fast.
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

(umask 077 && cat >"$DIR/etc/slurmdbd.conf" <<EOF
$HEADER (0600, as slurmdbd requires: it holds the DB password).
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
EOF
)

# The clients' default config is this one, unless it is another Slurm's (a file, or a link to one).
if [ -e $ETC_CONF ] && ! head -n 1 $ETC_CONF | grep -q "^$HEADER"; then
    die "$ETC_CONF is another Slurm's configuration: this script leaves it alone (stop that Slurm and move it away)"
fi
mkdir -p /etc/slurm && ln -sfn "$SLURM_CONF" $ETC_CONF

# --- 3. Daemons, in dependency order; each is skipped when already running (start is idempotent).
if ! running munged; then
    [ -s "$DIR/munge/munge.key" ] || (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
    munged --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$DIR/run/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" ||
        die "munged failed to start" "$DIR/log/munged.log"
    say "started munged"
fi
wait_for 10 munged "$DIR/log/munged.log" munge -S "$MUNGE_SOCKET" -n

if ! running mariadbd; then
    if [ ! -d "$DIR/mysql/mysql" ]; then # a fresh data folder: system tables, root by unix socket only
        mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
            --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed" "$DIR/log/mariadb-install.log"
    fi
    # --no-defaults: none of /etc/mysql's settings (the system instance's socket, port, data folder)
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DB_SOCKET" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadb.log" \
        --skip-log-bin --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    # (slurmdbd logs that it recommends a bigger buffer pool: 128 MB is plenty for a test cluster)
    say "started mariadbd"
fi
wait_for 60 MariaDB "$DIR/log/mariadb.log" mariadb --no-defaults -S "$DB_SOCKET" -u root -e "SELECT 1"
mariadb --no-defaults -S "$DB_SOCKET" -u root <<EOF || die "could not create the database user slurm"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

if ! running slurmdbd; then
    slurmdbd || die "slurmdbd failed to start" "$DIR/log/slurmdbd.log"
    say "started slurmdbd"
fi
wait_for 60 slurmdbd "$DIR/log/slurmdbd.log" sacctmgr -n show cluster
# The cluster must be in the database before slurmctld registers with it (adding it also creates the
# account root with the user root, which the jobs run under).
if [ -z "$(sacctmgr -n -P show cluster "$CLUSTER" format=cluster)" ]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed" "$DIR/log/slurmdbd.log"
fi

if ! running slurmctld; then
    slurmctld || die "slurmctld failed to start" "$DIR/log/slurmctld.log"
    say "started slurmctld"
fi
wait_for 60 slurmctld "$DIR/log/slurmctld.log" scontrol ping
if ! running slurmd; then
    slurmd -N "$NODE" || die "slurmd failed to start" "$DIR/log/slurmd.log"
    say "started slurmd"
fi
# A node left drained or down by an earlier run (e.g. a kill) is brought back.
state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
case "$state" in drain* | down* | fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;; esac
wait_for 60 "node $NODE (idle)" "$DIR/log/slurmd.log" bash -c "sinfo -h -n $NODE -o %t | grep -qx -e idle -e mix -e alloc"

say "up: node $NODE, $cpus CPUs, $real_mb MB, partition main; $ETC_CONF -> $SLURM_CONF; logs in $DIR/log"
