#!/bin/sh
# Point-in-time recovery benchmark (issue 21). A throwaway cluster archives its WAL into a
# file:// repository with `rollcall repo wal-push`; pgbench data at BENCH_SCALE (default 30,
# about 450 MB); then `rollcall repo base-backup`, BENCH_LOAD_SECONDS (default 60) of pgbench
# load with archiving on, the time T, 10 s more load, and `rollcall repo restore-postgres
# --to-time T` into a new data directory. Prints the base backup's time and rate, the WAL the
# load wrote and how far the archive lagged behind it, the restore's time, and checks that the
# restored pgbench_history holds exactly the rows committed by T. The same restore by hand
# (pg_basebackup -Ft, tar -x, restore_command = cp) and, when installed, with pgBackRest
# (BENCH_PGBACKREST=0 leaves it out), BENCH_ROUNDS rounds (default 2) alternating rollcall and
# by hand, medians and ratios. ROLLCALL=PATH picks the binary (default: a release build of
# this tree).
set -eu
cd "$(dirname "$0")/.."
SCALE=${BENCH_SCALE:-30}
LOAD=${BENCH_LOAD_SECONDS:-60}
if [ -z "${ROLLCALL:-}" ]; then
  cargo build --release -q -p cli
  ROLLCALL=$PWD/target/release/rollcall
fi

