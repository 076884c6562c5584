# Written by jobspecs/generate.py from example-hello.json; edit that script, not this file.
job "mctl-hello-square" {
  type = "service"
  namespace = "default"
  region = "global"
  datacenters = ["*"]
  meta = {
    "mctl.app" = "hello"
    "mctl.app_id" = "ap-0bac8b0086cd3148b495d4"
    "mctl.version" = "1"
    "mctl.function" = "square"
    "mctl.function_id" = "fu-4cef4bb6ed6a694d3488c8"
    "mctl.image_id" = "im-5ae9a63bf65d7c9c529de8"
    "mctl.image" = "/opt/mctl/venv/bin/python"
    "mctl.spec" = "8780c5df5d144c354dab"
  }
  group "workers" {
    count = 0
    scaling {
      enabled = true
      min = 0
      max = 100
      policy {
        cooldown = "60s"
        evaluation_interval = "10s"
        check "queue_depth" {
          source = "prometheus"
          query = "(sum(mctl_queue_depth{function_id=\"fu-4cef4bb6ed6a694d3488c8\"}) + sum(mctl_inputs_running{function_id=\"fu-4cef4bb6ed6a694d3488c8\"})) / clamp_min(sum(mctl_containers{function_id=\"fu-4cef4bb6ed6a694d3488c8\"}), 1)"
          strategy "target-value" {
            target = 1
          }
        }
      }
    }
    restart {
      attempts = 0
      interval = "600s"
      delay = "1s"
      mode = "fail"
    }
    reschedule {
      unlimited = true
      delay = "5s"
      delay_function = "exponential"
      max_delay = "60s"
      interval = "0s"
      attempts = 0
    }
    meta = {
      "mctl.app" = "hello"
      "mctl.app_id" = "ap-0bac8b0086cd3148b495d4"
      "mctl.version" = "1"
      "mctl.function" = "square"
      "mctl.function_id" = "fu-4cef4bb6ed6a694d3488c8"
      "mctl.image_id" = "im-5ae9a63bf65d7c9c529de8"
      "mctl.image" = "/opt/mctl/venv/bin/python"
    }
    task "worker" {
      driver = "raw_exec"
      config {
        command = "/opt/mctl/venv/bin/python"
        args = ["-m", "mctl.core.runtime"]
      }
      env = {
        "MCTL_IMAGE_ID" = "im-5ae9a63bf65d7c9c529de8"
        "MODAL_IMAGE_ID" = "im-5ae9a63bf65d7c9c529de8"
        "MCTL_ENVIRONMENT" = "main"
        "MODAL_ENVIRONMENT" = "main"
        "MCTL_REGION" = "global"
        "MODAL_REGION" = "global"
        "MCTL_CLOUD_PROVIDER" = "nomad"
        "MODAL_CLOUD_PROVIDER" = "nomad"
        "MCTL_IS_REMOTE" = "1"
        "MODAL_IS_REMOTE" = "1"
        "MCTL_SERVER_URL" = "https://mctl.service.nomad:8600"
        "MCTL_APP_ID" = "ap-0bac8b0086cd3148b495d4"
        "MCTL_APP_NAME" = "hello"
        "MCTL_APP_VERSION" = "1"
        "MCTL_FUNCTION_ID" = "fu-4cef4bb6ed6a694d3488c8"
        "PYTHONUNBUFFERED" = "1"
        "MCTL_TASK_ID" = "ta-${NOMAD_ALLOC_ID}"
        "MODAL_TASK_ID" = "ta-${NOMAD_ALLOC_ID}"
      }
      resources {
        cpu = 1000
        memory = 1024
      }
      kill_signal = "SIGTERM"
      kill_timeout = "305s"
      template {
        data = "{{ with nomadVar \"nomad/jobs/mctl-hello-square\" }}MCTL_TASK_TOKEN={{ .task_token }}\n{{ end }}\n"
        destination = "secrets/mctl-task.env"
        env = true
        change_mode = "noop"
      }
      meta = {
        "mctl.task" = "worker"
      }
    }
  }
  update {
    max_parallel = 1
    stagger = "10s"
    health_check = "task_states"
    min_healthy_time = "5s"
    healthy_deadline = "300s"
    progress_deadline = "600s"
    auto_revert = true
  }
}

