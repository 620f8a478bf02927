#!/usr/bin/env bash
# Serving latency while an RL job trains, against idle (load-tests/README.md):
#   cluster:   a serving replica pinned to core 0, a worker pinned to core 1
#   inprocess: one process on both cores that serves and trains
# Needs PostgreSQL (PG=postgres://user:pass@host:port/db, a database to
# create others from), moto_server (pip install 'moto[server]'), taskset, and
# release builds: cargo build --release -p ulm-server -p ulm-load
# Usage: PG=postgres://postgres:postgres@127.0.0.1:5432/postgres load-tests/cluster-latency.sh cluster
set -euo pipefail
mode=${1:?cluster or inprocess}
: "${PG:?set PG to a PostgreSQL URL}"
cd "$(dirname "$0")/.."
B=$(mktemp -d)
db=ulm_bench_$(date +%s)
psql -q "$PG" -c "CREATE DATABASE $db"
DB="${PG%/*}/$db"
export AWS_ENDPOINT=http://127.0.0.1:19000 AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=t AWS_SECRET_ACCESS_KEY=t AWS_DEFAULT_REGION=us-east-1
taskset -c 0 moto_server -H 127.0.0.1 -p 19000 >/dev/null 2>&1 &
moto=$!
for _ in $(seq 1 50); do curl -fs -X PUT http://127.0.0.1:19000/bench >/dev/null && break; sleep 0.2; done
pids=($moto)
if [ $mode = cluster ]; then
  taskset -c 0 target/release/ulm-server serve --no-auth --demo --no-rl-scheduler --port 18181 --data-dir $B/a \
    --database-url $DB --blob-url s3://bench/ulm > $B/a.out 2> $B/a.err &
  replica=$!
  taskset -c 1 target/release/ulm-server worker --demo --port 18182 --data-dir $B/w \
    --database-url $DB --blob-url s3://bench/ulm > $B/w.out 2> $B/w.err &
  pids+=($replica $!)
else
  # The same two cores, one process: the job trains inside the serving process.
  taskset -c 0,1 target/release/ulm-server serve --no-auth --demo --port 18181 --data-dir $B/a \
    --database-url $DB --blob-url s3://bench/ulm > $B/a.out 2> $B/a.err &
  replica=$!
  pids+=($replica)
fi
trap 'kill ${pids[*]} 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q "listening on" $B/a.out && break; sleep 0.2; done
sleep 2
taskset -c 0 target/release/ulm-load --url http://127.0.0.1:18181 --scenario answer --concurrency 4 --duration 45 \
  --server-pid $replica --while-training '{"steps": 1000, "lr": 0.0001, "groups_per_step": 4}' --report $B/report.json > $B/load.out 2>&1
tail -9 $B/load.out
echo "logs and report: $B"
