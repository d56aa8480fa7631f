"""The WebSocket API mode (the API Gateway half): routes, integration calls, connection ids,
the connection registry and groups, and the management routes (issue 14, in progress)."""
