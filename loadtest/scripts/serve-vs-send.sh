#!/bin/bash
# `volley serve` delivery against `volley send`, same campaign, same sink, alternating:
# a 100,000-recipient accept-all campaign sent by `volley send` into a fresh spool,
# then handed by `volley send` to a running `volley serve` on another fresh spool. The
# whole command is timed each time (ingest included). Loopback only; bounded.
# Usage: loadtest/scripts/serve-vs-send.sh   (N=100000 ROUNDS=5 V=... L=... WORK=...)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
V=${V:-$ROOT/target/release/volley}; L=${L:-$ROOT/target/release/volley-load}
N=${N:-100000}; ROUNDS=${ROUNDS:-5}; WORK=${WORK:-/tmp/volley-serve-vs-send}
SINK_PORT=${SINK_PORT:-2600}; DNS_PORT=${DNS_PORT:-5400}
rm -rf "$WORK"; mkdir -p "$WORK"; cd "$WORK"
"$L" sink --port "$SINK_PORT" --threads 1 --dns 127.0.0.1:"$DNS_PORT" --stats-interval-s 0 --summary sink.json > sink.log 2>&1 &
SINK=$!
trap 'kill $SINK 2>/dev/null' EXIT
sleep 1
"$L" gen --out camp --recipients "$N" > /dev/null
for r in $(seq 1 "$ROUNDS"); do
  rm -rf s1; t0=$(date +%s.%N)
  "$V" send camp --spool s1 --dns 127.0.0.1:"$DNS_PORT" --smtp-port "$SINK_PORT" --quiet --ehlo perf.volley.test > s1.out 2>/dev/null
  t1=$(date +%s.%N); d1=$(grep -o "^delivered *[0-9]*" s1.out | grep -o "[0-9]*$")
  rm -rf s2
  "$V" serve --spool s2 --dns 127.0.0.1:"$DNS_PORT" --smtp-port "$SINK_PORT" > serve.out 2> serve.err &
  SP=$!
  for _ in $(seq 1 300); do grep -q "ready" serve.out && break; sleep 0.1; done
  t2=$(date +%s.%N)
  "$V" send camp --spool s2 --quiet > s2.out 2>/dev/null
  t3=$(date +%s.%N); d2=$(grep -o "^delivered *[0-9]*" s2.out | grep -o "[0-9]*$")
  kill -TERM $SP; wait $SP
  echo "round $r: send $d1 in $(echo "$t1-$t0" | bc) s; serve $d2 in $(echo "$t3-$t2" | bc) s; serve/send $(echo "scale=3; ($t1-$t0)/($t3-$t2)" | bc)"
done
