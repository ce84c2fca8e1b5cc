#!/usr/bin/env bash
# Benchmarks (not tests): writes figures, with the command that produced them, into
# benchmarks/results.md. Usage: scripts/bench.sh [15|16|18 ...]   (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
use_majors "$@"
out=benchmarks/results.md
mkdir -p benchmarks /var/tmp/session_kill
chown postgres: /var/tmp/session_kill
cargo build --release --manifest-path pg_test/Cargo.toml --bins

{
  echo "## kill_sessions, drain_database and the worker ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, commit $(git rev-parse --short HEAD))"
  echo
  echo "Command: \`scripts/bench.sh ${majors[*]}\` (pg_test/src/bin/bench_kill.rs, bench_drain.rs and bench_worker.rs; release build of the extension)."
  echo
  echo "session_kill's calls return only when every signalled backend has left the process array (its connection"
  echo "slot is free), a stricter end than the recipes' \"pg_stat_activity shows none\", which a backend reaches"
  echo "earlier in its exit; the drain also waits for logins admitted just before the gate closed."
  echo "Before each round the benchmark waits until the audit entries of earlier rounds are written to"
  echo "session_kill.log (the sync worker writes them about a second after they queue), so no round pays"
  echo "for another's audit."
  echo
} >"$out.new"
for v in "${majors[@]}"; do
  pg_config=$(pg_config_for "$v")
  install_extension "$pg_config" --no-default-features --features "pg$v"
  for bench in bench_kill bench_drain bench_worker; do
    SESSION_KILL_PG_BINDIR=$("$pg_config" --bindir) "pg_test/target/release/$bench" | tee -a "$out.new"
  done
  echo >>"$out.new"
done
mv "$out.new" "$out"
echo "wrote $out"
