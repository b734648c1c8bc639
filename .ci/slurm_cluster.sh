#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests marked `slurm` (tests/test_slurm.py).
#
#   .ci/slurm_cluster.sh start     install Debian's munge, slurmctld, slurmd and slurm-client (apt-get,
#                                  as root), write the configs, start the three daemons, wait for the node
#   .ci/slurm_cluster.sh stop      stop the daemons this script started (by their pid files)
#   .ci/slurm_cluster.sh status    sinfo and squeue
#   .ci/slurm_cluster.sh running   exit 0 when a node answers (a cluster is up, whoever started it)
#
# Root without systemd (docs: /work/shared/spec/ENVIRONMENT.md, "A real SLURM on this machine"): a munge
# key and /run/munge owned by munge, munged run as munge; a minimal slurm.conf (one node named
# `localhost` with this machine's CPUs, select/cons_tres, proctrack/linuxproc, no cgroups, no
# accounting daemon); four fake GPUs through gres.conf with File=/dev/tty[0-3], the trick SLURM's own
# tests use, so a job asking for --gres=gpu:1 gets CUDA_VISIBLE_DEVICES set to its own device.
# Everything the daemons write (state, spool, logs, pid files) lives under $SLURM_CI_DIR.
#
# What the tests must know about it: without slurmdbd, sacct has no records (watch jobs with squeue /
# scontrol; finished jobs stay visible for MinJobAge seconds). A requeued job may run again only once
# its job credential has expired: AuthInfo cred_expire, 120 s by default (a requeue then cost ~121 s
# here); this cluster sets 20 s, so a requeue costs ~21 s. A launch on this one node takes well under
# a second of that lifetime.
set -euo pipefail
DIR=${SLURM_CI_DIR:-/var/tmp/markerlab-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by markerlab .ci/slurm_cluster.sh"

say() { echo "slurm_cluster: $*"; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    say "needs root (apt-get, munge's key, daemons as root); run it as root or with sudo" >&2
    exit 2
  fi
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return
  fi
  say "installing munge slurmctld slurmd slurm-client (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # no daemon starts itself in a container without systemd; the policy file makes sure of it
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -q munge slurmctld slurmd slurm-client >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q munge slurmctld slurmd slurm-client >/dev/null
  }
  rm -f /usr/sbin/policy-rc.d
}

write_configs() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    say "$CONF exists and was not written by this script; not touching it (move it away first)" >&2
    exit 2
  fi
  mkdir -p /etc/slurm "$DIR/state" "$DIR/spool" "$DIR/log"
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  cat > "$CONF" <<EOF
$MARK
ClusterName=markerlab-ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ReturnToService=2
MpiDefault=none
SlurmdParameters=config_overrides
# finished jobs stay visible to squeue/scontrol this long (there is no accounting database)
MinJobAge=600
# how long a job credential lives, and so how long a requeued job waits before it may run again
AuthInfo=cred_expire=20
NodeName=localhost CPUs=$cpus RealMemory=$mem Gres=gpu:4 State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  cat > /etc/slurm/gres.conf <<EOF
$MARK
AutoDetect=off
Name=gpu File=/dev/tty[0-3]
EOF
}

alive() {  # pid file
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  if alive /run/munge/munged.pid; then
    return
  fi
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$DIR/munged.pid"
}

running() {
  sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

start() {
  need_root
  if running; then
    say "already running: $(sinfo -h -o '%P %D %T %G' | head -1)"
    return
  fi
  install_packages
  write_configs
  start_munge
  alive "$DIR/slurmctld.pid" || slurmctld
  alive "$DIR/slurmd.pid" || slurmd
  local i
  for i in $(seq 60); do
    if running; then
      say "up: $(sinfo -h -o 'partition %P, %D node, %T, %c CPUs, %G' | head -1)"
      return
    fi
    sleep 1
  done
  say "the node did not become idle within 60 s; see $DIR/log/" >&2
  sinfo >&2 || true
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  exit 1
}

stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    if alive "$DIR/$name.pid"; then
      pid=$(cat "$DIR/$name.pid")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      say "stopped $name (pid $pid)"
    fi
    rm -f "$DIR/$name.pid"
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo; squeue ;;
  running) running ;;
  *) echo "usage: $0 start|stop|status|running" >&2; exit 2 ;;
esac
