#!/usr/bin/env bash
# An MLflow tracking server on a private PostgreSQL cluster, both listening on 127.0.0.1 only.
#
#   scripts/mlflow-server.sh [start|stop|status] [DIR]
#
# start (the default) is idempotent: it installs PostgreSQL (Debian package) if missing, creates the cluster,
# role and database on first use, starts whatever is not running, waits until MLflow answers /health and prints
# the line to paste:  export MLFLOW_TRACKING_URI=http://127.0.0.1:5001
# stop stops the MLflow server and the database (the data stays in DIR); status says what runs.
#
# DIR (argument, else $MLFLOW_SERVER_DIR, else .mlflow-server/ at the repository root) holds everything:
#   pgdata/  the cluster (owned by the postgres user when run as root)   artifacts/  the runs' artifacts
#   pgpass   passwords (mode 600)   postgres.log, mlflow-server.log   mlflow-server.pid   tracking-uri
# Settings (environment): MLFLOW_SERVER_PORT (5001), MLFLOW_SERVER_PG_PORT (55432),
#   MLFLOW_SERVER_WORKERS (4), MLFLOW_SERVER_TIMEOUT (seconds to wait for /health, 120).
# Exit status 3: PostgreSQL is missing and cannot be installed here (no apt-get, or neither root nor sudo).
set -euo pipefail

ACTION=${1:-start}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${2:-${MLFLOW_SERVER_DIR:-$REPO/.mlflow-server}}
PORT=${MLFLOW_SERVER_PORT:-5001}
PG_PORT=${MLFLOW_SERVER_PG_PORT:-55432}  # not 5432: a system cluster may already use it
WORKERS=${MLFLOW_SERVER_WORKERS:-4}
TIMEOUT=${MLFLOW_SERVER_TIMEOUT:-120}

log() { echo "mlflow-server: $*" >&2; }
die() { log "$*"; exit "${2:-1}"; }

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)  # absolute: postgres and mlflow run in other directories
PGDATA=$DIR/pgdata
PIDFILE=$DIR/mlflow-server.pid
export PGPASSFILE=$DIR/pgpass  # libpq (psql, psycopg2 in MLflow) reads passwords here: none on a command line

# initdb and postgres refuse to run as root: as root the cluster belongs to the postgres user.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<major>/bin; take the newest.
pg_bin() {
  local d
  d=$(printf "%s\n" /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return; fi
  d=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
  [ -x "$d/pg_ctl" ] && echo "$d"
}

install_postgres() {
  local sudo=""
  command -v apt-get >/dev/null || die "PostgreSQL (initdb, pg_ctl) is missing and there is no apt-get" 3
  if [ "$(id -u)" != 0 ]; then
    sudo -n true 2>/dev/null || die "PostgreSQL is missing: install the Debian package postgresql (needs root)" 3
    sudo="sudo -n"
  fi
  log "installing PostgreSQL (Debian package postgresql)"
  # The package lists may be stale or absent (fresh image): update only when the plain install fails.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql >/dev/null 2>&1 || {
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql >/dev/null; }
}

