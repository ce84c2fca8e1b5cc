#!/usr/bin/env bash
# Benchmarks (not tests): writes figures, with the command that produced them, into
# benchmarks/results.md, one section per group of benchmark programs (pg_test/src/bin):
#   core       bench_kill, bench_drain, bench_worker
#   blockers   bench_blockers
#   login      bench_login (pgbench -C with and without the library; page faults; instructions by callgrind), bench_scan (the worker's scan
#              per session under 1 and 256 rules)
#   pgbouncer  bench_pgbouncer (behind a real PgBouncer: Debian's package, which install-deps.sh installs)
#   standby    bench_standby (replay-lag limit on a real streaming standby; SESSION_KILL_BENCH_ROUNDS)
#   horizon    bench_snapshot (snapshot_timeout lateness; the snapshot limits' idle cost)
# Usage: scripts/bench.sh [--only GROUP] [15|16|17|18 ...]   (default: every group, all four majors)
# Each section states the command, commit, date and machine that produced it. With --only, the
# other groups' sections are kept as they were (with their own command and commit).
# SESSION_KILL_PG15_CONFIG / _PG16_ / _PG17_ / _PG18_CONFIG: the pg_config of another private
# installation to install into and run against (default: the tests' private installations);
# SESSION_KILL_TEST_ROOT: where the benchmarks' clusters go (default: /var/tmp/session_kill).
set -euo pipefail
cd "$(dirname "$0")/.."
command="scripts/bench.sh $*"
for var in SESSION_KILL_BENCH_ROUNDS SESSION_KILL_TEST_ROOT SESSION_KILL_PG18_CONFIG SESSION_KILL_PG17_CONFIG SESSION_KILL_PG16_CONFIG SESSION_KILL_PG15_CONFIG; do
  [[ -z ${!var:-} ]] || command="$var=${!var} $command"
done
source scripts/common.sh
all_groups=(core blockers login pgbouncer standby horizon)
declare -A benches=([core]="bench_kill bench_drain bench_worker" [blockers]="bench_blockers" [login]="bench_login bench_scan"
  [pgbouncer]="bench_pgbouncer" [standby]="bench_standby"
  [horizon]="bench_snapshot")
groups=("${all_groups[@]}")
if [[ ${1:-} == --only ]]; then
  [[ -n ${2:-} && -n ${benches[$2]:-} ]] || { echo "error: --only needs one of: ${all_groups[*]}" >&2; exit 2; }
  groups=("$2")
  shift 2
fi
use_majors "$@"
out=benchmarks/results.md
root=${SESSION_KILL_TEST_ROOT:-/var/tmp/session_kill}
mkdir -p benchmarks "$root"
chown postgres: "$root"
cargo build --release --manifest-path pg_test/Cargo.toml --bins

commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src sql pg_test scripts Cargo.toml build.rs .cargo || echo ', with uncommitted changes')"
stamp="$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, commit $commit"

header_core() {
  echo "## kill_sessions, drain_database and the worker ($stamp)"
  echo
  echo "Command: \`$command\` (pg_test/src/bin/bench_kill.rs, bench_drain.rs and bench_worker.rs; release build of the extension)."
  echo
  echo "session_kill's calls return only when every signalled backend has left the process array (its connection"
  echo "slot is free), a stricter end than the recipes' \"pg_stat_activity shows none\", which a backend reaches"
  echo "earlier in its exit; the drain also waits for logins admitted just before the gate closed."
  echo "Before each round the benchmark waits until the audit entries of earlier rounds are written to"
  echo "session_kill.log (the sync worker writes them about a second after they queue), so no round pays"
  echo "for another's audit."
  echo
}

header_blockers() {
  echo "## Lock blockers: blocker_timeout, make_way_after and the recipes ($stamp)"
  echo
  echo "Command: \`$command\` (pg_test/src/bin/bench_blockers.rs; release build of the extension)."
  echo "Load average (1, 5, 15 min) when the command started: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
}

header_login() {
  echo "## The cost on every login ($stamp)"
  echo
  echo "Command: \`$command\` (pg_test/src/bin/bench_login.rs and bench_scan.rs; release build of the extension)."
  echo
}

header_pgbouncer() {
  echo "## Behind PgBouncer ($stamp)"
  echo
  echo "Command: \`$command\` (pg_test/src/bin/bench_pgbouncer.rs, release build; it starts its own server and"
  echo "PgBouncer processes)."
  echo
}

header_horizon() {
  echo "## The horizon guard ($stamp)"
  echo
  echo "Command: \`$command\` (pg_test/src/bin/bench_snapshot.rs; release build of the extension)."
  echo
}

header_standby() {
  echo "## Standby replay-lag limit ($stamp)"
  echo
  echo "Command: \`$command\` (pg_test/src/bin/bench_standby.rs; release build of the extension)."
  echo
}

for g in "${groups[@]}"; do
  { echo "<!-- bench:$g -->"; "header_$g"; } >"$out.$g.new"
done
for v in "${majors[@]}"; do
  pg_config=$(pg_config_for "$v")
  var=SESSION_KILL_PG${v}_CONFIG
  pg_config=${!var:-$pg_config}
  install_extension "$pg_config" --no-default-features --features "pg$v"
  for g in "${groups[@]}"; do
    for bench in ${benches[$g]}; do
      SESSION_KILL_PG_BINDIR=$("$pg_config" --bindir) SESSION_KILL_TEST_ROOT=$root "pg_test/target/release/$bench" |
        tee -a "$out.$g.new"
    done
    echo >>"$out.$g.new"
  done
done

# The file: every group's section, new or as it was.
{
  echo "# Benchmark results"
  echo
  echo "Written by \`scripts/bench.sh\`, one section per group of benchmarks; each section names the command"
  echo "and commit that produced it (\`--only GROUP\` regenerates one section and keeps the others)."
  echo
  for g in "${all_groups[@]}"; do
    if [[ -f $out.$g.new ]]; then
      cat "$out.$g.new"
      echo "<!-- /bench:$g -->"
      echo
    elif [[ -f $out ]]; then
      # The lines from this group's opening marker to its closing one, as they were.
      awk -v first="<!-- bench:$g -->" -v last="<!-- /bench:$g -->" \
        '$0 == first { keep = 1 } keep { print } $0 == last { if (keep) print ""; keep = 0 }' "$out"
    fi
  done
} >"$out.new"
for g in "${groups[@]}"; do rm -f "$out.$g.new"; done
mv "$out.new" "$out"
echo "wrote $out"
