#!/usr/bin/env bash
# The Slurm variant's controller (Debian's packages), with the munge key shared through the
# synced folder and GPUs as GRES; mctl runs here with --scheduler slurm.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q slurmctld slurm-client munge
key=/opt/mctl/src/vagrant/.vagrant/munge.key
mkdir -p "$(dirname "$key")"
[[ -f "$key" ]] || dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
install -o munge -g munge -m 0400 "$key" /etc/munge/munge.key
systemctl restart munge
source /opt/mctl/src/vagrant/provision/slurm-conf.sh
write_slurm_conf
systemctl enable --now slurmctld
