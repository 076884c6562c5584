"""Examples of the seed's Modal reference (../shared/seed/modal-reference.txt), as written there
except for the import (tests/test_modal_spellings.py)."""

import mctl as modal

app = modal.App()


@app.function(concurrency_limit=10)
def limited_concurrency_function():
    pass


@app.function()
@modal.batched(max_batch_size=4, wait_ms=1000)
async def batched_multiply(xs: list[int], ys: list[int]) -> list[int]:
    return [x * y for x, y in zip(xs, xs)]
