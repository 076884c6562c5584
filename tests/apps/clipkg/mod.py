"""An app imported as a module: `mctl run -m clipkg.mod`."""
import mctl

app = mctl.App("clipkg")


@app.function()
def where():
    return "ran in a worker"


@app.local_entrypoint()
def main():
    print("module result:", where.remote())
