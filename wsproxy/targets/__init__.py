"""Target groups and their targets: balancing, health (state machine, probes, checker)."""
