#!/usr/bin/env bash
# Sourced: write_slurm_conf writes the same slurm.conf on every machine from MCTL_HOSTS.
write_slurm_conf() {
  mkdir -p /etc/slurm
  {
    echo "ClusterName=mctl"
    echo "SlurmctldHost=slurm-controller"
    echo "AuthType=auth/munge"
    echo "GresTypes=gpu"
    echo "SelectType=select/cons_tres"
    echo "ProctrackType=proctrack/linuxproc"
    echo "ReturnToService=2"
    echo "$MCTL_HOSTS" | awk '$2 ~ /^gpu-/ {print "NodeName=" $2 " NodeAddr=" $1 " CPUs=4 RealMemory=7000 Gres=gpu:1 State=UNKNOWN"}'
    echo "$MCTL_HOSTS" | awk '$2 ~ /^cpu-/ {print "NodeName=" $2 " NodeAddr=" $1 " CPUs=4 RealMemory=7000 State=UNKNOWN"}'
    echo "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } > /etc/slurm/slurm.conf
}
