#!/usr/bin/env bash
# A Slurm compute node; GPU machines declare their GPUs as GRES (gpu:<count>).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q slurmd slurm-client munge
for _ in $(seq 60); do [[ -f /opt/mctl/src/vagrant/.vagrant/munge.key ]] && break; sleep 5; done
install -o munge -g munge -m 0400 /opt/mctl/src/vagrant/.vagrant/munge.key /etc/munge/munge.key
systemctl restart munge
source /opt/mctl/src/vagrant/provision/slurm-conf.sh
write_slurm_conf
if [[ "$MCTL_GPU" == "1" ]]; then
  echo "Name=gpu File=/dev/nvidia0" > /etc/slurm/gres.conf
fi
systemctl enable --now slurmd
