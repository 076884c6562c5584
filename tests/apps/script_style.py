"""A Modal script run with `python script.py` (tests/test_modal_examples.py): app.run() in
`__main__`, generators, `.aio`, is_local, FunctionCall.from_id on an embedded server."""

import asyncio
import mctl as modal

app = modal.App("script-style")


@app.function()
def gen(n):
    for i in range(n):
        yield i


@app.function()
async def double(x):
    return 2 * x


@app.function()
def where():
    return modal.is_local()


async def amain():
    print("aio:", await double.remote.aio(4))
    print("map.aio:", [x async for x in double.map.aio([1, 2])])


if __name__ == "__main__":
    with modal.enable_output():
        with app.run():
            print("gen:", list(gen.remote_gen(3)))
            print("is_local here/there:", modal.is_local(), where.remote())
            asyncio.run(amain())
            fc = double.spawn(5)
            print("from_id:", modal.FunctionCall.from_id(fc.object_id).get())
