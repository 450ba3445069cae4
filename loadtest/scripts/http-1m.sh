#!/bin/bash
# One POST /api/v1/inject of a 1,000,000-recipient campaign (58 MB of JSON) into a
# running `volley serve`: the time until its 202 (all of it durable). No MX answers
# here (the DNS port is closed), so what is measured is the intake. Loopback only.
# Usage: loadtest/scripts/http-1m.sh   (N=1000000 ROUNDS=3 V=... WORK=...)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
V=${V:-$ROOT/target/release/volley}; N=${N:-1000000}; ROUNDS=${ROUNDS:-3}
WORK=${WORK:-/tmp/volley-http-1m}; HTTP_PORT=${HTTP_PORT:-8090}
rm -rf "$WORK"; mkdir -p "$WORK"; cd "$WORK"
python3 - "$N" > big.json <<'PY'
import sys
n = int(sys.argv[1])
out = sys.stdout
out.write('{"id":"big","sender":"bounces@news.volley.test","from_domain":"news.volley.test","dkim":false,')
out.write('"template":"From: News <news@news.volley.test>\\nTo: {{email}}\\nSubject: Hello {{name}}\\n\\nHello {{name}}\\n",')
out.write('"recipients":[')
out.write(",".join('{"email":"user%d@shop%d.tail.test","name":"U%d"}' % (i, i % 3000, i) for i in range(n)))
out.write(']}')
PY
"$V" token add perf --tokens tokens > token.txt 2>/dev/null
"$V" serve --spool spool --dns 127.0.0.1:1 --smtp-port 1 --http 127.0.0.1:"$HTTP_PORT" --tokens tokens > serve.out 2> serve.err &
SP=$!
trap 'kill -TERM $SP 2>/dev/null; wait $SP' EXIT
for _ in $(seq 1 300); do grep -q "ready" serve.out && break; sleep 0.1; done
for r in $(seq 1 "$ROUNDS"); do
  t0=$(date +%s.%N)
  code=$(curl -s -o resp.json -w "%{http_code}" -X POST -H "Authorization: Bearer $(cat token.txt)" --data-binary @big.json http://127.0.0.1:"$HTTP_PORT"/api/v1/inject)
  t1=$(date +%s.%N)
  echo "round $r: $code $(cat resp.json) in $(echo "$t1-$t0" | bc) s"
  sed -i 's/"id":"big[0-9]*"/"id":"big'"$r"'"/' big.json
done
