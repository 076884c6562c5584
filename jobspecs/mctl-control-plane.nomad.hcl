# Written by jobspecs/generate.py from mctl-control-plane.json; edit that script, not this file.
job "mctl" {
  type = "service"
  datacenters = ["*"]
  constraint {
    attribute = "${meta.mctl_control_plane}"
    operator = "="
    value = "true"
  }
  meta = {
    "mctl.role" = "control-plane"
  }
  group "control-plane" {
    count = 1
    network {
      reserved_ports "http" {
        static = 8600
      }
    }
    service {
      name = "mctl"
      port = "http"
      provider = "nomad"
      tags = ["metrics"]
      check {
        name = "healthz"
        type = "http"
        protocol = "https"
        path = "/healthz"
        interval = "10s"
        timeout = "2s"
        tls_skip_verify = false
      }
    }
    restart {
      attempts = 3
      interval = "600s"
      delay = "10s"
      mode = "delay"
    }
    task "server" {
      driver = "raw_exec"
      config {
        command = "/opt/mctl/venv/bin/mctl"
        args = ["server", "--host", "0.0.0.0", "--port", "8600", "--state-dir", "/var/lib/mctl/server", "--no-local-token", "--advertise-url", "https://${attr.unique.hostname}:8600", "--tls-cert", "${NOMAD_SECRETS_DIR}/tls.crt", "--tls-key", "${NOMAD_SECRETS_DIR}/tls.key", "--scheduler", "nomad", "--scheduler-option", "datacenters=*", "--scheduler-option", "driver=raw_exec", "--scheduler-option", "python=/opt/mctl/venv/bin/python"]
      }
      env = {
        "MCTL_HOME" = "/var/lib/mctl/home"
        "MCTL_CA_FILE" = "${NOMAD_SECRETS_DIR}/ca.pem"
        "NOMAD_ADDR" = "https://${attr.unique.network.ip-address}:4646"
        "NOMAD_CACERT" = "/etc/nomad.d/tls/ca.pem"
      }
      vault {
        role = "mctl-control-plane"
        change_mode = "restart"
      }
      template {
        data = "{{ with secret \"secret/data/mctl/control-plane\" }}{{ .Data.data.tls_cert }}{{ end }}\n"
        destination = "secrets/tls.crt"
        change_mode = "restart"
        perms = "0600"
      }
      template {
        data = "{{ with secret \"secret/data/mctl/control-plane\" }}{{ .Data.data.tls_key }}{{ end }}\n"
        destination = "secrets/tls.key"
        change_mode = "restart"
        perms = "0600"
      }
      template {
        data = "{{ with secret \"secret/data/mctl/control-plane\" }}{{ .Data.data.ca }}{{ end }}\n"
        destination = "secrets/ca.pem"
        change_mode = "restart"
        perms = "0600"
      }
      template {
        data = "{{ with secret \"nomad/creds/mctl\" }}NOMAD_TOKEN={{ .Data.secret_id }}{{ end }}\n"
        destination = "secrets/nomad.env"
        env = true
        change_mode = "restart"
      }
      resources {
        cpu = 1000
        memory = 1024
      }
      kill_signal = "SIGTERM"
      kill_timeout = "30s"
    }
  }
}
