"""The engine: spec models, plugin core, control plane, worker runtime and client."""
