"""What operators see and touch: metrics, logs, termination codes, admin API, status page."""
