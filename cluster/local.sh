#!/usr/bin/env bash
# A two-node Ray cluster on one machine, one job submitted to it, then everything torn down.
#
#   cluster/local.sh                                   # default job: a tiny `lambo pretrain`
#   cluster/local.sh python -c "import ray; ray.init(); print(len(ray.nodes()))"
#   LAMBO_PORT_BASE=7400 cluster/local.sh lambo tune --config tune_configs/small.yaml ...
#
# Why it looks the way it does:
# * Each node is a `ray start --block` process in the background. Killing that one process makes Ray
#   tear down exactly the raylet/GCS/dashboard it spawned, so the exit trap stops what this script
#   started and nothing else. `ray stop` is never used: it kills every Ray process of the user,
#   including other people's clusters and test sessions on the same machine.
# * Its own temp dirs, so the cluster does not register itself in /tmp/ray/ray_current_cluster
#   (where a plain `ray.init()` elsewhere on the machine would find it and attach to it), and one per
#   node: each node's runtime-env agent garbage-collects the job's working_dir copy under its temp dir,
#   so with a shared one the worker node deletes the directory the job driver on the head runs in.
# * Token authentication is on (RAY_AUTH_MODE=token) with a fresh token in RAY_AUTH_TOKEN for this
#   cluster only; every process started here (nodes, the jobs CLI) inherits both variables. Without
#   them the second node is refused (InvalidAuthToken) and the jobs CLI gets "Missing authentication
#   token".
# * Every port is explicit and derived from LAMBO_PORT_BASE, so two copies (e.g. parallel tests)
#   with different bases do not collide.
#
# Environment: LAMBO_PORT_BASE (default 6390), LAMBO_HEAD_CPUS / LAMBO_WORKER_CPUS (default 1 each),
# LAMBO_LOCAL_TIMEOUT (seconds for the job, default 900), LAMBO_KEEP_TMP=1 keeps the temp dir.
# Exit status: the job's (0 when it SUCCEEDED, 1 otherwise), 2 on a setup error.
set -euo pipefail

BASE="${LAMBO_PORT_BASE:-6390}"
HEAD_CPUS="${LAMBO_HEAD_CPUS:-1}"
WORKER_CPUS="${LAMBO_WORKER_CPUS:-1}"
JOB_TIMEOUT="${LAMBO_LOCAL_TIMEOUT:-900}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! [[ "$BASE" =~ ^[0-9]+$ ]] || (( BASE < 1024 || BASE > 65000 )); then
  echo "local.sh: LAMBO_PORT_BASE must be an integer in [1024, 65000], got '$BASE'" >&2
  exit 2
fi
command -v ray >/dev/null || { echo "local.sh: 'ray' is not on PATH (pip install -e .)" >&2; exit 2; }

GCS_PORT=$BASE
DASH_PORT=$((BASE + 1))
CLIENT_PORT=$((BASE + 2))
# Per-node ports: head uses offset 10.., worker 30..; worker processes get a 100-port range each.
node_ports() {  # $1 = offset
  local o=$((BASE + $1))
  echo "--node-manager-port=$o --object-manager-port=$((o + 1)) \
--dashboard-agent-listen-port=$((o + 2)) --dashboard-agent-grpc-port=$((o + 3)) \
--runtime-env-agent-port=$((o + 4)) --metrics-export-port=$((o + 5)) \
--min-worker-port=$((BASE + 100 + $1 * 5)) --max-worker-port=$((BASE + 199 + $1 * 5))"
}

if [[ $# -eq 0 ]]; then
  # Tiny on purpose (10 UEs, 2 servers, 4 validation instances): it shows the path, not a result.
  set -- lambo pretrain --scale S --iterations 2 --num-env-runners 1 --n-ues 10 --n-servers 2 --val-size 4 \
    --out "/tmp/lambo-local-pretrain-$(date +%Y%m%d-%H%M%S)"
fi

TMP="$(mktemp -d /tmp/lambo-rc.XXXXXX)"   # short: Ray puts unix sockets under it (108-byte limit)
HEAD_PID=""
WORKER_PID=""
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$(python -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_TOKEN
export RAY_DISABLE_USAGE_STATS=1
unset RAY_ADDRESS

stop_node() {  # $1 = pid of a `ray start --block` process
  local pid="$1" i
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.5
  done
  echo "local.sh: node $pid did not stop after SIGTERM, sending SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  echo "local.sh: stopping the cluster (worker $WORKER_PID, head $HEAD_PID)"
  stop_node "$WORKER_PID"
  stop_node "$HEAD_PID"
  if [[ "${LAMBO_KEEP_TMP:-0}" == "1" ]]; then echo "local.sh: kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_for() {  # $1 = description, $2 = seconds, rest = command that succeeds when ready
  local what="$1" secs="$2" t0=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS - t0 > secs )); then echo "local.sh: timed out waiting for $what" >&2; return 2; fi
    for pid in $HEAD_PID $WORKER_PID; do
      kill -0 "$pid" 2>/dev/null || { echo "local.sh: a node process exited (see $TMP/*.log)" >&2; return 2; }
    done
    sleep 1
  done
}

alive_nodes() {
  python - "$GCS_PORT" <<'EOF'
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", log_to_driver=False, logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
EOF
}
has_two_nodes() { [[ "$(alive_nodes 2>/dev/null | tail -n 1)" == "2" ]]; }

echo "local.sh: head on 127.0.0.1:$GCS_PORT (dashboard :$DASH_PORT, $HEAD_CPUS CPU), temp dir $TMP"
# shellcheck disable=SC2046
ray start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" --num-cpus="$HEAD_CPUS" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --ray-client-server-port="$CLIENT_PORT" \
  --temp-dir="$TMP/h" $(node_ports 10) --disable-usage-stats >"$TMP/head.log" 2>&1 &
HEAD_PID=$!
wait_for "the head's dashboard" 120 ray job list --address "http://127.0.0.1:$DASH_PORT"

echo "local.sh: worker node ($WORKER_CPUS CPU)"
# shellcheck disable=SC2046
ray start --block --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus="$WORKER_CPUS" \
  --temp-dir="$TMP/w" $(node_ports 30) >"$TMP/worker.log" 2>&1 &
WORKER_PID=$!
wait_for "2 alive nodes" 120 has_two_nodes

JOB_ID="lambo_local_$(date +%s)_$$"
echo "local.sh: submitting $JOB_ID: $*"
cd "$REPO_ROOT"
ray job submit --address "http://127.0.0.1:$DASH_PORT" --submission-id "$JOB_ID" --no-wait \
  --working-dir . -- "$@" >"$TMP/submit.log" 2>&1 || { cat "$TMP/submit.log" >&2; exit 2; }

# Follow the logs until the job ends (bounded by JOB_TIMEOUT), then read its final status.
timeout "$JOB_TIMEOUT" ray job logs --address "http://127.0.0.1:$DASH_PORT" --follow "$JOB_ID" || true
STATUS="$(ray job status --address "http://127.0.0.1:$DASH_PORT" "$JOB_ID" 2>&1 | tail -n 5 || true)"
echo "$STATUS"
if grep -qi "succeeded" <<<"$STATUS"; then
  echo "local.sh: job $JOB_ID SUCCEEDED"
  exit 0
fi
echo "local.sh: job $JOB_ID did not succeed" >&2
ray job stop --address "http://127.0.0.1:$DASH_PORT" "$JOB_ID" >/dev/null 2>&1 || true
exit 1
