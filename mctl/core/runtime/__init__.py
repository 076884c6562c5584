"""The worker runtime: the loop inside every container, subprocess or Nomad allocation."""