job "mctl-hello-greet" {
  type = "service"
  namespace = "default"
  region = "global"
  datacenters = ["*"]
  meta = {
    "mctl.app" = "hello"
    "mctl.app_id" = "ap-0bac8b0086cd3148b495d4"
    "mctl.version" = "1"
    "mctl.function" = "greet"
    "mctl.function_id" = "fu-9892239e1b1aa7a7873f2b"
    "mctl.image_id" = "im-5ae9a63bf65d7c9c529de8"
    "mctl.image" = "/opt/mctl/venv/bin/python"
    "mctl.spec" = "ad977f7f0a94ac731193"
  }
  group "workers" {
    count = 0
    scaling {
      enabled = true
      min = 0
      max = 100
      policy {
        cooldown = "60s"
        evaluation_interval = "10s"
        check "queue_depth" {
          source = "prometheus"
          query = "(sum(mctl_queue_depth{function_id=\"fu-9892239e1b1aa7a7873f2b\"}) + sum(mctl_inputs_running{function_id=\"fu-9892239e1b1aa7a7873f2b\"})) / clamp_min(sum(mctl_containers{function_id=\"fu-9892239e1b1aa7a7873f2b\"}), 1)"
          strategy "target-value" {
            target = 1
          }
        }
      }
    }
    restart {
      attempts = 0
      interval = "600s"
      delay = "1s"
      mode = "fail"
    }
    reschedule {
      unlimited = true
      delay = "5s"
      delay_function = "exponential"
      max_delay = "60s"
      interval = "0s"
      attempts = 0
    }
    meta = {
      "mctl.app" = "hello"
      "mctl.app_id" = "ap-0bac8b0086cd3148b495d4"
      "mctl.version" = "1"
      "mctl.function" = "greet"
      "mctl.function_id" = "fu-9892239e1b1aa7a7873f2b"
      "mctl.image_id" = "im-5ae9a63bf65d7c9c529de8"
      "mctl.image" = "/opt/mctl/venv/bin/python"
    }
    task "worker" {
      driver = "raw_exec"
      config {
        command = "/opt/mctl/venv/bin/python"
        args = ["-m", "mctl.core.runtime"]
      }
      env = {
        "MCTL_IMAGE_ID" = "im-5ae9a63bf65d7c9c529de8"
        "MODAL_IMAGE_ID" = "im-5ae9a63bf65d7c9c529de8"
        "MCTL_ENVIRONMENT" = "main"
        "MODAL_ENVIRONMENT" = "main"
        "MCTL_REGION" = "global"
        "MODAL_REGION" = "global"
        "MCTL_CLOUD_PROVIDER" = "nomad"
        "MODAL_CLOUD_PROVIDER" = "nomad"
        "MCTL_IS_REMOTE" = "1"
        "MODAL_IS_REMOTE" = "1"
        "MCTL_SERVER_URL" = "https://mctl.service.nomad:8600"
        "MCTL_APP_ID" = "ap-0bac8b0086cd3148b495d4"
        "MCTL_APP_NAME" = "hello"
        "MCTL_APP_VERSION" = "1"
        "MCTL_FUNCTION_ID" = "fu-9892239e1b1aa7a7873f2b"
        "PYTHONUNBUFFERED" = "1"
        "MCTL_TASK_ID" = "ta-${NOMAD_ALLOC_ID}"
        "MODAL_TASK_ID" = "ta-${NOMAD_ALLOC_ID}"
      }
      resources {
        cpu = 1000
        memory = 1024
      }
      kill_signal = "SIGTERM"
      kill_timeout = "305s"
      template {
        data = "{{ with nomadVar \"nomad/jobs/mctl-hello-greet\" }}MCTL_TASK_TOKEN={{ .task_token }}\n{{ end }}\n"
        destination = "secrets/mctl-task.env"
        env = true
        change_mode = "noop"
      }
      meta = {
        "mctl.task" = "worker"
      }
    }
  }
  update {
    max_parallel = 1
    stagger = "10s"
    health_check = "task_states"
    min_healthy_time = "5s"
    healthy_deadline = "300s"
    progress_deadline = "600s"
    auto_revert = true
  }
}
