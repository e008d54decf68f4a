#!/usr/bin/env bash
# Submits a sharded `fcd eval` to Slurm: a job array of FCD_SHARDS tasks, at most FCD_THROTTLE
# running at once, each on one GPU, and the merge job, which waits for all of them
# (--dependency=afterok). Prints the two job ids, array first.
#
#   FCD_CONFIG=... FCD_UNET=... FCD_DATA=... FCD_OUT=... examples/slurm/submit.sh
#
# Parameters (environment), besides those of eval_array.sbatch:
#   FCD_SHARDS     tasks in the array (default 8); each evaluates about 1/FCD_SHARDS of the subjects
#   FCD_THROTTLE   tasks running at once (default 4): the array's %-throttle
#   FCD_GRES       GPU request per task (default gpu:1; "none" runs on CPUs, e.g. on a test cluster
#                  without GPUs, with FCD_EVAL_ARGS="--device cpu")
#   FCD_SBATCH_ARGS  more sbatch options for both jobs, e.g. "--partition=gpu --time=04:00:00"
# Logs go to $FCD_OUT/logs/.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${FCD_OUT:?set FCD_OUT}"
shards="${FCD_SHARDS:-8}"
throttle="${FCD_THROTTLE:-4}"
read -ra sbatch_args <<<"${FCD_SBATCH_ARGS:-}"
mkdir -p "$FCD_OUT/logs"
export FCD_CONFIG FCD_UNET FCD_DATA FCD_OUT

array=$(sbatch --parsable --export=ALL "${sbatch_args[@]}" \
    --array="0-$((shards - 1))%$throttle" --gres="${FCD_GRES:-gpu:1}" \
    --output="$FCD_OUT/logs/eval-%A_%a.log" "$here/eval_array.sbatch")
array="${array%%;*}"
merge=$(sbatch --parsable --export=ALL "${sbatch_args[@]}" \
    --dependency="afterok:$array" --kill-on-invalid-dep=yes \
    --output="$FCD_OUT/logs/merge-%j.log" "$here/merge.sbatch")
merge="${merge%%;*}"
echo "$array $merge"
