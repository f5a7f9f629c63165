#!/usr/bin/env bash
# Real servers on one machine, all on 127.0.0.1: Prefect server + process work pool/worker, MLflow tracking server
# (SQLite backend + artifact folder), deployments from prefect.yaml, and the MLflow webhook receiver.
#   scripts/stack.sh up      start everything (idempotent), then: source "$STACK_DIR/env"
#   scripts/stack.sh down    stop what `up` started
# Settings (environment): STACK_DIR (.distillery/stack), PREFECT_PORT (4200), MLFLOW_PORT (5000), WEBHOOK_PORT (8765),
# DISTILLERY_CONFIG (./distillery.yaml), DISTILLERY_WEBHOOK_SECRET (set it to enable the webhook path).
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${VENV_BIN:-$HERE/.venv/bin}"
STACK_DIR="${STACK_DIR:-$HERE/.distillery/stack}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
WEBHOOK_PORT="${WEBHOOK_PORT:-8765}"
export DISTILLERY_CONFIG="${DISTILLERY_CONFIG:-$HERE/distillery.yaml}"
export DISTILLERY_HOME="$HERE"
export PREFECT_HOME="$STACK_DIR/prefect-home"
export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$MLFLOW_PORT"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PREFECT_LOGGING_EXTRA_LOGGERS=models,distillery

wait_for() {  # url seconds
  for _ in $(seq "$2"); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "timed out waiting for $1 (see $STACK_DIR/*.log)" >&2; return 1
}

start() {  # name command...
  local name=$1; shift
  if [ -f "$STACK_DIR/$name.pid" ] && kill -0 "$(cat "$STACK_DIR/$name.pid")" 2>/dev/null; then return 0; fi
  setsid "$@" >"$STACK_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$STACK_DIR/$name.pid"
}

up() {
  mkdir -p "$STACK_DIR/mlflow-artifacts" "$PREFECT_HOME"
  # mlflow server runs several workers: without one shared key each encrypts webhook secrets with its own random key
  # and deliveries fail. The key lives in the stack folder (never in git), or comes from the environment.
  if [ -z "${MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY:-}" ]; then
    key_file="$STACK_DIR/webhook-encryption.key"
    [ -s "$key_file" ] || (umask 077; "$BIN/python" -c \
      "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())" >"$key_file")
    MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY="$(cat "$key_file")"
  fi
  export MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY
  start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true \
    start mlflow-server "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
      --backend-store-uri "sqlite:///$STACK_DIR/mlflow-server.db" --artifacts-destination "$STACK_DIR/mlflow-artifacts"
  wait_for "http://127.0.0.1:$PREFECT_PORT/api/health" 90
  wait_for "http://127.0.0.1:$MLFLOW_PORT/health" 90
  for pool in distillery-pool distillery-gpu-pool; do  # the GPU pool's worker runs on a GPU machine
    "$BIN/prefect" work-pool inspect "$pool" >/dev/null 2>&1 \
      || "$BIN/prefect" work-pool create "$pool" --type process >/dev/null
  done
  (cd "$HERE" && "$BIN/prefect" --no-prompt deploy --all >"$STACK_DIR/deploy.log" 2>&1) \
    || { echo "prefect deploy failed: see $STACK_DIR/deploy.log" >&2; exit 1; }
  start worker "$BIN/prefect" worker start --pool distillery-pool
  if [ -n "${DISTILLERY_WEBHOOK_SECRET:-}" ]; then
    start webhook "$BIN/distillery" webhook serve --port "$WEBHOOK_PORT"
    wait_for "http://127.0.0.1:$WEBHOOK_PORT/health" 60
    "$BIN/distillery" webhook register --url "http://127.0.0.1:$WEBHOOK_PORT/" >>"$STACK_DIR/webhook.log" 2>&1
  fi
  cat >"$STACK_DIR/env" <<ENV
export PREFECT_API_URL=$PREFECT_API_URL
export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
export PREFECT_HOME=$PREFECT_HOME
export DISTILLERY_CONFIG=$DISTILLERY_CONFIG
ENV
  echo "stack up: Prefect $PREFECT_API_URL, MLflow $MLFLOW_TRACKING_URI (source $STACK_DIR/env)"
}

stop_group() {  # name seconds: TERM the process group `start` made, wait for it, then KILL what is left
  local name=$1 pid_file="$STACK_DIR/$1.pid" pid
  [ -f "$pid_file" ] || return 0
  pid=$(cat "$pid_file")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq $(( $2 * 5 ))); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 -- "-$pid" 2>/dev/null; then
    echo "$name did not stop within $2 s of TERM: killing its process group" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
}

down() {
  # clients first (they would otherwise poll dead servers), then the servers. `prefect worker` 3.8 catches TERM
  # but does not exit on it (it was found alive, polling a dead port, minutes after a TERM): it gets KILL after 3 s.
  stop_group webhook 10
  stop_group worker 3
  stop_group mlflow-server 20
  stop_group prefect-server 20
  echo "stack down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
