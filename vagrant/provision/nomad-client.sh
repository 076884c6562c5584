#!/usr/bin/env bash
# A Nomad client: docker and raw_exec drivers, mctl's host volume, and on GPU machines the NVIDIA
# driver (Debian non-free) plus the nomad-device-nvidia plugin.
set -euo pipefail
source /opt/mctl/src/vagrant/provision/binaries.sh
install_binary nomad
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q docker.io
mkdir -p /etc/nomad.d /var/lib/nomad/plugins /var/lib/mctl/volumes/data
gpu_plugin=""
if [[ "$MCTL_GPU" == "1" ]]; then
  sed -i 's/^Components: main$/Components: main contrib non-free non-free-firmware/' \
    /etc/apt/sources.list.d/debian.sources 2>/dev/null || true
  apt-get update -q
  apt-get install -y -q nvidia-driver nvidia-smi
  source /opt/mctl/src/vagrant/provision/binaries.sh
  install_binary nomad-device-nvidia
  ln -sf /usr/local/bin/nomad-device-nvidia /var/lib/nomad/plugins/nomad-device-nvidia
  gpu_plugin='plugin "nomad-device-nvidia" { config { enabled = true } }'
fi
join=$(echo "$MCTL_SERVERS" | sed 's/\([^,]*\)/"\1"/g')
cat > /etc/nomad.d/client.hcl <<HCL
data_dir   = "/var/lib/nomad"
plugin_dir = "/var/lib/nomad/plugins"
bind_addr  = "0.0.0.0"
advertise { http = "$MCTL_NODE_IP" rpc = "$MCTL_NODE_IP" serf = "$MCTL_NODE_IP" }
client {
  enabled = true
  server_join { retry_join = [$join] }
  meta { mctl_control_plane = "$([[ "$(hostname)" == cpu-1 ]] && echo true || echo false)" }
  host_volume "data" { path = "/var/lib/mctl/volumes/data" read_only = false }
}
plugin "raw_exec" { config { enabled = true } }
$gpu_plugin
vault { enabled = true address = "$MCTL_VAULT_ADDR" }
HCL
cat > /etc/systemd/system/nomad.service <<UNIT
[Unit]
Description=Nomad
After=network-online.target docker.service
[Service]
ExecStart=/usr/local/bin/nomad agent -config /etc/nomad.d
Restart=on-failure
KillSignal=SIGINT
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now nomad
