#!/usr/bin/env bash
# Issue 13 against a real Slurm: starts a one-node cluster on localhost (munged, slurmctld,
# slurmd, all as root, every file under a temp dir), submits examples/slurm/'s job array on
# the CPU over a small PNG dataset, lets its merge job run after it, and checks that the
# merged slices.csv and metrics.json equal a one-process run's byte for byte. Stops the
# daemons it started, by PID, also on failure.
#
# Needs: root, Debian's slurmctld slurmd slurm-client munge, python3, target/release/fcd.
# Prints "slurm: 1 passed, 0 failed" (or 0 passed, 1 failed and exits 1) as its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
fcd="$root/target/release/fcd"
fixtures="$root/tests/fixtures"
tmp="$(mktemp -d /tmp/fcd-slurm.XXXXXX)"
pids=()
passed=0

finish() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        # The daemons exit within seconds of SIGTERM; give up waiting after 20 s.
        for _ in $(seq 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
    done
    if [ "$passed" = 1 ]; then
        rm -rf "$tmp"
        echo "slurm: 1 passed, 0 failed"
    else
        echo "logs and outputs kept in $tmp"
        echo "slurm: 0 passed, 1 failed"
        exit 1
    fi
    exit "$status"
}
trap finish EXIT

fail() {
    echo "FAILED: $*" >&2
    for log in "$tmp"/*.log "$tmp"/out/logs/*.log; do
        [ -e "$log" ] && { echo "---- $log"; tail -n 20 "$log"; } >&2
    done
    exit 1
}

[ "$(id -u)" = 0 ] || fail "run as root (the test cluster's daemons and jobs run as root)"
for tool in munged slurmctld slurmd sbatch squeue python3; do
    command -v "$tool" >/dev/null || fail "$tool not found: apt-get install -y slurmctld slurmd slurm-client munge"
done
[ -x "$fcd" ] || fail "$fcd not built: cargo build --release"

echo "== one-node cluster in $tmp"
mkdir -p "$tmp/state" "$tmp/spool" "$tmp/munge"
chmod 700 "$tmp/munge"
dd if=/dev/urandom of="$tmp/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$tmp/munge/munge.key"
munged --foreground --force --key-file="$tmp/munge/munge.key" \
    --socket="$tmp/munge/munge.socket" --pid-file="$tmp/munge/munged.pid" \
    --seed-file="$tmp/munge/munged.seed" --log-file="$tmp/munged.log" >/dev/null 2>&1 &
pids+=($!)

# Ports other than Slurm's defaults, so that a cluster already on this machine is not disturbed.
export SLURM_CONF="$tmp/slurm.conf"
cat >"$SLURM_CONF" <<CONF
ClusterName=fcdtest
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$tmp/munge/munge.socket
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
for _ in $(seq 20); do
    [ -S "$tmp/munge/munge.socket" ] && break
    sleep 0.25
done
# In the foreground (-D), so that $! is the daemon; they log to their files and to stderr.
slurmctld -D -i -f "$SLURM_CONF" 2>/dev/null &
pids+=($!)
slurmd -D -N localhost -f "$SLURM_CONF" 2>/dev/null &
pids+=($!)
for _ in $(seq 60); do
    sinfo -h -N -o %t 2>/dev/null | grep -qx idle && break
    sleep 0.5
done
sinfo -h -N -o %t | grep -qx idle || fail "the node did not become idle: $(sinfo -N 2>&1)"
echo "node idle after ${SECONDS}s"

echo "== dataset and one-process reference"
python3 "$root/tests/slurm/make_dataset.py" "$tmp/data" 3 1
model=(--config "$fixtures/config_small.yaml" --unet "$fixtures/unet.pt"
    --classifier "$fixtures/classifier.pt")
"$fcd" eval "${model[@]}" --data "$tmp/data" --out "$tmp/single" --steps 2 --device cpu

echo "== job array of 4 tasks, 2 at a time, then the merge"
start=$SECONDS
export FCD="$fcd" FCD_CONFIG="$fixtures/config_small.yaml" FCD_UNET="$fixtures/unet.pt"
export FCD_CLASSIFIER="$fixtures/classifier.pt" FCD_DATA="$tmp/data" FCD_OUT="$tmp/out"
export FCD_EVAL_ARGS="--steps 2 --device cpu" FCD_SHARDS=4 FCD_THROTTLE=2 FCD_GRES=none
read -r array merge < <("$root/examples/slurm/submit.sh")
echo "array job $array, merge job $merge"
for _ in $(seq 240); do
    [ -z "$(squeue -h -j "$array,$merge" 2>/dev/null)" ] && break
    sleep 0.5
done
[ -z "$(squeue -h -j "$array,$merge")" ] || fail "jobs still queued after 120 s: $(squeue)"
echo "array and merge done in $((SECONDS - start))s"
merge_log="$tmp/out/logs/merge-$merge.log"
[ -e "$merge_log" ] || fail "the merge job did not run: a task of the array failed"
cat "$merge_log"

for name in slices.csv metrics.json; do
    [ -e "$tmp/out/$name" ] || fail "the merge wrote no $name"
    cmp "$tmp/single/$name" "$tmp/out/$name" || fail "merged $name differs from the one-process run's"
done
shards=$(find "$tmp/out/shards" -mindepth 1 -maxdepth 1 -type d | wc -l)
[ "$shards" = 4 ] || fail "$shards shard folders, expected 4"
passed=1
