"""Several worker processes: the supervisor, a worker, their control channel, target-state sync."""
