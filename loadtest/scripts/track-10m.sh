#!/bin/sh
# `volley track` on a 10,000,000-line accounting log: generates the log (records
# shaped like volley's, ~280 octets each, 1,000,000 distinct recipients spread
# through it, a deferral every tenth line), then times the first lookup (which
# builds the index) and warm lookups of other recipients.
#
#   loadtest/scripts/track-10m.sh [DIR]     (VOLLEY=path/to/volley, LINES=N)
set -eu
VOLLEY=${VOLLEY:-target/debug/volley}
DIR=${1:-/tmp/volley-track-10m}
LINES=${LINES:-10000000}
LOG="$DIR/accounting.jsonl"
mkdir -p "$DIR"
if [ ! -s "$LOG" ]; then
    echo "generating $LINES lines into $LOG"
    awk -v n="$LINES" 'BEGIN {
        for (i = 0; i < n; i++) {
            r = (i * 7919) % 1000000
            s = sprintf("%02d:%02d:%02d.%03d", int(i / 3600000) % 24, int(i / 60000) % 60, int(i / 1000) % 60, i % 1000)
            if (i % 10 == 3)
                printf "{\"type\":\"TransientFailure\",\"time\":\"2026-11-30T%sZ\",\"campaign\":\"bench\",\"rcpt\":\"user%d@example.com\",\"sender\":\"bounces@news.example\",\"domain\":\"example.com\",\"mx\":\"mx1.example.com\",\"ip\":\"192.0.2.1:25\",\"code\":450,\"enhanced\":\"4.2.1\",\"class\":\"transient_other\",\"reply\":\"Mailbox temporarily unavailable\",\"stage\":\"rcpt\",\"attempt\":1,\"queued_ms\":%d,\"tx_ms\":3,\"shard\":%d}\n", s, r, i % 100000, i % 4
            else
                printf "{\"type\":\"Delivery\",\"time\":\"2026-11-30T%sZ\",\"campaign\":\"bench\",\"rcpt\":\"user%d@example.com\",\"sender\":\"bounces@news.example\",\"domain\":\"example.com\",\"mx\":\"mx1.example.com\",\"ip\":\"192.0.2.1:25\",\"code\":250,\"enhanced\":\"2.0.0\",\"reply\":\"OK queued as %x\",\"stage\":\"data\",\"attempt\":1,\"queued_ms\":%d,\"tx_ms\":3,\"shard\":%d}\n", s, r, i, i % 100000, i % 4
        }
    }' > "$LOG"
fi
ls -l "$LOG"
wc -l < "$LOG"
rm -rf "$DIR/.accounting.jsonl.idx"
t() {
    start=$(date +%s%N)
    "$VOLLEY" track "$1" --log "$LOG" --spool "$DIR/no-spool" > /dev/null || true
    end=$(date +%s%N)
    echo "track $1: $(( (end - start) / 1000000 )) ms"
}
echo "first lookup (builds the index):"
t user4242@example.com
echo "warm lookups:"
for r in user4242@example.com user1@example.com user999999@example.com user500000@example.com nobody@example.com; do
    t "$r"
done
du -sh "$DIR/.accounting.jsonl.idx"
