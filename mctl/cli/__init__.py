"""The `mctl` command line."""
