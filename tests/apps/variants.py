"""Classes run through Cls.with_options / with_concurrency / with_batching
(tests/test_cls_variants.py)."""

import os
import time

import mctl as modal

app = modal.App("variants")


@app.cls(timeout=30, env={"COLOUR": "base", "SHAPE": "round"}, max_containers=1)
class Model:
    size: int = modal.parameter(default=1)

    @modal.method()
    def info(self, sleep: float = 0.0):
        t0 = time.time()
        time.sleep(sleep)
        return {"function_id": os.environ["MCTL_FUNCTION_ID"], "pid": os.getpid(),
                "colour": os.environ.get("COLOUR"),
                "shape": os.environ.get("SHAPE"), "secret": os.environ.get("VARIANT_SECRET"),
                "size": self.size, "t0": t0, "t1": time.time()}


@app.cls()
class Doubler:
    @modal.batched(max_batch_size=1, wait_ms=0)
    def double(self, xs):
        return [(2 * x, len(xs)) for x in xs]
