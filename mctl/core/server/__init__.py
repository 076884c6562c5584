"""The control plane: input queues, outputs, blobs, apps and versions, schedules, logs, metrics."""
