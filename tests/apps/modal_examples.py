"""Common Modal apps as Modal's docs write them, with `import mctl as modal`
(tests/test_modal_examples.py): hello world, map/starmap/spawn, FunctionCall.gather and
from_id, retries, a parameterised class with @enter, Dict and Queue handed to functions,
schedules and a web endpoint taking JSON."""

import time

import mctl as modal

app = modal.App("modal-examples")
counts = modal.Dict.from_name("modal-examples-counts", create_if_missing=True)


@app.function()
def square(x):
    print("This code is running on a remote worker!")
    return x**2


@app.function()
def add(a, b=0, *, c=0):
    return a + b + c


@app.function()
def slow_word(word):
    time.sleep(0.5)
    return word


@app.function()
def checked(number):
    if number == 0:
        raise ValueError("custom error")
    return number


@app.function(retries=modal.Retries(max_retries=3, backoff_coefficient=1.0, initial_delay=0.2))
def flaky(key):
    attempt = counts.get(key, 0) + 1
    counts[key] = attempt
    if attempt < 3:
        raise RuntimeError(f"attempt {attempt} fails")
    return attempt


@app.function(retries=1)
def always_fails():
    raise RuntimeError("no luck")


@app.cls()
class Greeter:
    greeting: str = modal.parameter(default="Hello")

    @modal.enter()
    def load(self):
        self.suffix = "!"

    @modal.method()
    def greet(self, name):
        return f"{self.greeting}, {name}{self.suffix}"


@app.function()
def producer(q, items):
    for item in items:
        q.put(item)
    q.put(None)


@app.function()
def consumer(q, d):
    total = 0
    while (item := q.get(timeout=30)) is not None:
        total += item
    d["total"] = total
    return total


@app.function(schedule=modal.Period(seconds=1))
def tick():
    counts["ticks"] = counts.get("ticks", 0) + 1


@app.function()
@modal.fastapi_endpoint(method="POST")
def echo(item: dict):
    return {"got": item, "squared": item.get("x", 0) ** 2}


@app.local_entrypoint()
def main(n: int = 4):
    print("square(7) =", square.remote(7))
    print("local:", square.local(3))
    print("sum of squares:", sum(square.map(range(n))))
    print("starmap:", list(add.starmap([(1, 2), (3, 4)], kwargs={"c": 10})))
    word = slow_word.spawn("foo")
    number = checked.spawn(2)
    print("spawned:", word.get() * number.get())
    print("gathered:", modal.FunctionCall.gather(slow_word.spawn("bar"), checked.spawn(4)))
    try:
        modal.FunctionCall.gather(slow_word.spawn("bar"), checked.spawn(0))
    except ValueError as exc:
        print("gather raised:", exc)
    print("unordered:", sorted(square.map(range(3), order_outputs=False)))
    print("with exceptions:", [type(r).__name__ for r in checked.map([1, 0], return_exceptions=True)])
    print("greeting:", Greeter(greeting="Hi").greet.remote("Ada"))
    print("retried:", flaky.remote(f"run-{time.time()}"))
    try:
        always_fails.remote()
    except RuntimeError as exc:
        print("gave up:", exc)
    with modal.Queue.ephemeral() as q, modal.Dict.ephemeral() as d:
        result = consumer.spawn(q, d)
        producer.remote(q, [1, 2, 3])
        print("queue total:", result.get(), d["total"])
