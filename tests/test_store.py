"""The control plane's SQLite store: grouped commits, recovery reads, retention."""

import json
import os
import time

from mctl.core.server.store import Store


def test_grouped_commit_and_first_output_wins(tmp_path):
    store = Store(tmp_path)
    now = time.time()
    store.new_calls.append(("fc-a", "fu-x", now))
    store.new_inputs.extend([(f"in-a-{i}", "fu-x", "fc-a", i, b"p", 0, now) for i in range(3)])
    store.commit()
    assert [row[0] for row in store.pending_inputs()] == ["in-a-0", "in-a-1", "in-a-2"]
    store.new_outputs.append(("fc-a", 0, 0, "success", b"first", 0, now))
    store.new_outputs.append(("fc-a", 0, 0, "success", b"second", 0, now))
    store.done_inputs.append(("in-a-0",))
    store.commit()
    assert store.outputs_of("fc-a") == [(0, 0, "success", b"first", 0)]
    assert [row[0] for row in store.pending_inputs()] == ["in-a-1", "in-a-2"]


def test_state_survives_reopen(tmp_path):
    store = Store(tmp_path)
    store.upsert_app("ap-1", "demo", "deployed")
    store.add_version("ap-1", "de-1", {"name": "demo"})
    store.close()
    again = Store(tmp_path)
    assert again.find_app("demo")["version"] == 1
    assert again.version_spec("ap-1", 1) == {"name": "demo"}


def test_retention_keeps_what_is_still_needed(tmp_path):
    store = Store(tmp_path)
    old = time.time() - 10 * 86400
    store.upsert_app("ap-1", "demo", "deployed")
    store.add_version("ap-1", "de-1", {"bundle_blob": "bl-bundle", "functions": {}})
    for name in ("bl-bundle", "bl-oldresult", "bl-waiting"):
        (store.blob_dir / name).write_bytes(b"x")
        os.utime(store.blob_dir / name, (old, old))
    store.new_calls.extend([("fc-old", "fu-x", old), ("fc-wait", "fu-x", old)])
    store.new_outputs.append(("fc-old", 0, 0, "success", b"bl-oldresult", 1, old))
    store.new_inputs.append(("in-wait-0", "fu-x", "fc-wait", 0, b"bl-waiting", 1, old))
    store.commit()
    removed = store.gc(time.time() - 7 * 86400)
    assert removed["outputs"] == 1 and removed["calls"] == 1 and removed["blobs"] == 1
    assert sorted(p.name for p in store.blob_dir.iterdir()) == ["bl-bundle", "bl-waiting"]
    assert store.call("fc-wait") is not None and store.call("fc-old") is None
    assert json.loads(json.dumps(store.versions("ap-1")))[0]["version"] == 1
