#!/bin/bash
# One machine's launcher for a shardtune recipe: torchrun (or accelerate launch) with the settings that stopping,
# saving and restarting after a crash need. Run it on every machine of a job with the same arguments (on a
# Slurm cluster, slurm/train.sh runs it on each node for you). No training logic here.
#
#   launch/node.sh RECIPE [key=value ...]                                   # this machine, one process per GPU
#   NNODES=2 MASTER_ADDR=10.0.0.1 launch/node.sh recipes/llama3_70b.py      # on each of 2 machines
#   LAUNCHER=accelerate ACCELERATE_CONFIG=fsdp_configs/2xh100.yaml launch/node.sh recipes/llama3_8b.py
#
# Environment:
#   NNODES             machines in the job (default 1)
#   NPROC_PER_NODE     training processes on this machine (default: the GPUs in CUDA_VISIBLE_DEVICES, or
#                      all of its GPUs, else 1)
#   MASTER_ADDR        the first machine's address, where the machines meet (default 127.0.0.1)
#   MASTER_PORT        a free port there (default 29500; on one machine, any free port)
#   RDZV_ID            a name for the job, the same on every machine (default shardtune)
#   NODE_RANK          this machine's index, 0 on the first (accelerate only; torchrun's c10d rendezvous
#                      assigns ranks itself)
#   MAX_RESTARTS       how many times to start every process again when one fails (a crash, an out-of-memory
#                      kill, a lost GPU) before giving up (default 1); each restart resumes from the newest
#                      checkpoint (train.resume=auto, the default)
#   SHUTDOWN_TIMEOUT   seconds the launcher waits for the processes to save and exit after SIGTERM/SIGUSR1
#                      before it kills them (default 600)
#   LAUNCHER           torchrun (default) or accelerate;  ACCELERATE_CONFIG  its config (FSDP settings apply)
#   USR1_VIA           how SIGUSR1 reaches the processes: `launcher` (torch >= 2.9: the launcher forwards it
#                      itself, asked to by PET_SIGNALS_TO_HANDLE) or `term` (older torch: this script stays in
#                      front of the launcher and turns SIGUSR1 into SIGTERM to it); default: `launcher` where
#                      the installed torch has torchrun's --signals-to-handle, else `term`
#   NCCL_*             passed through; defaults: TORCH_NCCL_ASYNC_ERROR_HANDLING=1, NCCL_DEBUG=WARN
#
# SIGTERM or SIGUSR1 to this script's process (a preemption, a time limit) is passed to the processes, which
# stop after an agreed step, save and exit; `touch runs/<run>/STOP` does the same. SIGINT (Ctrl-C), SIGHUP and
# SIGQUIT are passed on too. runs/<run>/status.json says how the run ended (torchrun reports any failed process
# as exit 1, and under restarts a stopped run exits 0).
set -euo pipefail
RECIPE=${1:?usage: launch/node.sh RECIPE [key=value ...]}

NNODES=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then  # one process per GPU the processes can see
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    NPROC_PER_NODE=${#visible[@]}
  else
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  fi
  [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MAX_RESTARTS=${MAX_RESTARTS:-1}

export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# The signals the launcher passes on to the training processes (which stop, save and exit) instead of dying
# of them. torch >= 2.9 takes the list from torchrun's --signals-to-handle, whose default the environment
# variable PET_SIGNALS_TO_HANDLE replaces; accelerate launch reads it too (it parses its arguments with
# torchrun's parser). The launcher writes the list into TORCHELASTIC_SIGNALS_TO_HANDLE itself, so a value
# exported under that name is overwritten (torch's default leaves SIGUSR1 out: the launcher died of it and
# the processes trained on). torch < 2.9 handles only SIGTERM, SIGINT, SIGHUP and SIGQUIT; there this script
# turns SIGUSR1 into SIGTERM to the launcher, which passes that on (the processes stop the same way on
# either: src/shardtune/train/stopping.py).
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
if [ -z "${USR1_VIA:-}" ]; then
  # the launcher's own Python (beside it in a virtualenv), asked without importing torch (milliseconds)
  BIN_DIR=$(dirname "$(command -v "${LAUNCHER:-torchrun}" || echo .)")
  PY=$BIN_DIR/python3
  [ -x "$PY" ] || PY=python3
  USR1_VIA=term
  if "$PY" -c 'import importlib.util as u, pathlib, sys
run = pathlib.Path(u.find_spec("torch").origin).parent / "distributed" / "run.py"
sys.exit("--signals-to-handle" not in run.read_text())' 2>/dev/null; then
    USR1_VIA=launcher
  fi
fi
case $USR1_VIA in launcher | term) ;; *) echo "USR1_VIA=$USR1_VIA: use launcher or term" >&2; exit 2 ;; esac
# and waits this long for them to finish saving before it kills them (torch's default: 30 s)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}
# a fresh rendezvous store for every restart: the shared one keeps the failed attempt's addresses, which the
# restarted processes would read and fail on (src/shardtune/distributed.py)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

if [ "${LAUNCHER:-torchrun}" = accelerate ]; then
  if [ "$NNODES" = 1 ]; then
    # accelerate builds no rendezvous endpoint for one machine: a given port is the (static) store's, and
    # without one torch picks a free port itself
    RDZV=()
    [ -z "${MASTER_PORT:-}" ] || RDZV=(--main_process_port "$MASTER_PORT")
  else
    RDZV=(--main_process_ip "$MASTER_ADDR" --main_process_port "${MASTER_PORT:-29500}" --rdzv_backend c10d)
  fi
  CMD=(accelerate launch --config_file "${ACCELERATE_CONFIG:?LAUNCHER=accelerate needs ACCELERATE_CONFIG}" \
    --num_machines "$NNODES" --num_processes "$((NNODES * NPROC_PER_NODE))" --machine_rank "${NODE_RANK:-0}" \
    --max_restarts "$MAX_RESTARTS" "${RDZV[@]}" "$@")
else
  # one machine without a port: any free one (c10d picks it for port 0); several machines must agree on one
  PORT=${MASTER_PORT:-$([ "$NNODES" = 1 ] && echo 0 || echo 29500)}
  CMD=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS"
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$PORT" --rdzv_id "${RDZV_ID:-shardtune}" "$@")
fi
# torch >= 2.9: the launcher forwards every signal itself; it takes this process's place (and pid)
[ "$USR1_VIA" = term ] || exec "${CMD[@]}"
# torch < 2.9: this script stays in front of the launcher and passes SIGUSR1 on as SIGTERM, the others as
# they are. (A script's background command starts with SIGINT and SIGQUIT ignored; the launcher installs its
# own handlers for them as it starts the processes.)
"${CMD[@]}" &
CHILD=$!
for sig in TERM INT HUP QUIT; do
  # shellcheck disable=SC2064  # the pid, now
  trap "kill -$sig $CHILD 2>/dev/null" "$sig"
done
# shellcheck disable=SC2064
trap "kill -TERM $CHILD 2>/dev/null" USR1
# `wait` returns early when a trapped signal arrives; keep waiting until the launcher is done
while true; do
  rc=0
  wait "$CHILD" || rc=$?
  kill -0 "$CHILD" 2>/dev/null || break
done
exit "$rc"
