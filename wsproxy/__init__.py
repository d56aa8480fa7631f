"""wsproxy: a WebSocket-aware TCP load balancer (listeners, rules, target groups)."""

__version__ = "0.1.0"
