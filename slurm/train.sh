#!/bin/bash
# Train a shardtune recipe on SLURM: N nodes x G GPUs, one launcher per node, saved and requeued before the
# time limit and on preemption, resumed exactly where it stopped.
#
#   sbatch [sbatch options] slurm/train.sh RECIPE [key=value ...]     (from the shardtune checkout)
#   sbatch --nodes=4 --gpus-per-node=8 --time=24:00:00 --partition=gpu slurm/train.sh recipes/llama3_70b.py
#   LAUNCHER=accelerate ACCELERATE_CONFIG=fsdp_configs/8xh100.yaml sbatch --gpus-per-node=8 slurm/train.sh ...
#
# sbatch options (on the command line; they override the #SBATCH defaults below):
#   --nodes --gpus-per-node --time --partition --job-name --account ...  as usual
#   --signal=B:USR1@SECONDS  how long before the time limit to save; must exceed one step plus one save
#                            (Slurm checks limits every 30 s, so the signal can come up to 30 s earlier)
# Environment (exported before sbatch; sbatch passes it on):
#   LAUNCHER, ACCELERATE_CONFIG, MAX_RESTARTS, SHUTDOWN_TIMEOUT, NCCL_*   as for launch/node.sh, which this
#                      script runs on every node (its header documents them)
#   NPROC_PER_NODE     training processes per node (default: the GPUs Slurm gave the node, else 1)
#   RUNS_DIR           where run directories go (default: runs)
#   RUN_NAME           the run directory's name (default: job name + job id [+ array task id]); it stays
#                      the same across requeues, which is how a requeued job finds its checkpoints
#   VENV               a virtualenv to activate (default: .venv in the submission directory, if present)
#   MASTER_PORT        rendezvous port on the first node (default: derived from the job id)
#
# What happens: every node runs one launcher (srun, one task per node) that rendezvouses through c10d on the
# first node and starts NPROC_PER_NODE processes. The batch shell receives SIGUSR1 before the time limit
# (and on preemption) and passes it on as $RUN_DIR/STOP; the processes stop after an agreed step, save, write
# status.json = interrupted and exit; this script then requeues the job (a preempted job is requeued by
# Slurm), and the next start resumes with train.resume=auto. A training process that fails is started again
# within the job with the others (MAX_RESTARTS times), resuming from the newest checkpoint. A bare SIGTERM
# (scancel) saves the same way (Slurm signals the processes themselves) and is not requeued. Logs: the job's
# output file (appended across restarts) and $RUN_DIR/slurm/restart-N.log; the configuration and code version
# of every start are copied into $RUN_DIR/slurm/.
#SBATCH --job-name=shardtune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail
# Signals first: Slurm may send USR1 at any moment, even while this script is still setting up (whose
# default action would kill it).
RESTART=${SLURM_RESTART_COUNT:-0}
log() { echo "[train.sh $(date +%H:%M:%S) job $SLURM_JOB_ID restart $RESTART] $*"; }
GOT="" READY=""
# The batch shell gets the signal (--signal=B:USR1@N); the run directory's STOP file passes it on: rank 0
# looks for it at every step boundary (stopping.py). Not kill: srun drops a signal while the tasks start,
# and torchrun takes USR1 for its own shutdown, which breaks a start still in rendezvous.
forward() {
  log "got SIG$1: asking the training processes to stop after this step (the run's STOP file)"
  GOT=${GOT:-$1}
  [ -z "$READY" ] || touch "$RUN_DIR/STOP"  # else during the set-up: touched once the run directory is ready
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

RECIPE=${1:?usage: sbatch slurm/train.sh RECIPE [key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-$PWD}" || exit 1
VENV=${VENV:-.venv}
# shellcheck disable=SC1091
[ -f "$VENV/bin/activate" ] && source "$VENV/bin/activate"
if [ ! -x launch/node.sh ]; then log "no launch/node.sh in $PWD: submit from the shardtune checkout"; exit 2; fi

JOB_ID=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:?run this through sbatch}}
RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-shardtune}-${JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}
RUNS_DIR=${RUNS_DIR:-runs}
# one directory name under RUNS_DIR (train.run_name's rule), checked before anything is made there
case $RUN_NAME in
  "" | . | .. | */* | *\\* | ~*) log "RUN_NAME='$RUN_NAME': give one directory name (no path), e.g. RUN_NAME=my-run"; exit 2 ;;
esac
RUN_DIR=$RUNS_DIR/$RUN_NAME
LAUNCHERS=${SLURM_NTASKS:-1}  # one per task: one task per node (tests run 2 tasks on one node as 2 "nodes")
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# what every node's launch/node.sh reads (srun passes the environment on)
export NNODES=$LAUNCHERS NPROC_PER_NODE MASTER_ADDR MASTER_PORT RDZV_ID=$JOB_ID
ARGS=("$@" "train.output_dir=$RUNS_DIR" "train.run_name=$RUN_NAME" "train.resume=auto")

mkdir -p "$RUN_DIR/slurm"
rm -f "$RUN_DIR/STOP"  # left by an earlier start that ended before acting on it
# an earlier start's status must not stand for this one's (a start that fails before writing its own is "unknown")
rm -f "$RUN_DIR/status.json"
READY=1
[ -z "$GOT" ] || touch "$RUN_DIR/STOP"  # a signal that came during the set-up
# what ran: the configuration (validated before anything starts), the code version, this script
SHOWN=("${ARGS[@]}")
[ "${LAUNCHER:-torchrun}" = accelerate ] && SHOWN+=("parallel.launch_config=$ACCELERATE_CONFIG")
if ! python3 "$RECIPE" --print-config "${SHOWN[@]}" > "$RUN_DIR/slurm/config-restart$RESTART.yaml"; then
  log "invalid configuration (see above); not starting"
  exit 2
fi
{ git rev-parse HEAD 2>/dev/null || echo "not a git checkout"; git status --short 2>/dev/null; } \
  > "$RUN_DIR/slurm/code-restart$RESTART.txt"
git diff 2>/dev/null > "$RUN_DIR/slurm/code-restart$RESTART.diff"
cp "$0" "$RUN_DIR/slurm/train.sh" 2>/dev/null
log "$LAUNCHERS launcher(s) x $NPROC_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, run $RUN_DIR"

if [ "$GOT" = TERM ]; then log "SIGTERM before training started: not starting"; exit 0; fi
# --kill-on-bad-exit: a launcher that fails (its processes crashed, or one was killed: out of memory while
# loading) ends the others at once; otherwise their processes wait for the lost ones in a collective until the
# process group's timeout. A stopped run's processes other than rank 0 exit 0, so that this cannot cut rank 0
# before it has written status.json. One launcher per task; $SLURM_PROCID (accelerate's machine rank) is each
# task's own.
srun --ntasks="$LAUNCHERS" --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_PROCID exec launch/node.sh "$@"' \
  launcher "$RECIPE" "${ARGS[@]}" \
  > >(tee -a "$RUN_DIR/slurm/restart-$RESTART.log") 2>&1 &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives; keep waiting until the launchers are done
while true; do
  wait "$SRUN_PID"
  rc=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done

status=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"])' "$RUN_DIR/status.json" \
  2>/dev/null || echo unknown)
case $status in
  complete) READY=""; rm -f "$RUN_DIR/STOP"; log "run complete: $RUN_DIR"; exit 0 ;;  # a late stop is moot
  interrupted)
    # USR1 comes before the time limit (and on preemption); a bare TERM is scancel: saved, not requeued
    # (a preemption that sends only TERM is requeued by Slurm itself)
    if [ "$GOT" = USR1 ]; then
      log "checkpointed; requeueing (the next start resumes from the checkpoint)"
      scontrol requeue "$SLURM_JOB_ID" || log "not requeued by this script (a preempted job is requeued by Slurm)"
    else
      log "checkpointed after SIG${GOT:-?}; not requeued (resume: sbatch again with RUN_NAME=$RUN_NAME)"
    fi
    exit 0 ;;
  *) log "run $status (launcher exit $rc); not requeued: see $RUN_DIR/status.json and the log"; exit "${rc:-1}" ;;
esac
