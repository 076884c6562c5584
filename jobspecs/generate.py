"""Write the Nomad jobs that run mctl on a cluster, as JSON (what `nomad job run -json` and
`PUT /v1/jobs` take; checked against Nomad's API types by the tests) and as HCL (to read and edit).

    python jobspecs/generate.py           # rewrite jobspecs/*.json and *.nomad.hcl
    python jobspecs/generate.py --check   # exit 1 if a file is not what this script writes

The jobs assume the layout of vagrant/: mctl installed in /opt/mctl/venv on every client, Vault
holding the control plane's TLS pair, an invoke token for Prometheus and Nomad tokens issued by
Vault's nomad secrets engine (role `mctl`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NS = 1_000_000_000
MCTL = "/opt/mctl/venv/bin/mctl"
KV = "secret/data/mctl/control-plane"


def control_plane() -> dict:
    """mctl's control plane: one allocation on the node that keeps its state (SQLite, blobs)."""
    tls = [
        {"EmbeddedTmpl": f'{{{{ with secret "{KV}" }}}}{{{{ .Data.data.{key} }}}}{{{{ end }}}}\n',
         "DestPath": f"secrets/{name}", "ChangeMode": "restart", "Perms": "0600"}
        for key, name in (("tls_cert", "tls.crt"), ("tls_key", "tls.key"), ("ca", "ca.pem"))]
    env = {"EmbeddedTmpl": '{{ with secret "nomad/creds/mctl" }}NOMAD_TOKEN={{ .Data.secret_id }}'
                           "{{ end }}\n",
           "DestPath": "secrets/nomad.env", "Envvars": True, "ChangeMode": "restart"}
    return {"Job": {
        "ID": "mctl", "Name": "mctl", "Type": "service", "Datacenters": ["*"],
        "Constraints": [{"LTarget": "${meta.mctl_control_plane}", "Operand": "=",
                         "RTarget": "true"}],
        "Meta": {"mctl.role": "control-plane"},
        "TaskGroups": [{
            "Name": "control-plane", "Count": 1,
            "Networks": [{"ReservedPorts": [{"Label": "http", "Value": 8600}]}],
            "Services": [{"Name": "mctl", "PortLabel": "http", "Provider": "nomad",
                          "Tags": ["metrics"],
                          "Checks": [{"Name": "healthz", "Type": "http", "Protocol": "https",
                                      "Path": "/healthz", "Interval": 10 * NS,
                                      "Timeout": 2 * NS, "TLSSkipVerify": False}]}],
            "RestartPolicy": {"Attempts": 3, "Interval": 600 * NS, "Delay": 10 * NS,
                              "Mode": "delay"},
            "Tasks": [{
                "Name": "server", "Driver": "raw_exec",
                "Config": {"command": MCTL, "args": [
                    "server", "--host", "0.0.0.0", "--port", "8600",
                    "--state-dir", "/var/lib/mctl/server", "--no-local-token",
                    "--advertise-url", "https://${attr.unique.hostname}:8600",
                    "--tls-cert", "${NOMAD_SECRETS_DIR}/tls.crt",
                    "--tls-key", "${NOMAD_SECRETS_DIR}/tls.key",
                    "--scheduler", "nomad", "--scheduler-option", "datacenters=*",
                    "--scheduler-option", "driver=raw_exec",
                    "--scheduler-option", "python=/opt/mctl/venv/bin/python"]},
                "Env": {"MCTL_HOME": "/var/lib/mctl/home",
                        "MCTL_CA_FILE": "${NOMAD_SECRETS_DIR}/ca.pem",
                        "NOMAD_ADDR": "https://${attr.unique.network.ip-address}:4646",
                        "NOMAD_CACERT": "/etc/nomad.d/tls/ca.pem"},
                "Vault": {"Role": "mctl-control-plane", "ChangeMode": "restart"},
                "Templates": [*tls, env],
                "Resources": {"CPU": 1000, "MemoryMB": 1024},
                "KillSignal": "SIGTERM", "KillTimeout": 30 * NS}]}]}}


AUTOSCALER_CONFIG = """\
nomad {
  address = "https://{{ env "attr.unique.network.ip-address" }}:4646"
  ca_cert = "/etc/nomad.d/tls/ca.pem"
}
apm "prometheus" {
  driver = "prometheus"
  config = {
    address = "http://{{ range nomadService "prometheus" }}{{ .Address }}:{{ .Port }}{{ end }}"
  }
}
strategy "target-value" {
  driver = "target-value"
}
"""

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 5s
scrape_configs:
  - job_name: mctl
    scheme: https
    metrics_path: /metrics
    authorization:
      credentials_file: /secrets/metrics-token
    tls_config:
      ca_file: /secrets/ca.pem
    static_configs:
      - targets: [{{ range nomadService "mctl" }}"{{ .Address }}:{{ .Port }}",{{ end }}]
