"""What happens to one accepted connection: a plain TCP relay or the WebSocket flow."""
