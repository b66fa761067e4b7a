#!/usr/bin/env bash
# Start a one-node SLURM cluster on this host (root, Debian's slurm-wlm and munge), for the
# tests: a minimal slurm.conf naming this host, munge, slurmctld and slurmd. Idempotent; a
# changed slurm.conf is applied to running daemons (slurmd restarts: running jobs keep going).
# Steps are confined to their cores (task/affinity), as on production clusters, so a job that
# asks SLURM for too few cores shows it here too.
set -euo pipefail
if ! command -v slurmctld >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi
HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
OLD_CONF=$(cat /etc/slurm/slurm.conf 2>/dev/null || true)
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmUser=root
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobRequeue=1
# A requeued job may start again cred_expire seconds after it stopped (120 by default), once a scheduling
# pass sees it (every 60 s, backfill's every 30): the tests requeue jobs three times and wait for each
AuthInfo=cred_expire=15
SchedulerParameters=sched_interval=5,bf_interval=5
KillWait=30
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
if [ ! -f /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
if [ "$OLD_CONF" != "$(cat /etc/slurm/slurm.conf)" ] && pgrep -x slurmctld >/dev/null; then
  # TaskPlugin and node definitions are read by slurmd only when it starts, some settings (AuthInfo) by
  # slurmctld: both restart (running jobs keep going). A daemon slow to shut down (slurmd finishes its RPCs)
  # is waited for, then killed, so that the new one always starts.
  scontrol reconfigure || true
  for daemon in slurmctld slurmd; do
    [ -f "/run/$daemon.pid" ] || continue
    pid=$(cat "/run/$daemon.pid")
    kill "$pid" 2>/dev/null && for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
  done
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then exit 0; fi
  scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "SLURM did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
