"""jobspecs/: the Nomad jobs that run mctl on a cluster pass Nomad's API types, and the HCL files
are what jobspecs/generate.py writes (they cannot drift from the checked JSON)."""

import json
import subprocess
import sys
from pathlib import Path

from nomad_contract import check

JOBSPECS = Path(__file__).resolve().parent.parent / "jobspecs"


def _documents(text):
    decoder, docs, i = json.JSONDecoder(), [], 0
    while text[i:].strip():
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
        i += 1
    return docs


def test_jobspecs_pass_nomads_types():
    docs = [doc for path in sorted(JOBSPECS.glob("*.json"))
            for doc in _documents(path.read_text())]
    assert {d["Job"]["ID"] for d in docs} >= {"mctl", "mctl-autoscaler", "mctl-hello-square"}
    done = check(docs)
    assert done.returncode == 0, done.stdout


def test_hcl_files_are_generated_from_the_checked_json():
    done = subprocess.run([sys.executable, str(JOBSPECS / "generate.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    hello = (JOBSPECS / "example-hello.nomad.hcl").read_text()
    assert 'job "mctl-hello-square" {' in hello and 'strategy "target-value" {' in hello
