#!/usr/bin/env bash
# Runs every test of session_kill on PostgreSQL 15, 16, 17 and 18, installing what is missing first:
#   1. plain `cargo test` of the pure policy module;
#   2. `cargo pgrx test`: in-backend tests in a server with the library preloaded;
#   3. pg_test/: integration tests against a real preloaded server with many real clients,
#      psql scripts, dropdb and pgbench, and the attack tier;
#   4. scripts/operator-check.sh: the README's commands beside running servers (PostgreSQL 15);
#   5. scripts/package-check.sh: the Debian package (scripts/package.sh) installed with apt into
#      Debian's PostgreSQL 15 and smoke-tested in a clean cluster, then removed; META.json.
# Tests install into private installations, never into the demo's; the package tier installs the
# package into Debian's PostgreSQL 15, and puts back the files it replaced when it removes it.
# Usage: scripts/test.sh [15|16|17|18 ...]   (default: all four)
# SESSION_KILL_TEST_ROOT (default /var/tmp/session_kill) holds the test clusters; a run clears the
# clusters of earlier runs there, so concurrent runs on one machine need different roots.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
use_majors "$@"
work=${SESSION_KILL_TEST_ROOT:-/var/tmp/session_kill}
mkdir -p "$work"
rm -rf "$work"/cluster-* "$work"/standby-*  # clusters of earlier runs; each test stops its own
chown postgres: "$work"
chmod 755 "$work"
summary=()
total_passed=0
total_failed=0

# run_tier NAME COMMAND...: runs a cargo test command, echoing its output, and records the counts
# from its "test result" lines.
run_tier() {
  local name=$1 log
  shift
  log=$(mktemp)
  echo "==> $name: $*"
  set +e
  "$@" 2>&1 | tee "$log"
  local status=${PIPESTATUS[0]}
  set -e
  local passed failed
  # Only the runners' closing lines count: a test's own output may say "failed".
  results=$(grep -E '^(test result: |operator checks: |package checks: )' "$log" || true)
  passed=$(grep -Eo '[0-9]+ passed' <<<"$results" | awk '{s += $1} END {print s + 0}')
  failed=$(grep -Eo '[0-9]+ failed' <<<"$results" | awk '{s += $1} END {print s + 0}')
  rm -f "$log"
  if ((status != 0 && failed == 0)); then failed=1; fi
  summary+=("$(printf '%-48s %4d passed, %d failed' "$name" "$passed" "$failed")")
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
}

for v in "${majors[@]}"; do
  pg_config=$(pg_config_for "$v")
  features=(--no-default-features --features "pg$v")
  run_tier "PG$v tier 1: pure unit tests (cargo test)" \
    cargo test --lib "${features[@]}" -- policy:: gate:: counters:: rules:: audit:: fixed:: clock:: lock_graph:: reasons:: act:: make_way:: xmin_hold:: replay::
  export CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA=$work/pgrx-test-data-pg$v
  run_tier "PG$v tier 2: in-backend tests (cargo pgrx test)" \
    cargo pgrx test "pg$v" pg_tests::
  install_extension "$pg_config" --debug "${features[@]}"
  SESSION_KILL_PG_BINDIR=$("$pg_config" --bindir) SESSION_KILL_TEST_ROOT=$work \
    run_tier "PG$v tier 3: integration tests (pg_test/)" \
    cargo test --no-fail-fast --manifest-path pg_test/Cargo.toml
done

if [[ " ${majors[*]} " == *" 15 "* ]]; then
  run_tier "operator: the README's commands beside running servers" bash scripts/operator-check.sh
  run_tier "package: the Debian package in a clean cluster" bash scripts/package-check.sh
fi

echo
echo "Summary"
printf '  %s\n' "${summary[@]}"
echo "all tiers: $total_passed passed, $total_failed failed"
((total_failed == 0))