dir=$(mktemp -d /tmp/rollcall-pitr-bench.XXXXXX)
chmod 755 "$dir"
cp "$ROLLCALL" "$dir/rollcall"
chmod 755 "$dir/rollcall"
mkdir "$dir/repo" "$dir/hand"
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir"; fi
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
port=$(free_port)
restored_port=$(free_port)
cleanup() {
  as_pg pg_ctl -D "$dir/restored" -m immediate stop >/dev/null 2>&1 || true
  as_pg pg_ctl -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

# pgBackRest side by side when it is installed (Debian: apt-get install pgbackrest); each
# segment is then archived three times in a row (rollcall, by hand, pgBackRest).
PGBR_PUSH=""
if command -v pgbackrest >/dev/null 2>&1 && [ "${BENCH_PGBACKREST:-1}" = 1 ]; then
  mkdir -p "$dir/pgbr-repo" "$dir/pgbr-log" "$dir/pgbr-lock" "$dir/pgbr-spool"
  cat >"$dir/pgbackrest.conf" <<EOF
[global]
repo1-path=$dir/pgbr-repo
log-path=$dir/pgbr-log
lock-path=$dir/pgbr-lock
spool-path=$dir/pgbr-spool
compress-type=zst
repo1-retention-full=1
start-fast=y
log-level-console=warn

[bench]
pg1-path=$dir/data
pg1-port=$port
pg1-socket-path=$dir
pg1-user=postgres
EOF
  if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir"; fi
  PGBR="pgbackrest --config=$dir/pgbackrest.conf --stanza=bench"
  PGBR_PUSH=" && $PGBR archive-push %p"
fi
as_pg initdb -D "$dir/data" -U postgres -A trust >/dev/null
cat >>"$dir/data/postgresql.auto.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
wal_level = replica
archive_mode = on
archive_command = '$dir/rollcall repo wal-push --repo file://$dir/repo %p && (test -f $dir/hand/%f || cp %p $dir/hand/%f)$PGBR_PUSH'
max_wal_size = '1GB'
EOF
as_pg pg_ctl -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
if [ -n "$PGBR_PUSH" ]; then as_pg $PGBR stanza-create >/dev/null; fi
url="postgresql://postgres@127.0.0.1:$port/postgres"
q() { psql -X -q -At -d "$url" -c "$1"; }
now() { date +%s.%N; }
secs() { printf "%.2f" "$(echo "$2 - $1" | bc)"; }

pgbench -q -i -s "$SCALE" "$url" >/dev/null 2>&1
db_bytes=$(q "SELECT pg_database_size('postgres')")
echo "database: $((db_bytes / 1048576)) MB (pgbench scale $SCALE)"

t0=$(now)
"$dir/rollcall" repo base-backup --repo "file://$dir/repo" --database-url "$url" >"$dir/base.json"
t1=$(now)
base_s=$(secs "$t0" "$t1")
stored=$(python3 -c "import json,sys; b=json.load(open('$dir/base.json')); print(b['size'], b['tar_size'])")
echo "base backup: ${base_s} s, $(echo "$db_bytes / 1048576 / $base_s" | bc) MB/s of database; stored $(echo "$stored" | cut -d' ' -f1) bytes (tar $(echo "$stored" | cut -d' ' -f2))"

# The same by hand: pg_basebackup's tar (no WAL: it comes from the archive), a plain copy
# of each segment beside rollcall's archive (archive_command above).
t0=$(now)
as_pg pg_basebackup -d "$url" -D "$dir/hand/base" -Ft -X none -c fast >/dev/null
t1=$(now)
echo "by hand: pg_basebackup -Ft: $(secs "$t0" "$t1") s"
if [ -n "$PGBR_PUSH" ]; then
  t0=$(now)
  as_pg $PGBR --type=full backup >/dev/null
  t1=$(now)
  echo "pgBackRest $(pgbackrest version | cut -d' ' -f2): backup --type=full (zst): $(secs "$t0" "$t1") s"
fi

lsn0=$(q "SELECT pg_current_wal_lsn()")
tps=$(pgbench -n -c 2 -j 2 -T "$LOAD" "$url" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
lsn1=$(q "SELECT pg_current_wal_lsn()")
wal_mb=$(q "SELECT round(pg_wal_lsn_diff('$lsn1', '$lsn0') / 1048576)")
lag=$(q "SELECT pg_walfile_name('$lsn1') || ' written, ' || coalesce(last_archived_wal, 'none') || ' archived' FROM pg_stat_archiver")
echo "load: ${LOAD} s of pgbench at $(printf "%.0f" "$tps") tps wrote ${wal_mb} MB of WAL; at its end: $lag"

target=$(q "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
expected=$(q "SELECT count(*) FROM pgbench_history")
# Polls with a deadline: every later commit must be stamped after T.
until_true() {
  deadline=$(($(date +%s) + $2))
  while [ "$(q "$1")" != t ]; do
    if [ "$(date +%s)" -gt "$deadline" ]; then
      echo "gave up after $2 s waiting for: $1" >&2
      exit 1
    fi
    sleep 0.1
  done
}
until_true "SELECT clock_timestamp() > '$target'" 10
pgbench -n -c 2 -j 2 -T 10 "$url" >/dev/null 2>&1
last=$(q "SELECT pg_walfile_name(pg_switch_wal())")
t2=$(now)
until_true "SELECT coalesce(last_archived_wal, '') >= '$last' FROM pg_stat_archiver" 300
t3=$(now)
failed=$(q "SELECT failed_count FROM pg_stat_archiver")
echo "archive caught up $(secs "$t2" "$t3") s after the last switch; failed pushes: $failed"

# Restores to T, rollcall's and by hand, BENCH_ROUNDS each (default 2), alternating which
# goes first. Both end with the server recovered, promoted and stopped cleanly.
check_rows() {
  as_pg pg_ctl -D "$1" -l "$1.log" \
    -o "-p $restored_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir" -w start >/dev/null
  got=$(psql -X -At -d "postgresql://postgres@127.0.0.1:$restored_port/postgres" -c "SELECT count(*) FROM pgbench_history")
  as_pg pg_ctl -D "$1" -m fast -w stop >/dev/null
  if [ "$got" != "$expected" ]; then
    echo "check FAILED ($2): pgbench_history holds $got rows, $expected were committed by T" >&2
    exit 1
  fi
}
restore_rollcall() {
  rm -rf "$dir/restored" "$dir/restored.rollcall-recovery.log"
  t4=$(now)
  "$dir/rollcall" repo restore-postgres --repo "file://$dir/repo" --to-time "$target" \
    --data-dir "$dir/restored" >"$dir/restore.json"
  t5=$(now)
  fetched=$(grep -c 'restored log file' "$dir/restored.rollcall-recovery.log" || true)
  rollcall_s="$rollcall_s $(secs "$t4" "$t5")"
  echo "rollcall restore to T: $(secs "$t4" "$t5") s ($fetched WAL segments fetched and replayed)"
  check_rows "$dir/restored" rollcall
}
restore_by_hand() {
  h="$dir/hand-restored"
  as_pg rm -rf "$h"
  t4=$(now)
  as_pg mkdir -m 700 "$h"
  as_pg tar -xf "$dir/hand/base/base.tar" -C "$h"
  as_pg touch "$h/recovery.signal"
  printf "%s\n" \
    "restore_command = 'cp $dir/hand/%f %p'" \
    "recovery_target_time = '$(echo "$target" | sed 's/T/ /; s/Z$/+00/')'" \
    "recovery_target_action = 'promote'" \
    "archive_mode = off" \
    "listen_addresses = ''" \
    "port = $restored_port" \
    "unix_socket_directories = '$dir'" | as_pg sh -c "cat >>'$h/postgresql.auto.conf'"
  as_pg pg_ctl -D "$h" -l "$h.log" -w -t 3600 start >/dev/null
  deadline=$(($(date +%s) + 3600))
  while [ "$(psql -X -At -h "$dir" -p "$restored_port" -U postgres -d postgres -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" != f ]; do
    if [ "$(date +%s)" -gt "$deadline" ]; then echo "by-hand recovery did not promote" >&2; exit 1; fi
    sleep 0.1
  done
  as_pg pg_ctl -D "$h" -m fast -w stop >/dev/null
  t5=$(now)
  hand_s="$hand_s $(secs "$t4" "$t5")"
  echo "by-hand restore to T (tar -x, restore_command = cp): $(secs "$t4" "$t5") s"
  check_rows "$h" "by hand"
}
restore_pgbackrest() {
  h="$dir/pgbr-restored"
  as_pg rm -rf "$h"
  t4=$(now)
  as_pg mkdir -m 700 "$h"
  as_pg $PGBR --pg1-path="$h" --type=time --target="$(echo "$target" | sed 's/T/ /; s/Z$/+00/')" \
    --target-action=promote restore >/dev/null
  as_pg pg_ctl -D "$h" -l "$h.log" -w -t 3600 \
    -o "-p $restored_port -c listen_addresses= -c unix_socket_directories=$dir -c archive_mode=off" start >/dev/null
  deadline=$(($(date +%s) + 3600))
  while [ "$(psql -X -At -h "$dir" -p "$restored_port" -U postgres -d postgres -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" != f ]; do
    if [ "$(date +%s)" -gt "$deadline" ]; then echo "pgBackRest's recovery did not promote" >&2; exit 1; fi
    sleep 0.1
  done
  as_pg pg_ctl -D "$h" -m fast -w stop >/dev/null
  t5=$(now)
  pgbr_s="$pgbr_s $(secs "$t4" "$t5")"
  echo "pgBackRest restore --type=time: $(secs "$t4" "$t5") s"
  check_rows "$h" pgBackRest
}
median() { echo "$@" | tr ' ' '\n' | sed '/^$/d' | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
rollcall_s=""
hand_s=""
pgbr_s=""
round=0
while [ "$round" -lt "${BENCH_ROUNDS:-2}" ]; do
  if [ $((round % 2)) = 0 ]; then restore_rollcall; restore_by_hand; else restore_by_hand; restore_rollcall; fi
  if [ -n "$PGBR_PUSH" ]; then restore_pgbackrest; fi
  round=$((round + 1))
done
r=$(median $rollcall_s)
hd=$(median $hand_s)
echo "median restore to T: rollcall $r s, by hand $hd s, rollcall/by hand $(echo "scale=2; $r / $hd" | bc)"
if [ -n "$PGBR_PUSH" ]; then
  pb=$(median $pgbr_s)
  echo "median restore to T: pgBackRest $pb s, rollcall/pgBackRest $(echo "scale=2; $r / $pb" | bc)"
fi
echo "check: every restore holds exactly the $expected pgbench_history rows committed by T"
