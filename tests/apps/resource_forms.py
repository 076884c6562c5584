import mctl

app = mctl.App("resource-forms")


@app.function(gpu=["H100", "A100-80GB:2"], cpu=(1, 4), memory=(1024, 2048))
def modal_forms():
    return "ok"
