# Written by jobspecs/generate.py from mctl-autoscaler.json; edit that script, not this file.
job "mctl-autoscaler" {
  type = "service"
  datacenters = ["*"]
  meta = {
    "mctl.role" = "autoscaler"
  }
  group "prometheus" {
    count = 1
    network {
      port "http" {
        to = 9090
      }
    }
    service {
      name = "prometheus"
      port = "http"
      provider = "nomad"
    }
    task "prometheus" {
      driver = "docker"
      config {
        image = "prom/prometheus:v2.53.0"
        ports = ["http"]
        args = ["--config.file=/local/prometheus.yml"]
      }
      vault {
        role = "mctl-metrics"
        change_mode = "restart"
      }
      template {
        data = "global:\n  scrape_interval: 5s\nscrape_configs:\n  - job_name: mctl\n    scheme: https\n    metrics_path: /metrics\n    authorization:\n      credentials_file: /secrets/metrics-token\n    tls_config:\n      ca_file: /secrets/ca.pem\n    static_configs:\n      - targets: [{{ range nomadService \"mctl\" }}\"{{ .Address }}:{{ .Port }}\",{{ end }}]\n"
        destination = "local/prometheus.yml"
        change_mode = "signal"
        change_signal = "SIGHUP"
      }
      template {
        data = "{{ with secret \"secret/data/mctl/control-plane\" }}{{ .Data.data.metrics_token }}{{ end }}"
        destination = "secrets/metrics-token"
        change_mode = "restart"
        perms = "0600"
      }
      template {
        data = "{{ with secret \"secret/data/mctl/control-plane\" }}{{ .Data.data.ca }}{{ end }}"
        destination = "secrets/ca.pem"
        change_mode = "restart"
        perms = "0600"
      }
      resources {
        cpu = 500
        memory = 512
      }
    }
  }
  group "autoscaler" {
    count = 1
    task "autoscaler" {
      driver = "docker"
      config {
        image = "hashicorp/nomad-autoscaler:0.4.5"
        command = "nomad-autoscaler"
        args = ["agent", "-config", "/local/config.hcl"]
      }
      template {
        data = "nomad {\n  address = \"https://{{ env \"attr.unique.network.ip-address\" }}:4646\"\n  ca_cert = \"/etc/nomad.d/tls/ca.pem\"\n}\napm \"prometheus\" {\n  driver = \"prometheus\"\n  config = {\n    address = \"http://{{ range nomadService \"prometheus\" }}{{ .Address }}:{{ .Port }}{{ end }}\"\n  }\n}\nstrategy \"target-value\" {\n  driver = \"target-value\"\n}\n"
        destination = "local/config.hcl"
        change_mode = "restart"
      }
      template {
        data = "{{ with secret \"nomad/creds/mctl-autoscaler\" }}NOMAD_TOKEN={{ .Data.secret_id }}{{ end }}\n"
        destination = "secrets/nomad.env"
        env = true
        change_mode = "restart"
      }
      vault {
        role = "mctl-autoscaler"
        change_mode = "restart"
      }
      resources {
        cpu = 200
        memory = 256
      }
    }
  }
}
