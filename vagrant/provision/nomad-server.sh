#!/usr/bin/env bash
# A Nomad server (raft), with ACLs off for the lab and Vault workload identities pointed at OpenBao.
set -euo pipefail
source /opt/mctl/src/vagrant/provision/binaries.sh
install_binary nomad
mkdir -p /etc/nomad.d /var/lib/nomad
join=$(echo "$MCTL_SERVERS" | sed 's/\([^,]*\)/"\1"/g')
cat > /etc/nomad.d/server.hcl <<HCL
data_dir  = "/var/lib/nomad"
bind_addr = "0.0.0.0"
advertise { http = "$MCTL_NODE_IP" rpc = "$MCTL_NODE_IP" serf = "$MCTL_NODE_IP" }
server {
  enabled          = true
  bootstrap_expect = $MCTL_SERVER_COUNT
  server_join { retry_join = [$join] }
}
vault {
  enabled = true
  address = "$MCTL_VAULT_ADDR"
  default_identity { aud = ["vault.io"] ttl = "1h" }
}
telemetry { prometheus_metrics = true publish_allocation_metrics = true }
HCL
cat > /etc/systemd/system/nomad.service <<UNIT
[Unit]
Description=Nomad
After=network-online.target
[Service]
ExecStart=/usr/local/bin/nomad agent -config /etc/nomad.d
Restart=on-failure
KillSignal=SIGINT
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now nomad
