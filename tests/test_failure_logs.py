"""Every failed attempt of a deployed function leaves one entry in the app's logs, on stderr:
a line naming the function, input, call and attempt, then the traceback its caller sees (the
user's frames only). A crash after retries names the function and the attempts."""

import json
import os
import re
import subprocess
import sys
import urllib.request

import pytest

from conftest import APPS, wait_until

APP = str(APPS / "failing_logs.py")


def mctl_cli(*args):
    return subprocess.run([sys.executable, "-m", "mctl", *args], capture_output=True, text=True,
                          timeout=120, env=os.environ)


def log_rows(server):
    request = urllib.request.Request(f"{server.url}/api/apps/failing-logs/logs", headers={
        "Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def line_of(code):
    with open(APP) as f:
        return next(i for i, line in enumerate(f, 1) if line.strip() == code)


@pytest.fixture
def deployed(server_process):
    out = mctl_cli("deploy", APP)
    assert out.returncode == 0, out.stderr
    yield server_process
    mctl_cli("app", "stop", "failing-logs")


@pytest.mark.integration
@pytest.mark.slow
def test_a_spawned_functions_exception_is_in_the_logs_once_with_its_traceback(deployed):
    import mctl

    call = mctl.Function.from_name("failing-logs", "fails").spawn(1, token="s3cr3t-value")
    with pytest.raises(KeyError):
        call.get(timeout=60)
    input_id = f"in-{call.object_id[3:]}-0"
    header = f"mctl: fails failed (input {input_id}, call {call.object_id}):"
    assert wait_until(lambda: any(r["line"] == header for r in log_rows(deployed)), 10), \
        log_rows(deployed)
    rows = log_rows(deployed)
    assert [r["line"] for r in rows].count(header) == 1, rows
    start = next(i for i, r in enumerate(rows) if r["line"] == header)
    end = next(i for i, r in enumerate(rows) if r["line"] == "KeyError: 'missing 1'")
    entry = rows[start:end + 1]
    assert all(r["stream"] == "stderr" and r["function"] == "fails" for r in entry), entry
    raise_line = line_of('raise KeyError(f"missing {x}")')
    assert [r["line"] for r in entry[1:] if r["line"].strip(" ^~")] == [
        "Traceback (most recent call last):",
        f'  File "{APP}", line {line_of("return helper(x)")}, in fails',
        "    return helper(x)",
        f'  File "{APP}", line {raise_line}, in helper',
        "    raise KeyError(f\"missing {x}\")",
        "KeyError: 'missing 1'"], entry
    assert entry[0]["task_id"] == next(r["task_id"] for r in rows
                                       if r["line"] == "about to fail 1")
    assert "s3cr3t-value" not in json.dumps(rows)  # arguments are never logged

    # `mctl app logs --stream stderr` shows it, on stderr
    out = mctl_cli("app", "logs", "failing-logs", "--stream", "stderr")
    assert header in out.stderr and "KeyError: 'missing 1'" in out.stderr, out.stderr
    assert "mctl.core" not in out.stderr and "bundles" not in out.stderr, out.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_each_crashed_attempt_is_logged_and_the_error_names_function_and_attempts(deployed):
    import mctl

    fn = mctl.Function.from_name("failing-logs", "crashes")
    with pytest.raises(mctl.exception.ContainerCrashedError) as info:
        fn.remote()
    message = str(info.value)
    assert re.search(r"The container \(\S+\) running input in-\S+ of crashes exited with code 3 "
                     r"before it finished; crashes failed after 3 attempts \(retries=2\)\. See "
                     r"its output with `mctl app logs failing-logs`\.", message), message
    lines = [r["line"] for r in log_rows(deployed)]
    headers = [line for line in lines if line.startswith("mctl: crashes crashed (")]
    assert [re.sub(r".*attempt (\d) of 3.*", r"\1", h) for h in headers] == ["1", "2", "3"], lines
    assert "retrying in" in headers[0] and "retrying in" not in headers[2], headers
    assert sum("failed after 3 attempts" in line for line in lines) == 1, lines


@pytest.mark.integration
@pytest.mark.slow
def test_a_timed_out_input_is_logged_and_names_its_attempts(deployed):
    import mctl

    with pytest.raises(mctl.exception.FunctionTimeoutError) as info:
        mctl.Function.from_name("failing-logs", "hangs").remote()
    assert "of hangs timed out after 1s; hangs failed after 2 attempts (retries=1)" \
        in str(info.value), str(info.value)
    lines = [r["line"] for r in log_rows(deployed)]
    headers = [line for line in lines if line.startswith("mctl: hangs timed out (")]
    assert len(headers) == 2 and "attempt 1 of 2" in headers[0] and "attempt 2 of 2" in \
        headers[1], lines


@pytest.mark.integration
@pytest.mark.slow
def test_a_failing_scheduled_run_is_in_the_logs(deployed):
    def failures():
        rows = log_rows(deployed)
        return [r for r in rows if r["line"].startswith("mctl: scheduled failed (")]

    assert wait_until(lambda: len(failures()) >= 2, 30), log_rows(deployed)
    rows = log_rows(deployed)
    fired = [r["line"] for r in rows if r["line"].startswith("mctl: schedule fired scheduled")]
    assert fired, rows
    # each failed run once, with its traceback, attributed to its call
    call_ids = [re.search(r"call (fc-\w+)", r["line"])[1] for r in failures()]
    assert len(call_ids) == len(set(call_ids)), call_ids
    assert any(call_ids[0] in line for line in fired), (call_ids, fired)
    out = mctl_cli("app", "logs", "failing-logs", "--stream", "stderr")
    assert "ValueError: scheduled failure" in out.stderr, out.stderr
    raise_line = line_of('raise ValueError("scheduled failure")')
    assert f'File "{APP}", line {raise_line}, in scheduled' in out.stderr, out.stderr
    # `mctl app list` says that the last scheduled run failed, and where to look
    import mctl

    with pytest.raises(KeyError):
        mctl.Function.from_name("failing-logs", "fails").remote(2)
    listed = mctl_cli("app", "list")
    assert re.search(r"    scheduled: last scheduled run failed at [-\d]+ [:\d]+ \(fc-\w+\): "
                     r"ValueError: scheduled failure; see `mctl app logs failing-logs`",
                     listed.stdout), listed.stdout
    assert "fails:" not in listed.stdout  # only scheduled functions' runs are shown there



def test_the_control_plane_reads_an_errors_text_without_running_its_pickle(tmp_path):
    """Logging a failure must not unpickle the user's objects in the control plane."""
    from mctl.core.serialization import describe_error, dumps, serialize_exception

    marker = tmp_path / "ran"

    class Evil(Exception):
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    try:
        raise Evil("boom")
    except Evil as exc:
        text = describe_error(serialize_exception(exc))
    assert text.startswith("Traceback (most recent call last):"), text
    assert text.endswith("Evil: boom"), text
    assert not marker.exists()
    # a payload that is not an error's: a short note, nothing run
    assert "could not be read" in describe_error(dumps(Evil("x")))
    assert not marker.exists()
