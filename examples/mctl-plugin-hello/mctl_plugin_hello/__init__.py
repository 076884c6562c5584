"""An example mctl plugin: a secret backend that knows one secret, and `mctl hello`."""

import click

import mctl
from mctl.core.plugin_types import SecretBackend


@mctl.hookimpl
def mctl_register_secret_backends():
    yield SecretBackend(name="hello",
                        resolve=lambda name: {"GREETING": "hi"} if name == "hello" else None)


@mctl.hookimpl
def mctl_register_commands(cli):
    @cli.command()
    def hello():
        """Say hello from a plugin."""
        click.echo("hello from mctl-plugin-hello")
