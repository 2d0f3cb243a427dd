#!/usr/bin/env bash
# A single-node Slurm on this machine from Debian's packages, for the CI's Slurm tier: munge with a
# fresh key, a slurm.conf naming this host with its CPUs and memory, slurmctld and slurmd. As root
# (or with sudo). Prints the node's state once it is idle; fails after a minute otherwise.
set -euo pipefail
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq slurm-wlm munge
fi
host=$(hostname -s)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

$sudo mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge /var/spool/slurmctld /var/spool/slurmd \
  /var/log/slurm
if [ ! -s /etc/munge/munge.key ]; then
  $sudo dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
$sudo chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
$sudo chmod 0700 /etc/munge /var/lib/munge /var/log/munge
$sudo chmod 0400 /etc/munge/munge.key
$sudo chmod 0755 /run/munge
if ! pgrep -x munged > /dev/null; then
  if [ -z "$sudo" ]; then runuser -u munge -- /usr/sbin/munged; else sudo -u munge /usr/sbin/munged; fi
fi

$sudo tee /etc/slurm/slurm.conf > /dev/null <<CONF
ClusterName=ci
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
CONF
pgrep -x slurmctld > /dev/null || $sudo slurmctld
pgrep -x slurmd > /dev/null || $sudo slurmd
for _ in $(seq 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
    sinfo
    exit 0
  fi
  sleep 1
done
echo "slurm did not come up: the node is $(sinfo -h -o '%T' 2>&1)"
tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log || true
exit 1
