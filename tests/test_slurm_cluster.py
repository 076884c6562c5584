"""The development Slurm cluster (scripts/slurm-dev) runs batch jobs on its nodes and hands out
its fake GPUs, as the Slurm backend's tests rely on."""

from conftest import wait_until

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slurm]


def run_batch(cluster, tmp_path, *sbatch_args):
    """Submit a batch job and return the lines it printed, once it has printed them."""
    output = tmp_path / "job-%j.out"  # the nodes share this machine's file system
    result = cluster.run("sbatch", "--parsable", f"--output={output}", *sbatch_args)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    path = tmp_path / f"job-{job_id}.out"
    finished = wait_until(lambda: not cluster.run("squeue", "-h", "-j", job_id).stdout.strip(), 60)
    assert finished, cluster.run("squeue", "-j", job_id).stdout
    return path.read_text().split()


def test_a_batch_job_runs_on_a_node(slurm_cluster, tmp_path):
    assert run_batch(slurm_cluster, tmp_path, "--wrap", "hostname")[0] in slurm_cluster.nodes


def test_a_two_gpu_job_sees_both_gpus_of_its_node(slurm_cluster, tmp_path):
    lines = run_batch(slurm_cluster, tmp_path, "--gres=gpu:a100:2",
                      "--wrap", "echo $CUDA_VISIBLE_DEVICES; hostname")
    assert lines[0] == "0,1"
    assert lines[1] in slurm_cluster.nodes
