"""Sandboxes as Nomad jobs, contract-checked: Nomad cannot be obtained here, so each rendered job
is decoded strictly into Nomad's Go API types, with each driver's documented config keys, by
tools/nomad-jobcheck; the alloc exec frames likewise (api.ExecStreamingInput/Output)."""

from __future__ import annotations

import json

import pytest

from mctl.core.sandbox_runtime import SandboxConfig
from mctl.exception import InvalidError
from mctl.plugins import sandbox_nomad
from mctl.plugins.nomad_render import NomadOptions
from nomad_contract import check


def _cfg(**kw):
    return SandboxConfig(sandbox_id="sb-Nomad1", image="registry.example:5000/mctl:im-1",
                         command=["python", "-c", "print(1)"], **kw)


def _task(doc):
    [group] = doc["Job"]["TaskGroups"]
    [task] = group["Tasks"]
    return group, task


def test_a_gvisor_sandbox_is_a_docker_batch_job_with_runsc_and_no_network():
    doc = sandbox_nomad.render_sandbox(_cfg(cpu=2, memory_mb=2048, env={"MODE": "x"}), "gvisor",
                                       app_id="ap-1", secret_names=("openai",))
    group, task = _task(doc)
    assert doc["Job"]["Type"] == "batch" and doc["Job"]["ID"] == "mctl-sb-nomad1"
    assert task["Driver"] == "docker" and task["User"] == "65534:65534"
    config = task["Config"]
    assert config["runtime"] == "runsc" and config["network_mode"] == "none"
    assert config["cap_drop"] == ["ALL"] and config["security_opt"] == ["no-new-privileges"]
    assert config["init"] is True and config["ulimit"] == {"nproc": "512:512"}
    assert (config["command"], config["args"]) == ("python", ["-c", "print(1)"])
    assert task["Resources"]["CPU"] == 2000 and task["Resources"]["MemoryMB"] == 2048
    assert "Devices" not in task["Resources"]
    assert task["KillSignal"] == "SIGKILL" and task["KillTimeout"] == 5 * 10**9
    assert group["RestartPolicy"]["Attempts"] == 0
    assert group["ReschedulePolicy"] == {"Attempts": 0, "Unlimited": False}
    assert task["Env"]["MODE"] == "x" and task["Templates"][0]["Envvars"] is True
    done = check([doc])
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_gpu_sandbox_is_runc_with_the_drivers_gpu_runtime(monkeypatch):
    """GPUs under gVisor need runsc's nvproxy, which Nomad's drivers cannot pass: a GPU sandbox
    gets runc, and on docker names no runtime (the driver's gpu_runtime, nvidia, is runc plus
    NVIDIA's hook; naming another one is "conflicting runtime requests")."""
    monkeypatch.delenv("MCTL_SANDBOX_ISOLATION", raising=False)
    backend = sandbox_nomad.NomadSandboxes.__new__(sandbox_nomad.NomadSandboxes)
    assert backend.isolation(_cfg(gpu="A100:1")) == "runc"
    assert backend.isolation(_cfg()) == "gvisor"
    assert backend.isolation(_cfg(gpu="any", isolation="runc")) == "runc"
    with pytest.raises(InvalidError, match="cannot use gVisor.*nvproxy.*isolation='runc'"):
        backend.isolation(_cfg(gpu="any", isolation="gvisor"))
    monkeypatch.setenv("MCTL_SANDBOX_ISOLATION", "gvisor")
    with pytest.raises(InvalidError, match="unset MCTL_SANDBOX_ISOLATION=gvisor"):
        backend.isolation(_cfg(gpu="any"))
    with pytest.raises(InvalidError, match="cannot use gVisor"):
        sandbox_nomad.render_sandbox(_cfg(), "gvisor", app_id="ap-1", gpu="any")
    doc = sandbox_nomad.render_sandbox(_cfg(), "runc", app_id="ap-1", gpu="A100:2")
    _, task = _task(doc)
    assert "runtime" not in task["Config"] and task["Config"]["pids_limit"] == 512
    [device] = task["Resources"]["Devices"]
    assert device["Name"] == "nvidia/gpu" and device["Count"] == 2
    assert device["Constraints"][0]["RTarget"] == "(?i)A100"
    done = check([doc])
    assert done.returncode == 0, done.stdout + done.stderr


