"""An AsyncAPI 3.0 document of one WebSocket API of a config (``wsproxy asyncapi``).

The document describes the API from the client's side, as AsyncAPI 3.0 describes an
application's own operations: the client *sends* one message per route key (its payload says
that the field named by ``route_selection_expression`` holds the key), and *receives* the route
responses of ``respond = true`` routes, the error message the proxy sends when it cannot serve
a message, and whatever backends push through the @connections API. The servers are the
listeners with ``api = NAME``; there is one channel, the connection at ``/``. Pure: it reads
nothing but the config, so a test can validate its output with the official AsyncAPI tooling.
"""

from __future__ import annotations

import re
from typing import Any

from wsproxy import __version__
from wsproxy.config import ApiConfig, Config, ListenerConfig, RouteConfig
from wsproxy.errors import ApiError
from wsproxy.wire.route_selection import (
    CONNECT_ROUTE,
    DEFAULT_ROUTE,
    DISCONNECT_ROUTE,
    parse_expression,
)

ASYNCAPI_VERSION = "3.0.0"
CHANNEL = "connection"
# AsyncAPI 3.0's WebSockets bindings (github.com/asyncapi/bindings, websockets/README.md).
WS_BINDING_VERSION = "0.1.0"
# Component keys must match this (AsyncAPI 3.0 §Components Object); route keys are free text.
_COMPONENT_KEY = re.compile(r"[^A-Za-z0-9_.-]")
ERROR_MESSAGE_FIELDS = ("message", "error", "connectionId", "requestId")


class _Ids:
    """Component keys for route keys: the key with every other character as ``_`` (``$`` of
    ``$default`` dropped), made unique by a ``-N`` suffix, so two route keys never share one."""

    def __init__(self, *taken: str) -> None:
        self._taken = set(taken)

    def __call__(self, wanted: str) -> str:
        base = _COMPONENT_KEY.sub("_", wanted.removeprefix("$")) or "route"
        key, n = base, 1
        while key in self._taken:
            n += 1
            key = f"{base}-{n}"
        self._taken.add(key)
        return key


def _selected_field(fields: tuple[str, ...], key: str) -> dict[str, Any]:
    """A JSON Schema: an object whose field at ``fields`` (nested objects) is the string
    ``key``."""
    schema: dict[str, Any] = {"type": "string", "const": key}
    for field in reversed(fields):
        schema = {"type": "object", "required": [field], "properties": {field: schema}}
    return schema


def _server(name: str, listener: ListenerConfig) -> dict[str, Any]:
    secure = listener.protocol == "tls"
    where = str(listener.address)
    server: dict[str, Any] = {
        "host": where,
        "protocol": "wss" if secure else "ws",
        "protocolVersion": "13",  # RFC 6455's Sec-WebSocket-Version
        "pathname": "/",
        "title": f"listener {name}",
        "description": (
            f"Listener '{name}' ({listener.protocol}) bound to {where}; a 0.0.0.0 or [::] address "
            "is reached by this machine's own name or address. Any path is accepted."
        ),
    }
    if listener.tls is not None and listener.tls.client_auth != "none":
        server["security"] = [{"$ref": f"#/components/securitySchemes/{listener.tls.client_auth}"}]
    return server


def _client_certificate_schemes(listeners: dict[str, ListenerConfig]) -> dict[str, Any]:
    schemes: dict[str, Any] = {}
    for listener in listeners.values():
        if listener.tls is None or listener.tls.client_auth == "none":
            continue
        mode = listener.tls.client_auth
        schemes[mode] = {
            "type": "X509",
            "description": (
                "A client certificate from the listener's client_ca (clientAuth extended key "
                "usage, not expired, not on the CRL), shown in the TLS handshake; "
                + (
                    "without one the handshake fails."
                    if mode == "required"
                    else "optional: one that fails a check is refused, none is accepted."
                )
            ),
        }
    return schemes


def _route_message(route: RouteConfig, fields: tuple[str, ...], selector: str) -> dict[str, Any]:
    integration = f"POST {route.path} on a target of target group '{route.target_group}'"
    if route.key == DEFAULT_ROUTE:
        return {
            "name": route.key,
            "title": "$default route",
            "summary": "Any message no other route takes.",
            "description": (
                "A text or binary message that is not a JSON object, lacks the field "
                f"{selector} or holds no route key there goes to $default: {integration}."
            ),
            # Any JSON value, or not JSON at all: the schema does not constrain it.
            "payload": {},
        }
    return {
        "name": route.key,
        "title": f"route {route.key}",
        "summary": f"A JSON object whose {selector} is {route.key!r}.",
        "description": (
            f"Sent as a text or binary message. The proxy calls the integration: {integration} "
            "(a CloudEvents binary-mode request, ce-type wsproxy.message), with the message "
            "as its body."
        ),
        "contentType": "application/json",
        "payload": _selected_field(fields, route.key),
    }


def _response_message(route: RouteConfig) -> dict[str, Any]:
    return {
        "name": f"{route.key} response",
        "title": f"route response of {route.key}",
        "summary": f"The integration's 2xx answer to a {route.key} message.",
        "description": (
            f"respond = true: the body of a 2xx answer of POST {route.path} (target group "
            f"'{route.target_group}') comes back as one message, text for text/* and "
            "application/json bodies, binary otherwise; its content is the integration's."
        ),
        "payload": {},
    }