pg_running() { [ -f "$PGDATA/postmaster.pid" ] && as_pg "$PG/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }
mlflow_pid() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && cat "$PIDFILE"; }
healthy() {
  if command -v curl >/dev/null; then curl -fsS -m 2 "$1/health" >/dev/null 2>&1
  else python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$1" \
         >/dev/null 2>&1; fi
}
psql_admin() { "$PG/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }

stop() {
  local pid
  if pid=$(mlflow_pid); then
    # mlflow starts uvicorn, which forks the workers: stop the whole process group (its own session, see start).
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    log "MLflow server stopped"
  fi
  rm -f "$PIDFILE"
  PG=$(pg_bin) || true
  if [ -n "${PG:-}" ] && pg_running; then
    as_pg "$PG/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
    log "PostgreSQL stopped"
  fi
}

start() {
  PG=$(pg_bin) || { install_postgres; PG=$(pg_bin) || die "PostgreSQL installed but initdb/pg_ctl not found"; }

  # The postgres user must reach the cluster: DIR itself is traversable (not listable); its parents must be too.
  chmod 711 "$DIR"
  [ "$(id -u)" != 0 ] || runuser -u postgres -- test -x "$DIR" ||
    die "the postgres user cannot reach $DIR (a parent folder is not traversable): choose another DIR"

  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    log "creating the PostgreSQL cluster in $PGDATA"
    local admin_pw mlflow_pw pwfile
    admin_pw=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
    mlflow_pw=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
    (umask 077; printf '127.0.0.1:*:*:postgres:%s\n127.0.0.1:*:mlflow:mlflow:%s\n' "$admin_pw" "$mlflow_pw" \
      > "$PGPASSFILE")
    rm -rf "$PGDATA"; mkdir -m 700 "$PGDATA"
    pwfile=$(mktemp "$DIR/.pw.XXXXXX"); echo "$admin_pw" > "$pwfile"
    [ "$(id -u)" != 0 ] || chown postgres: "$PGDATA" "$pwfile"
    # Password (SCRAM) authentication for every connection; C locale so no system locale is needed.
    as_pg "$PG/initdb" -D "$PGDATA" -U postgres --auth=scram-sha-256 --pwfile="$pwfile" \
      --no-locale -E UTF8 >/dev/null
    rm -f "$pwfile"
    # TCP on the loopback interface only, and no Unix socket (no shared /var/run/postgresql, no path limit).
    printf "\n# scripts/mlflow-server.sh\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n" \
      | as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null
  fi

  if ! pg_running; then
    [ "$(id -u)" != 0 ] || { touch "$DIR/postgres.log"; chown postgres: "$DIR/postgres.log"; }
    # The port is given at each start, so it can change between starts. Connections: each MLflow worker has a
    # SQLAlchemy pool (5 + 10 overflow) per store (tracking, model registry, ...), PostgreSQL's default is 100.
    as_pg "$PG/pg_ctl" -D "$PGDATA" -l "$DIR/postgres.log" -o "-p $PG_PORT -c max_connections=$((50 * WORKERS + 10))" \
      -w -t 60 start >/dev/null ||
      die "PostgreSQL did not start; see $DIR/postgres.log"
  fi
  PG_PORT=$(sed -n 4p "$PGDATA/postmaster.pid")  # the port it really listens on, if it was already running

  # The role and database of MLflow (the server creates its tables on first start).
  if [ -z "$(psql_admin -d postgres -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'")" ]; then
    local pw; pw=$(awk -F: '$4 == "mlflow" { print $5 }' "$PGPASSFILE")
    psql_admin -d postgres <<< "CREATE ROLE mlflow LOGIN PASSWORD '$pw';"  # stdin: not on a command line
  fi
  [ -n "$(psql_admin -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'mlflow'")" ] ||
    psql_admin -d postgres -c "CREATE DATABASE mlflow OWNER mlflow"

  local pid url
  if pid=$(mlflow_pid); then
    url=$(cat "$DIR/tracking-uri")
    log "MLflow server already running (pid $pid)"
  else
    url=http://127.0.0.1:$PORT
    ! healthy "$url" || die "port $PORT already answers /health: another MLflow server? (set MLFLOW_SERVER_PORT)"
    local mlflow; mlflow=$(command -v mlflow || echo "$REPO/.venv/bin/mlflow")
    [ -x "$mlflow" ] || die "mlflow not found: run make setup, or put the project's .venv/bin on PATH"
    mkdir -p "$DIR/artifacts"
    # setsid: a session (and process group) of its own, so `stop` ends uvicorn's workers too and a Ctrl-C
    # in the calling terminal does not. --artifacts-destination with artifact serving (the default): clients
    # upload and download artifacts through the server (mlflow-artifacts:/), never from its file system.
    # --workers: uvicorn processes; each serves many requests at once (threads), and parallel pipeline jobs
    # each hold a connection while they log. Job execution (GenAI scorers, trace rollups) is not used by
    # the study: off, to spare its runner process.
    (cd "$DIR" && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
      exec setsid "$mlflow" server \
        --backend-store-uri "postgresql://mlflow@127.0.0.1:$PG_PORT/mlflow" \
        --artifacts-destination "$DIR/artifacts" \
        --host 127.0.0.1 --port "$PORT" --workers "$WORKERS" \
        >> "$DIR/mlflow-server.log" 2>&1 < /dev/null) &
    pid=$!
    echo "$pid" > "$PIDFILE"
    echo "$url" > "$DIR/tracking-uri"
    log "starting MLflow server (pid $pid, log $DIR/mlflow-server.log)"
  fi

  local deadline=$((SECONDS + TIMEOUT))
  until healthy "$url"; do
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$DIR/mlflow-server.log" >&2; rm -f "$PIDFILE"
                                   die "the MLflow server exited; see $DIR/mlflow-server.log"; }
    [ $SECONDS -lt $deadline ] || die "the MLflow server did not answer $url/health within ${TIMEOUT}s"
    sleep 0.5
  done
  log "MLflow at $url (PostgreSQL on 127.0.0.1:$PG_PORT, artifacts in $DIR/artifacts)"
  echo "export MLFLOW_TRACKING_URI=$url"
}

status() {
  PG=$(pg_bin) || true
  if [ -n "${PG:-}" ] && pg_running; then echo "PostgreSQL: running (port $(sed -n 4p "$PGDATA/postmaster.pid"))"
  else echo "PostgreSQL: stopped"; fi
  if pid=$(mlflow_pid); then echo "MLflow: running (pid $pid) at $(cat "$DIR/tracking-uri")"
  else echo "MLflow: stopped"; fi
}

case $ACTION in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 [start|stop|status] [DIR]" 2 ;;
esac
