import mctl

app = mctl.App("resources")


@app.function(memory=10**9)  # about a petabyte: no machine here offers that
def huge():
    return "placed"


@app.function()
def small():
    return "ok"
