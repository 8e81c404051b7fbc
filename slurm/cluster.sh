#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the tests (and for trying slurm/train.sh locally).
#   sudo slurm/cluster.sh up      install Debian's Slurm (slurmctld, slurmd, munge; slurmdbd + MariaDB for
#                                 sacct, which submitit needs), write a config, start the daemons
#   sudo slurm/cluster.sh down    stop exactly the daemons `up` started (by their pid files), wipe job state
# Needs root and apt (Debian/Ubuntu); no systemd needed. Two partitions: `debug` (default) and `urgent`, which
# preempts `debug` (its jobs are requeued), so that preemption can be tested.
# Environment: SLURM_LOCAL_CPUS (CPUs the node advertises; default 4, more than the cores so that two
# 2-process jobs fit), SLURM_LOCAL_MEM_MB (default 80% of RAM).
set -euo pipefail
cmd=${1:?usage: cluster.sh up|down}
LOG=/var/log/slurm
CONF=/etc/slurm

alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }  # a zombie is dead
stop_pid_file() {
  local pid
  [ -s "$1" ] || return 0
  pid=$(cat "$1")
  if alive "$pid"; then
    kill -TERM "$pid" || true
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" || true
  fi
  rm -f "$1"
}

if [ "$cmd" = down ]; then
  if scontrol ping 2>/dev/null | grep -q UP; then
    ids=$(squeue -h -o %A 2>/dev/null | sort -u)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      scancel $ids || true
      for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  stop_pid_file /run/slurmd.pid
  stop_pid_file /run/slurmctld.pid
  # job processes that outlived their slurmstepd (a job that would not end in time): every process whose
  # environment names a Slurm job
  for env in /proc/[0-9]*/environ; do
    pid=${env#/proc/}; pid=${pid%/environ}
    [ "$pid" != $$ ] && tr '\0' '\n' 2>/dev/null < "$env" | grep -q '^SLURM_JOB_ID=' && kill -KILL "$pid" 2>/dev/null
  done
  stop_pid_file /run/slurmdbd.pid
  [ -S /run/mysqld/mysqld.sock ] && mysql -e 'DROP DATABASE IF EXISTS slurm_acct_db' 2>/dev/null || true
  stop_pid_file /run/mysqld/mysqld.pid
  stop_pid_file /run/munge/munged.pid
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* "$LOG"/jobcomp.log
  exit 0
fi
[ "$cmd" = up ] || { echo "usage: cluster.sh up|down" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "cluster.sh up needs root (it installs packages and starts daemons)" >&2; exit 1; }
if [ -s /run/slurmctld.pid ] && scontrol ping 2>/dev/null | grep -q UP; then
  echo "a cluster is already up (slurm/cluster.sh down stops it)"; exit 0
fi

packages=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # without systemd the packages' postinst cannot start their services; that is fine, we start them below
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# a fresh cluster every time: jobs left by daemons that died without `down` (a reboot) would hold the node
for f in /run/slurmd.pid /run/slurmctld.pid /run/slurmdbd.pid; do stop_pid_file "$f"; done
rm -rf /var/spool/slurmctld /var/spool/slurmd
mkdir -p "$CONF" /var/spool/slurmctld /var/spool/slurmd "$LOG"
CPUS=${SLURM_LOCAL_CPUS:-4}
MEM=${SLURM_LOCAL_MEM_MB:-$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 8 / 10 ))}

cat > "$CONF/slurm.conf" <<EOF
ClusterName=shardtune
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may run again (default 120 s)
AuthInfo=cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without it every job takes the whole node's memory and jobs run one at a time
DefMemPerCPU=1000
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
KillWait=10
MinJobAge=600
ReturnToService=2
# the node may advertise more CPUs than it has
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# send the job's --signal to it when it is preempted too (submitit needs this to checkpoint on preemption)
SlurmctldParameters=preempt_send_user_signal
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug  Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=20
PartitionName=urgent Nodes=ALL Default=NO  MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF

[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# accounting: MariaDB over its unix socket (root, no password), slurmdbd on top
mkdir -p /run/mysqld && chown mysql:root /run/mysqld
if ! mysqladmin ping >/dev/null 2>&1; then
  /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mysqld.pid >"$LOG/mariadb.log" 2>&1 &
  for _ in $(seq 100); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
cat > "$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$CONF/slurmdbd.conf"
mysql -e 'DROP DATABASE IF EXISTS slurm_acct_db'  # sacct must not list the old cluster's job ids
/usr/sbin/slurmdbd
for _ in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.1; done
sacctmgr -n show cluster format=cluster | grep -qw shardtune || sacctmgr -i add cluster shardtune >/dev/null

/usr/sbin/slurmctld -i
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
/usr/sbin/slurmd -N localhost   # the node's name does not depend on the machine's hostname
for _ in $(seq 200); do sinfo -h -n localhost -o %T 2>/dev/null | grep -qx idle && break; sleep 0.1; done
sinfo -h -n localhost -o %T | grep -qx idle || { sinfo -R; tail -20 "$LOG/slurmd.log"; exit 1; }
srun -N1 -n1 -t 1 true
echo "slurm is up: $(sinfo -h -o '%P %a %D %T' | tr '\n' ';')"
