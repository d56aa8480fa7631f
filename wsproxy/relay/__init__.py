"""Moving bytes between a client and a target: the byte pump, the WebSocket adapter, the ticker."""