def test_runc_with_ports_and_the_podman_driver_pass_the_contract():
    runc = sandbox_nomad.render_sandbox(_cfg(ports=[8080], block_network=False, workdir="/srv",
                                             mounts=[{"host_path": "/data/v", "path": "/v",
                                                      "read_only": True}]),
                                        "runc", app_id="ap-1")
    group, task = _task(runc)
    assert task["Config"]["runtime"] == "runc" and task["Config"]["network_mode"] == "bridge"
    assert task["Config"]["pids_limit"] == 512 and task["Config"]["ports"] == ["port8080"]
    assert group["Networks"][0]["DynamicPorts"] == [{"Label": "port8080", "To": 8080}]
    assert task["Config"]["volumes"] == ["/data/v:/v:ro"]
    podman = sandbox_nomad.render_sandbox(_cfg(), "gvisor", app_id="ap-1", driver="podman",
                                          options=NomadOptions(namespace="sandboxes"))
    _, ptask = _task(podman)
    assert "runtime" not in ptask["Config"]  # the podman driver has no per-task runtime:
    assert podman["Job"]["Constraints"] == [{"LTarget": "${meta.mctl_sandbox_runtime}",
                                             "Operand": "=", "RTarget": "runsc"}]
    done = check([runc, podman])
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_checker_catches_a_broken_sandbox_job():
    """The contract check can fail: a key the docker driver does not have, a wrong shape."""
    doc = sandbox_nomad.render_sandbox(_cfg(), "gvisor", app_id="ap-1")
    _task(doc)[1]["Config"]["runtime_flags"] = ["network=none"]
    bad_shape = sandbox_nomad.render_sandbox(_cfg(), "runc", app_id="ap-1")
    _task(bad_shape)[1]["Config"]["pids_limit"] = "512"
    for broken, words in ((doc, "has no config \"runtime_flags\""),
                          (bad_shape, "\"pids_limit\" is not a number")):
        done = check([broken])
        assert done.returncode != 0 and words in done.stdout + done.stderr, done.stdout


def test_exec_and_raw_exec_are_refused_for_sandboxes():
    with pytest.raises(InvalidError, match="needs a container driver"):
        sandbox_nomad.render_sandbox(_cfg(), "gvisor", app_id="ap-1", driver="raw_exec")


def test_alloc_exec_frames_follow_nomads_api_types():
    path = sandbox_nomad.exec_path("5b0c-alloc", ["python", "-c", "print(1)"])
    assert path.startswith("/v1/client/allocation/5b0c-alloc/exec?task=sandbox&tty=false")
    assert json.loads(__import__("urllib.parse").parse.unquote(path.split("command=")[1])) == [
        "python", "-c", "print(1)"]
    sent = [json.loads(sandbox_nomad.stdin_frame(b"hello\n")),
            json.loads(sandbox_nomad.stdin_frame(None))]
    done = check(sent, kind="exec-in")
    assert done.returncode == 0, done.stdout + done.stderr
    # what Nomad sends, as its Go client encodes it ([]byte is base64)
    received = ['{"stdout":{"data":"aGVsbG8K"}}', '{"stderr":{"data":"b29wcw=="}}',
                '{"exited":true,"result":{"exit_code":3}}']
    done = check([json.loads(r) for r in received], kind="exec-out")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [sandbox_nomad.read_frame(r) for r in received] == [
        ("stdout", b"hello\n"), ("stderr", b"oops"), ("exit", 3)]
    assert check([{"stdin": {"data": "not base64!"}}], kind="exec-in").returncode != 0


