#!/bin/sh
# Regenerates startup-order.ld (see build.rs): profiles the host release
# agent under callgrind from start to its first answered request and lists
# every agent function that ran. Needs valgrind, curl and python3; run as
# root from the repository root after `cargo build --release -p microvm-agent`.
# Pass --merge to keep the current list's entries too. The checked-in list
# merges three profiles: the host build, an unstripped static guest build
# (AGENT=<it>; its glibc members and fat-LTO names) and agent-bench's own
# client (MICROVM_AGENT_BIN pointing at a callgrind wrapper).
set -eu
here=$(dirname "$0")
agent=${AGENT:-target/release/microvm-agent}
work=$(mktemp -d)
cgroup=/sys/fs/cgroup/unified/startup-order-$$
[ -d /sys/fs/cgroup/unified ] || cgroup=/sys/fs/cgroup/startup-order-$$
mkdir -p "$cgroup"
MICROVM_AGENT_LOG=warn valgrind --tool=callgrind --demangle=no \
    --callgrind-out-file="$work/callgrind.out" "$agent" \
    --listen "unix:$work/agent.sock" --cgroup-root "$cgroup" --run-dir "$work/run" \
    2>"$work/valgrind.log" &
pid=$!
i=0
while [ ! -S "$work/agent.sock" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
# One Health/Check: an empty gRPC message with the API version header.
printf '\0\0\0\0\0' >"$work/check.bin"
curl -sf --http2-prior-knowledge --unix-socket "$work/agent.sock" -X POST \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    -H 'microvm-agent-api-version: 1.0' --data-binary @"$work/check.bin" \
    -o /dev/null http://agent/microvm.agent.v1.Health/Check
sleep 1
kill -TERM $pid
wait $pid || true
rmdir "$cgroup" 2>/dev/null || true
merge=
[ "${1:-}" = "--merge" ] && cp "$here/startup-order.ld" "$work/previous.ld" && merge="$work/previous.ld"
python3 "$here/startup-order.py" "$work/callgrind.out" "$agent" $merge >"$here/startup-order.ld"
rm -rf "$work"
echo "wrote $here/startup-order.ld ($(grep -c '^    \*(' "$here/startup-order.ld") patterns)"
