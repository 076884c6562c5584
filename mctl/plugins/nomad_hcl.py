"""Nomad job JSON (as `nomad_render` makes it) written as an HCL2 jobspec, for people to read and
keep: `mctl nomad render --hcl`. Only the fields mctl renders are mapped."""

from __future__ import annotations

import json
from typing import Any

from mctl.plugins.nomad_render import NS

# JSON field -> HCL name; fields whose value is a list of blocks are in BLOCKS.
NAMES = {
    "Type": "type", "Namespace": "namespace", "Region": "region", "Datacenters": "datacenters",
    "NodePool": "node_pool", "Count": "count", "Driver": "driver", "Enabled": "enabled",
    "Min": "min", "Max": "max", "Attempts": "attempts", "Interval": "interval", "Delay": "delay",
    "Mode": "mode", "Unlimited": "unlimited", "DelayFunction": "delay_function",
    "MaxDelay": "max_delay", "KillTimeout": "kill_timeout", "KillSignal": "kill_signal",
    "CPU": "cpu", "MemoryMB": "memory", "Role": "role", "ChangeMode": "change_mode",
    "EmbeddedTmpl": "data", "DestPath": "destination", "Envvars": "env", "Volume": "volume",
    "Destination": "destination", "ReadOnly": "read_only", "Source": "source",
    "AccessMode": "access_mode", "AttachmentMode": "attachment_mode", "LTarget": "attribute",
    "Operand": "operator", "RTarget": "value", "Weight": "weight", "MaxParallel": "max_parallel",
    "Stagger": "stagger", "HealthCheck": "health_check", "MinHealthyTime": "min_healthy_time",
    "HealthyDeadline": "healthy_deadline", "ProgressDeadline": "progress_deadline",
    "AutoRevert": "auto_revert", "Specs": "crons", "TimeZone": "time_zone",
    "ProhibitOverlap": "prohibit_overlap", "Env": "env", "Meta": "meta", "Config": "config",
    "Policy": "policy", "Name": "name", "PortLabel": "port", "Provider": "provider",
    "Path": "path", "Timeout": "timeout", "Value": "static", "To": "to", "Tags": "tags",
    "Mode@network": "mode", "Args": "args", "Command": "command",
}
BLOCKS = {"Constraints": "constraint", "Affinities": "affinity", "Templates": "template",
          "VolumeMounts": "volume_mount", "Devices": "device", "Tasks": "task",
          "TaskGroups": "group", "Networks": "network", "DynamicPorts": "port",
          "ReservedPorts": "reserved_ports", "Services": "service", "Checks": "check"}
# Blocks whose label is one of their fields.
LABELS = {"group": "Name", "task": "Name", "device": "Name", "port": "Label",
          "reserved_ports": "Label"}
SINGLE = {"Update": "update", "Periodic": "periodic", "Scaling": "scaling",
          "RestartPolicy": "restart", "ReschedulePolicy": "reschedule", "Resources": "resources",
          "Vault": "vault", "EphemeralDisk": "ephemeral_disk"}
DURATIONS = {"Interval", "Delay", "MaxDelay", "KillTimeout", "Stagger", "MinHealthyTime",
             "HealthyDeadline", "ProgressDeadline", "Timeout"}
SKIP = {"ID@job", "Name@job", "SpecType@periodic", "Type@scaling"}
NAMES.update({"SizeMB": "size", "Sticky": "sticky", "Migrate": "migrate", "Protocol": "protocol",
              "TLSSkipVerify": "tls_skip_verify", "Perms": "perms",
              "ChangeSignal": "change_signal"})


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value).replace("%{", "%%{")
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{\n" + "".join(f"  {json.dumps(k)} = {_value(v)}\n" for k, v in value.items()) + "}"
    return json.dumps(value)


def _body(obj: dict[str, Any], indent: str, where: str = "") -> list[str]:
    lines: list[str] = []
    for key, value in obj.items():
        if f"{key}@{where}" in SKIP or value is None or key == LABELS.get(where):
            continue
        if key in BLOCKS:
            block = BLOCKS[key]
            for item in value:
                label = item.get(LABELS[block]) if block in LABELS else None
                label_text = f" {json.dumps(label)}" if label is not None else ""
                lines.append(f"{indent}{block}{label_text} {{")
                lines += _body(item, indent + "  ", block)
                lines.append(f"{indent}}}")
        elif key in SINGLE:
            lines.append(f"{indent}{SINGLE[key]} {{")
            lines += _body(value, indent + "  ", SINGLE[key])
            lines.append(f"{indent}}}")
        elif key == "Volumes":
            for name, volume in value.items():
                lines.append(f"{indent}volume {json.dumps(name)} {{")
                lines += _body(volume, indent + "  ", "volume")
                lines.append(f"{indent}}}")
        elif key == "Policy":
            lines.append(f"{indent}policy {{")
            lines += _policy(value, indent + "  ")
            lines.append(f"{indent}}}")
        elif key == "Config":
            lines.append(f"{indent}config {{")
            for k, v in value.items():
                if isinstance(v, list) and v and all(isinstance(b, dict) for b in v):
                    for body in v:  # a driver's block, e.g. docker's auth { ... }
                        lines.append(f"{indent}  {k} {{")
                        lines += [f"{indent}    {bk} = {_value(bv)}" for bk, bv in body.items()]
                        lines.append(f"{indent}  }}")
                else:
                    lines.append(f"{indent}  {k} = {_value(v)}")
            lines.append(f"{indent}}}")
        elif key in ("Env", "Meta"):  # keys with dots: the map form, not a block
            text = _value(value).replace("\n  ", f"\n{indent}  ").replace("\n}", f"\n{indent}}}")
            lines.append(f"{indent}{NAMES[key]} = {text}")
        else:
            if key in DURATIONS and isinstance(value, int):
                value = f"{value / NS:g}s"
            name = NAMES.get(f"{key}@{where}") or NAMES.get(key)
            if name is None:
                raise ValueError(f"nomad_hcl has no HCL name for field {key} in {where}")
            lines.append(f"{indent}{name} = {_value(value)}")
    return lines


def _policy(policy: dict[str, Any], indent: str) -> list[str]:
    """nomad-autoscaler's opaque policy: labelled blocks come as [{label: [body]}]."""
    lines = []
    for key, value in policy.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            for labelled in value:
                for label, bodies in labelled.items():
                    for body in bodies:
                        lines.append(f"{indent}{key} {json.dumps(label)} {{")
                        lines += _policy(body, indent + "  ")
                        lines.append(f"{indent}}}")
        else:
            lines.append(f"{indent}{key} = {_value(value)}")
    return lines


def to_hcl(request: dict[str, Any]) -> str:
    job = request["Job"]
    return "\n".join([f"job {json.dumps(job['ID'])} {{", *_body(job, "  ", "job"), "}"]) + "\n"
