#!/usr/bin/env bash
# Every machine: /etc/hosts, base packages, mctl in /opt/mctl/venv from the synced source.
set -euo pipefail
echo "$MCTL_HOSTS" | while read -r line; do
  grep -qxF "$line" /etc/hosts || echo "$line" >> /etc/hosts
done
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q python3 python3-venv python3-pip curl jq unzip ca-certificates
if [[ ! -x /opt/mctl/venv/bin/mctl ]]; then
  python3 -m venv /opt/mctl/venv
fi
/opt/mctl/venv/bin/pip install -q /opt/mctl/src
mkdir -p /var/lib/mctl
