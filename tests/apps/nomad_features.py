"""Every feature the Nomad renderer maps, in one app (rendered, never run, by test_nomad_*.py)."""

import mctl

app = mctl.App("nomad-features")
registry = mctl.Image.from_registry("python:3.12-slim")
built = mctl.Image.debian_slim().pip_install("numpy")
data = mctl.Volume.from_name("training-data", create_if_missing=True)
models = mctl.Volume.from_name("models", create_if_missing=True)
keys = mctl.Secret.from_name("api-keys")


@app.function()
def plain(x):
    return x


@app.function(image=registry, cpu=2.5, memory=4096, min_containers=2, max_containers=8,
              scaledown_window=120, retries=mctl.Retries(max_retries=3, initial_delay=2.0),
              timeout=900, secrets=[keys], volumes={"/data": data, "/models": models.read_only()},
              env={"MODE": "fast"})
def everything(x):
    return x


@app.function(image=built, gpu="A100-80GB:2")
def train(x):
    return x


@app.function(gpu="any")
def any_gpu(x):
    return x


@app.function(schedule=mctl.Cron("30 9 * * 1-5", timezone="America/New_York"))
def weekday_report():
    pass


@app.function(schedule=mctl.Cron("0 0 1 * *", timezone="Asia/Kathmandu"))
def monthly():
    pass


@app.function(schedule=mctl.Period(minutes=15))
def every_quarter_hour():
    pass


@app.function(schedule=mctl.Period(seconds=10))
def every_ten_seconds():
    pass


@app.function(schedule=mctl.Period(days=7))
def weekly():
    pass


@app.function(secrets=[mctl.Secret.from_dict({"TOKEN": "inline-value-never-rendered"})])
def with_inline_secret():
    pass


@app.cls(gpu="H100", min_containers=1)
class Model:
    @mctl.method()
    def predict(self, x):
        return x


@app.function()
def Ünïcode_näme(x):  # noqa: N802 - an odd name on purpose
    return x


@app.function()
def a_very_long_function_name_that_goes_on_and_on_and_on_and_on_and_on_and_on_and_on_and_on(x):
    return x
