"""An app whose functions run in container images, for the Nomad image tests."""

import mctl

app = mctl.App("nomad-images")

private = mctl.Image.from_registry("registry.example.internal:5000/team/tools:1",
                                   secret=mctl.Secret.from_name("regcred"))
built = mctl.Image.debian_slim().apt_install("jq")


@app.function(image=private, schedule=mctl.Cron("0 3 * * *"))
def from_private():
    pass


@app.function(image=built)
def from_builder():
    pass


@app.function()
def plain():
    pass
