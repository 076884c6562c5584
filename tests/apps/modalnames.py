"""Modal names that real apps use (tests/test_modal_spellings.py)."""

import mctl as modal
from mctl.app import App
from mctl.cls import Cls
from mctl.functions import Function, FunctionCall

app = App("modalnames")


@app.function()
def ids():
    return modal.current_function_call_id(), modal.current_input_id()


@app.function()
async def async_ids():
    return modal.current_function_call_id(), modal.current_input_id()


@app.function()
def maybe_fail(x):
    modal.interact()  # a no-op in a worker
    if x == 2:
        raise ValueError("two")
    return x


@app.cls()
class Batcher:
    @modal.batched(max_batch_size=4, wait_ms=100)
    def double(self, xs):
        return [2 * x for x in xs]


@app.cls()
class Model:
    size: int = modal.parameter(default=1)

    @modal.method()
    def scale(self, x):
        return self.size * x


assert isinstance(ids, Function) and isinstance(Model, Cls) and FunctionCall is modal.FunctionCall