"""


def autoscaler() -> dict:
    """nomad-autoscaler reading mctl's queue metrics from a Prometheus that scrapes mctl."""
    prometheus_secrets = [
        {"EmbeddedTmpl": f'{{{{ with secret "{KV}" }}}}{{{{ .Data.data.{key} }}}}{{{{ end }}}}',
         "DestPath": f"secrets/{name}", "ChangeMode": "restart", "Perms": "0600"}
        for key, name in (("metrics_token", "metrics-token"), ("ca", "ca.pem"))]
    return {"Job": {
        "ID": "mctl-autoscaler", "Name": "mctl-autoscaler", "Type": "service",
        "Datacenters": ["*"], "Meta": {"mctl.role": "autoscaler"},
        "TaskGroups": [
            {"Name": "prometheus", "Count": 1,
             "Networks": [{"DynamicPorts": [{"Label": "http", "To": 9090}]}],
             "Services": [{"Name": "prometheus", "PortLabel": "http", "Provider": "nomad"}],
             "Tasks": [{"Name": "prometheus", "Driver": "docker",
                        "Config": {"image": "prom/prometheus:v2.53.0", "ports": ["http"],
                                   "args": ["--config.file=/local/prometheus.yml"]},
                        "Vault": {"Role": "mctl-metrics", "ChangeMode": "restart"},
                        "Templates": [{"EmbeddedTmpl": PROMETHEUS_CONFIG,
                                       "DestPath": "local/prometheus.yml",
                                       "ChangeMode": "signal", "ChangeSignal": "SIGHUP"},
                                      *prometheus_secrets],
                        "Resources": {"CPU": 500, "MemoryMB": 512}}]},
            {"Name": "autoscaler", "Count": 1,
             "Tasks": [{"Name": "autoscaler", "Driver": "docker",
                        "Config": {"image": "hashicorp/nomad-autoscaler:0.4.5",
                                   "command": "nomad-autoscaler",
                                   "args": ["agent", "-config", "/local/config.hcl"]},
                        "Templates": [
                            {"EmbeddedTmpl": AUTOSCALER_CONFIG, "DestPath": "local/config.hcl",
                             "ChangeMode": "restart"},
                            {"EmbeddedTmpl": '{{ with secret "nomad/creds/mctl-autoscaler" }}'
                                             "NOMAD_TOKEN={{ .Data.secret_id }}{{ end }}\n",
                             "DestPath": "secrets/nomad.env", "Envvars": True,
                             "ChangeMode": "restart"}],
                        "Vault": {"Role": "mctl-autoscaler", "ChangeMode": "restart"},
                        "Resources": {"CPU": 200, "MemoryMB": 256}}]}]}}


def example_app() -> list[dict]:
    """examples/hello.py as the nomad backend would register it (autoscaler=nomad)."""
    sys.path.insert(0, str(ROOT))
    from mctl.cli.main import import_app_file
    from mctl.core.compile import compile_app
    from mctl.core.server.control import deployed_app_id
    from mctl.plugins.nomad_render import NomadOptions, render_app

    _, app, _ = import_app_file(str(ROOT / "examples" / "hello.py"))
    app_id = deployed_app_id(app.name)
    spec, _ = compile_app(app, app_id, app.name)
    options = NomadOptions.parse({"autoscaler": "nomad", "python": "/opt/mctl/venv/bin/python",
                                  "server_url": "https://mctl.service.nomad:8600"})
    return render_app(spec, app_id, options)


def files() -> dict[str, str]:
    from mctl.plugins.nomad_hcl import to_hcl

    out: dict[str, str] = {}
    for name, jobs in (("mctl-control-plane", [control_plane()]),
                       ("mctl-autoscaler", [autoscaler()]), ("example-hello", example_app())):
        out[f"{name}.json"] = "".join(json.dumps(job, indent=2) + "\n" for job in jobs)
        header = (f"# Written by jobspecs/generate.py from {name}.json; edit that script, not "
                  "this file.\n")
        out[f"{name}.nomad.hcl"] = header + "\n".join(to_hcl(job) for job in jobs)
    return out


def main() -> None:
    stale = []
    for name, text in files().items():
        path = HERE / name
        if "--check" in sys.argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        sys.exit(f"jobspecs out of date: {', '.join(stale)}; run python jobspecs/generate.py.")


if __name__ == "__main__":
    main()
