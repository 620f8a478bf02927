#!/usr/bin/env bash
# Schema-driven fuzzing of every operation with schemathesis (PyPI), default
# checks, against the real binary on loopback: once with an admin key, once
# with no key at all. Exits non-zero on any failure or server error.
#
#   bash load-tests/fuzz.sh [path/to/ulm-server]
set -euo pipefail
cd "$(dirname "$0")/.."
binary=${1:-target/debug/ulm-server}
command -v schemathesis >/dev/null || python3 -m pip install -q --disable-pip-version-check schemathesis
work=$(mktemp -d)
key="admin-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
"$binary" serve --api-keys "admin:$key" --port 0 --data-dir "$work/data" \
  --request-timeout-secs 60 >"$work/server.out" 2>"$work/server.err" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do grep -q "listening on" "$work/server.out" && break; sleep 1; done
url=$(sed -n 's/^listening on //p' "$work/server.out")
case "$url" in http://127.*) ;; *) echo "the server is not on loopback: $url" >&2; exit 1 ;; esac
echo "== with an admin key"
schemathesis --config-file load-tests/schemathesis.toml run "$url/openapi.json" \
  -H "Authorization: Bearer $key" --seed 1
echo "== without a key"
schemathesis --config-file load-tests/schemathesis.toml run "$url/openapi.json" --seed 1
