#!/usr/bin/env bash
# Benchmark (not a test): session_kill behind a real PgBouncer (pg_test/src/bin/bench_pgbouncer.rs).
# Writes its figures, with this command, into the "Behind PgBouncer" section of
# benchmarks/results.md (between <!-- bench:pgbouncer --> markers, scripts/bench.sh's convention),
# replacing only that section; the other sections are left as they are.
#
# Usage: benchmarks/pgbouncer.sh [PG_CONFIG ...]
#   PG_CONFIG: the pg_config of an installation that has session_kill installed (default: the
#   tests' private PostgreSQL 15, 16 and 18, where scripts/test.sh and scripts/bench.sh install
#   it). One subsection per installation.
# Needs Debian's pgbouncer (scripts/install-deps.sh installs it). Set SESSION_KILL_TEST_ROOT to
# choose where the server and the poolers keep their files (default /var/tmp/session_kill).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
pg_configs=("$@")
((${#pg_configs[@]})) || pg_configs=("$PG15_PRIVATE_CONFIG" "$PG16_CONFIG" "$PG18_CONFIG")
out=benchmarks/results.md
root=${SESSION_KILL_TEST_ROOT:-/var/tmp/session_kill}
mkdir -p "$root"
chown postgres: "$root"
cargo build --release --manifest-path pg_test/Cargo.toml --bin bench_pgbouncer

section=$(mktemp)
{
  echo "<!-- bench:pgbouncer -->"
  echo "## Behind PgBouncer ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, commit $(git rev-parse --short HEAD))"
  echo
  echo "Command: \`benchmarks/pgbouncer.sh $*\` (pg_test/src/bin/bench_pgbouncer.rs, release build, against the"
  echo "session_kill installed for each pg_config; it starts its own server and PgBouncer processes)."
  echo
  for pg_config in "${pg_configs[@]}"; do
    SESSION_KILL_PG_BINDIR=$("$pg_config" --bindir) SESSION_KILL_TEST_ROOT=$root pg_test/target/release/bench_pgbouncer
  done
  echo "<!-- /bench:pgbouncer -->"
} >"$section"

# Replace the lines between the section's markers (scripts/bench.sh's convention), or append them.
touch "$out"
awk -v section="$section" '
  $0 == "<!-- bench:pgbouncer -->" { while ((getline line < section) > 0) print line; skipping = 1; done = 1; next }
  skipping { if ($0 == "<!-- /bench:pgbouncer -->") skipping = 0; next }
  { print }
  END { if (!done) { print ""; while ((getline line < section) > 0) print line } }
' "$out" >"$out.new"
mv "$out.new" "$out"
rm -f "$section"
echo "wrote the \"Behind PgBouncer\" section of $out"