def _error_message() -> dict[str, Any]:
    reasons = "; ".join(f"{error.value}: {error.doc}" for error in ApiError)
    return {
        "name": "error",
        "title": "error",
        "summary": "The proxy could not serve one message; the connection stays open.",
        "description": f"Sent by the proxy itself as a text message. error is one of: {reasons}.",
        "contentType": "application/json",
        "payload": {
            "type": "object",
            "required": list(ERROR_MESSAGE_FIELDS),
            "properties": {
                "message": {"type": "string", "description": "what went wrong, for people"},
                "error": {"type": "string", "enum": [error.value for error in ApiError]},
                "connectionId": {"type": "string", "description": "this connection's id"},
                "requestId": {
                    "type": "string",
                    "description": "the integration call's id (its ce-id), for the logs",
                },
            },
        },
    }


def _push_message() -> dict[str, Any]:
    return {
        "name": "push",
        "title": "backend push",
        "summary": "A message a backend sent to this connection through the @connections API.",
        "description": (
            "A backend's POST /@connections/{connectionId} (or POST /@groups/{group}, POST "
            "/@users/{user} to every member) arrives as one message: text when the request's "
            "Content-Type is text/* or application/json, binary otherwise. Its content is the "
            "backend's."
        ),
        "payload": {},
    }


def _channel_description(api: str, config: ApiConfig, selector: str) -> str:
    connect = config.route(CONNECT_ROUTE)
    disconnect = config.route(DISCONNECT_ROUTE)
    lines = [
        f"One WebSocket connection to API '{api}'. Each message the client sends is routed by "
        f"{selector}; the proxy answers 'error' messages, route responses and backend pushes on "
        "the same connection.",
        (
            f"$connect: the upgrade is accepted only if POST {connect.path} on target group "
            f"'{connect.target_group}' answers 2xx; otherwise the client gets its status."
            if connect is not None
            else "$connect: no route, every upgrade is accepted."
        ),
    ]
    if disconnect is not None:
        lines.append(
            f"$disconnect: POST {disconnect.path} on target group '{disconnect.target_group}' "
            "is called after the connection ends."
        )
    lines.append(
        f"Limits: frames up to {config.max_frame_bytes} bytes, messages up to "
        f"{config.max_message_bytes} bytes (over either: Close 1009); idle for "
        f"{config.idle_timeout_seconds:g} s, or open for {config.max_session_seconds:g} s "
        "(0: no limit): Close 1001."
    )
    return "\n\n".join(lines)


def document(config: Config, api: str) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of API ``api`` of ``config``; ``KeyError`` if there is none."""
    spec = config.apis[api]
    fields = parse_expression(spec.route_selection_expression)
    selector = spec.route_selection_expression
    listeners = {name: li for name, li in config.listeners.items() if li.api == api}
    ids = _Ids("error", "push")
    messages: dict[str, Any] = {"error": _error_message(), "push": _push_message()}
    operations: dict[str, Any] = {}

    def ref(key: str) -> dict[str, str]:
        return {"$ref": f"#/channels/{CHANNEL}/messages/{key}"}

    channel_ref = {"$ref": f"#/channels/{CHANNEL}"}
    for route in spec.routes:
        if route.key in (CONNECT_ROUTE, DISCONNECT_ROUTE):
            continue  # not messages: described on the channel
        key = ids(route.key)
        messages[key] = _route_message(route, fields, selector)
        send: dict[str, Any] = {
            "action": "send",
            "channel": channel_ref,
            "title": f"send {route.key}",
            "summary": messages[key]["summary"],
            "messages": [ref(key)],
        }
        operations[f"send.{key}"] = send
        if route.respond:
            response = ids(f"{key}.response")
            messages[response] = _response_message(route)
            send["reply"] = {"channel": channel_ref, "messages": [ref(response)]}
            operations[f"receive.{response}"] = {
                "action": "receive",
                "channel": channel_ref,
                "title": f"receive the response of {route.key}",
                "messages": [ref(response)],
            }
    operations["receive.error"] = {
        "action": "receive",
        "channel": channel_ref,
        "title": "receive errors",
        "messages": [ref("error")],
    }
    operations["receive.push"] = {
        "action": "receive",
        "channel": channel_ref,
        "title": "receive backend pushes",
        "messages": [ref("push")],
    }

    doc: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"WebSocket API {api}",
            "version": __version__,
            "description": (
                f"API '{api}' of a wsproxy config, from the client's side: what a client sends "
                "(one message per route), and what it receives (route responses, the proxy's "
                "error messages, backend pushes). Backends push at any time: an HTTP POST to "
                "/@connections/{connectionId} on the proxy's admin listener (or the API's "
                "management listener) arrives at that client as one message, and "
                "/@groups/{group} and /@users/{user} reach every member. Generated by wsproxy "
                f"{__version__} (`wsproxy asyncapi`)."
            ),
        },
        "defaultContentType": "application/json",
    }
    if listeners:
        doc["servers"] = {name: _server(name, li) for name, li in listeners.items()}
    doc["channels"] = {
        CHANNEL: {
            "address": "/",
            "title": "the connection",
            "description": _channel_description(api, spec, selector),
            "messages": {key: {"$ref": f"#/components/messages/{key}"} for key in messages},
            "bindings": {"ws": {"method": "GET", "bindingVersion": WS_BINDING_VERSION}},
        }
    }
    doc["operations"] = operations
    components: dict[str, Any] = {"messages": messages}
    schemes = _client_certificate_schemes(listeners)
    if schemes:
        components["securitySchemes"] = schemes
    doc["components"] = components
    return doc