def test_the_exec_wrapper_reads_env_from_stdin_then_runs_the_command(tmp_path):
    """Nomad's alloc exec has no env or workdir: the wrapper gets them from the stream. Run it
    with this machine's /bin/sh, as the sandbox's shell would."""
    import subprocess

    marker = "mctl-env-0123abcd"
    env = {"API_KEY": "it's a\nmulti-line $value", "MODE": "x"}
    argv = sandbox_nomad.exec_command(
        ["/bin/sh", "-c", 'printf "%s|%s|%s|%s|" "$API_KEY" "$MODE" "$PWD" "$MCTL_EXEC_ID"; '
         'cat; exit 5'],
        marker=marker, kill_marker="00ff", workdir=str(tmp_path))
    stdin = sandbox_nomad.env_preamble(env, marker) + b"the command's own stdin\n"
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=30, env={})
    assert done.returncode == 5, done.stderr
    assert done.stdout.decode() == (f"it's a\nmulti-line $value|x|{tmp_path}|00ff|"
                                    "the command's own stdin\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no pid file (a timeout finds
    # the command by MCTL_EXEC_ID in /proc, sandbox_runtime.kill_marked_command)
    assert "multi-line" not in " ".join(argv)  # the value travelled in stdin only
    with pytest.raises(InvalidError, match="not valid in a shell"):
        sandbox_nomad.env_preamble({"BAD-NAME": "1"}, marker)


def test_placement_failures_and_exit_codes_read_from_nomads_documents():
    evaluation = {"FailedTGAllocs": {"sandbox": {
        "NodesEvaluated": 4, "NodesAvailable": {"dc1": 4},
        "ConstraintFiltered": {"${meta.mctl_sandbox_runtime} = runsc": 3},
        "NodesExhausted": 1, "DimensionExhausted": {"memory": 1}}}}
    assert check([evaluation], kind="evaluation").returncode == 0
    reason = sandbox_nomad.placement_reason(evaluation)
    assert "3 node(s) excluded by filter" in reason and "dimension 'memory' exhausted" in reason
    assert sandbox_nomad.placement_reason({"Status": "complete"}) == ""
    dead = {"ClientStatus": "failed", "TaskStates": {"sandbox": {"State": "dead", "Events": [
        {"Type": "Started"}, {"Type": "Terminated", "ExitCode": 0, "Signal": 9}]}}}
    assert check([[dead]], kind="allocs").returncode == 0
    assert sandbox_nomad.exit_code(dead) == 137
    dead["TaskStates"]["sandbox"]["Events"][1] = {"Type": "Terminated", "ExitCode": 3}
    assert sandbox_nomad.exit_code(dead) == 3
    assert sandbox_nomad.exit_code({"ClientStatus": "lost"}) is None


def test_volumes_are_nomads_host_or_csi_volumes_named_after_mctls():
    volumes = (("/data", "datasets", True), ("/out", "results", False),
               ("/data2", "datasets", True))
    host = sandbox_nomad.render_sandbox(_cfg(), "gvisor", app_id="ap-1", volumes=volumes)
    group, task = _task(host)
    assert group["Volumes"] == {
        "datasets": {"Name": "datasets", "Type": "host", "Source": "datasets", "ReadOnly": True},
        "results": {"Name": "results", "Type": "host", "Source": "results", "ReadOnly": False}}
    assert {m["Destination"]: (m["Volume"], m["ReadOnly"]) for m in task["VolumeMounts"]} == {
        "/data": ("datasets", True), "/data2": ("datasets", True), "/out": ("results", False)}
    assert "volumes" not in task["Config"]  # no host paths of the control plane
    csi = sandbox_nomad.render_sandbox(_cfg(), "runc", app_id="ap-1", volumes=volumes,
                                       options=NomadOptions(volume_type="csi"))
    assert _task(csi)[0]["Volumes"]["results"]["AccessMode"] == "multi-node-multi-writer"
    assert _task(csi)[0]["Volumes"]["datasets"]["AccessMode"] == "multi-node-reader-only"
    done = check([host, csi])
    assert done.returncode == 0, done.stdout + done.stderr
