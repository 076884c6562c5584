import asyncio
import os
import time

import mctl

app = mctl.App("basic")


@app.function()
def square(x):
    return x * x


@app.function()
def add(a, b=0):
    return a + b


@app.function()
def fail(msg):
    raise KeyError(msg)


class CustomError(Exception):
    pass


@app.function()
def fail_custom(msg):
    raise CustomError(msg)


@app.function()
def gen(n):
    for i in range(n):
        yield i * 10


@app.function()
async def async_double(x):
    await asyncio.sleep(0.01)
    return 2 * x


@app.function()
def env_vars():
    keys = ["TASK_ID", "IMAGE_ID", "ENVIRONMENT", "REGION", "CLOUD_PROVIDER"]
    return {k: (os.environ.get(f"MCTL_{k}"), os.environ.get(f"MODAL_{k}")) for k in keys}


@app.function()
def nbytes(data):
    return len(data), data[:4]


@app.function()
def big_result(n):
    return b"x" * n


@app.function()
def slow(x):
    time.sleep(x)
    return x


@app.function()
def call_other(x):
    return square.remote(x) + 1


@app.function()
def spawn_other(x):
    return square.spawn(x).get() + 1


@app.function(serialized=True)
def shipped(x):
    return x + 1000


@app.function(secrets=[mctl.Secret.from_dict({"API_TOKEN": "t0k"})], env={"MODE": "test"})
def read_secret():
    return os.environ["API_TOKEN"], os.environ["MODE"]


@app.function(max_containers=1)
@mctl.concurrent(max_inputs=4)
def concurrent_sleep(x):
    start = time.time()
    time.sleep(0.5)
    return x, os.getpid(), start, time.time()


@app.function()
@mctl.batched(max_batch_size=4, wait_ms=200)
def batch_sum(xs):
    # returns the batch size with each item so the test can see batching happen
    return [(x, len(xs)) for x in xs]


@app.cls()
class Counter:
    start: int = mctl.parameter(default=0)

    @mctl.enter()
    def setup(self):
        self.base = self.start + 100

    @mctl.method()
    def value(self, x):
        return self.base + x

    @mctl.method()
    def count(self, n):
        for i in range(n):
            yield self.base + i


@app.local_entrypoint()
def main():
    print("entrypoint", square.remote(3))
