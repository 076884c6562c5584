"""vagrant/ is checked without a hypervisor: `vagrant validate --ignore-provider` for both
cluster variants and `bash -n` on the provisioning scripts (scripts/vagrant-check)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "vagrant-check"


def run_check(directory=None):
    if shutil.which("vagrant") is None:
        if os.environ.get("MCTL_REQUIRE_SERVERS") == "1":
            pytest.fail("vagrant is not installed; .ci/run installs it (scripts/vagrant-check "
                        "--install)")
        pytest.skip("vagrant is not installed (scripts/vagrant-check --install)")
    env = {**os.environ, **({"MCTL_VAGRANT_DIR": str(directory)} if directory else {})}
    return subprocess.run([str(CHECK)], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_vagrantfile_and_provisioning_are_valid():
    done = run_check()
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_a_broken_vagrantfile_fails_the_check(tmp_path):
    copy = tmp_path / "vagrant"
    shutil.copytree(ROOT / "vagrant", copy, ignore=shutil.ignore_patterns(".vagrant", "bin"))
    text = (copy / "Vagrantfile").read_text()
    (copy / "Vagrantfile").write_text(text.replace("node.vm.hostname = m[:name]",
                                                   "node.vm.hostname = m[:name]\n      end end"))
    done = run_check(copy)
    assert done.returncode != 0
