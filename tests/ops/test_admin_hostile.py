"""Hostile input to the admin API: every answer is a specific 4xx, never a 500 (or a hang).

A real ``wsproxy run`` with a bearer token, spoken to over raw sockets, so bytes no HTTP client
would send (0xff in a header, broken percent-encoding) reach it as sent.
"""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.process import WSPROXY
from wsproxy.address import parse_address

AUTH = (b"Authorization", b"Bearer s3cret-token")
REGISTER = b"/v1/target-groups/chat/targets"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> str:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        message = json.loads(self.body)["error"]
        assert isinstance(message, str)
        return message


@dataclass
class AdminProcess:
    process: subprocess.Popen[bytes]
    port: int
    stderr: list[str]

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: tuple[tuple[bytes, bytes], ...] = (AUTH,),
        body: bytes | None = None,
    ) -> Answer:
        """One request on a fresh connection, bytes as given; raises on no answer in 10 s."""
        head = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" % (method, target)
        for name, value in headers:
            head += name + b": " + value + b"\r\n"
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        received = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as connection:
            connection.sendall(head + b"\r\n" + (body or b""))
            while chunk := connection.recv(1 << 16):
                received += chunk
        top, _, content = received.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        assert re.fullmatch(r"HTTP/1\.[01] \d{3} .*", lines[0]), received[:300]
        fields: dict[str, str] = {}
        for line in lines[1:]:
            key, _, text = line.partition(":")
            fields[key.strip().lower()] = text.strip()
        return Answer(int(lines[0].split()[1]), fields, content)


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProcess]:
    root = tmp_path_factory.mktemp("admin")
    (root / "token").write_bytes(AUTH[1].split()[1] + b"\n")
    config = root / "proxy.toml"
    config.write_text(
        f"""
[admin]
address = "127.0.0.1:0"
token_file = "{root / "token"}"
[listeners.edge]
address = "127.0.0.1:0"
default_target_group = "chat"
[target_groups.chat]
targets = [{{ address = "127.0.0.1:9" }}]
"""
    )
    process = subprocess.Popen(
        [*WSPROXY, "--log-format", "json", "run", "-c", str(config)], stderr=subprocess.PIPE
    )
    lines: list[str] = []
    arrived: queue.Queue[str] = queue.Queue()

    def read_stderr() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            lines.append(raw.decode(errors="replace"))
            arrived.put(lines[-1])

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        found = None
        while found is None:
            found = re.search(
                r"admin listening on http://127\.0\.0\.1:(\d+)", arrived.get(timeout=15)
            )
        yield AdminProcess(process, int(found.group(1)), lines)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()  # a loop stuck on one request cannot handle SIGTERM
            process.wait()
        reader.join(timeout=5)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# method, request target, extra headers (None: the right token only), body, status, words
ROWS: list[tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...] | None, bytes | None, int, str]] = [
    # Issue 13 item 13: a byte that is not UTF-8 in Authorization was a 500.
    (b"GET", b"/v1/target-groups", ((b"Authorization", b"Bearer \xff"),), None, 401, "bearer"),
    (b"GET", b"/v1/target-groups", ((b"Authorization", b"\xff\xfe\x80"),), None, 401, "bearer"),
    (b"POST", b"/v1/reload", ((b"Authorization", b"Bearer " + b"\xc3" * 100),), None, 401, ""),
    # ...and a deeply nested JSON body (RecursionError) was a 500.
    (b"POST", REGISTER, None, b"[" * 100_000, 400, "nests too deeply"),
    (b"POST", REGISTER, None, nested(50_000), 400, "nests too deeply"),
    (b"POST", REGISTER, None, b'{"address": ' + nested(900) + b"}", 422, "got an array"),
    (b"POST", REGISTER, None, b'{"address": "a:1", "weight": ' + nested(900) + b"}", 422, "got an"),
    # Bodies that are not JSON, or not the JSON asked for: specific, and no value echoed.
    (b"POST", REGISTER, None, b"", 400, "the body is empty"),
    (b"POST", REGISTER, None, b'{"address": "\xff:80"}', 400, "not UTF-8"),
    (b"POST", REGISTER, None, b'{"address": ', 400, "not JSON (Expecting value at line 1"),
    (b"POST", REGISTER, None, b'{"weight": ' + b"9" * 5000 + b"}", 400, "not usable JSON"),
    (b"POST", REGISTER, None, b"null", 422, "expected a JSON object, got null"),
    (b"POST", REGISTER, None, b'"127.0.0.1:80"', 422, "got a string"),
    (b"POST", REGISTER, None, b"[1, 2]", 422, "got an array"),
    (b"POST", REGISTER, None, b'{"weight": 2}', 422, "address: must be a string"),
    (b"POST", REGISTER, None, b'{"address": null}', 422, "got null"),
    (b"POST", REGISTER, None, b'{"address": 8080}', 422, "got a number"),
    (b"POST", REGISTER, None, b'{"address": "a:1", "weight": true}', 422, "got true"),
    (b"POST", REGISTER, None, b'{"address": "a:1", "weight": 1e999}', 422, "got a number"),
    (b"POST", REGISTER, None, b'{"address": "a:1", "weight": 1' + b"0" * 30 + b"}", 422, "larger"),
    (b"POST", REGISTER, None, b'{"' + b"k" * 10_000 + b'": 1}', 422, "unknown key"),
    (b"POST", REGISTER, None, b'{"address": "\\ud800:80"}', 422, "neither an IP address"),
    (b"POST", REGISTER, None, b'{"address": "a\\u0000b:80"}', 422, "neither an IP address"),
    # A host name that made the host-name pattern backtrack for minutes (the loop frozen).
    (b"POST", REGISTER, None, b'{"address": "' + b"a" * 40 + b'!:80"}', 422, "nor a host name"),
    (b"DELETE", REGISTER + b"/" + b"a" * 40 + b"!:80", None, None, 422, "nor a host name"),
    (b"POST", REGISTER, None, b'{"address": "' + b"a" * 100 + b':80"}', 422, "nor a host name"),
    # Whatever charset Content-Type names, JSON is read as UTF-8 (an unknown one was a 500).
    (
        b"POST",
        REGISTER,
        ((b"Content-Type", b"application/json; charset=bogus"),),
        b'{"address": "a"}',
        422,
        "expected 'host:port'",
    ),
    # Paths and query strings nobody could mean.
    (b"DELETE", REGISTER + b"/%ff", None, None, 422, "expected 'host:port'"),
    (b"DELETE", REGISTER + b"/%00:80", None, None, 422, "neither an IP address"),
    (b"DELETE", REGISTER + b"/[::1", None, None, 422, "[ipv6]:port"),
    (b"GET", b"/v1/target-groups/%ff%fe", None, None, 404, "no target group"),
    (b"GET", b"/v1/listeners/%ff/crl", None, None, 404, "no listener"),
    (b"GET", b"/v1/target-groups?%ff=%zz&&=;%", None, None, 200, ""),
]


@pytest.mark.parametrize(
    ("method", "target", "headers", "body", "status", "words"),
    ROWS,
    ids=[f"{i}-{row[0].decode()}-{row[4]}" for i, row in enumerate(ROWS)],
)
def test_hostile_requests_get_a_specific_4xx(
    admin: AdminProcess,
    method: bytes,
    target: bytes,
    headers: tuple[tuple[bytes, bytes], ...] | None,
    body: bytes | None,
    status: int,
    words: str,
) -> None:
    if headers is None:
        headers = (AUTH,)
    elif headers[0][0] != b"Authorization":
        headers = (AUTH, *headers)
    answer = admin.request(method, target, headers, body)
    assert answer.status == status, answer
    if status >= 400:
        message = answer.error()
        assert words in message, message
        assert len(message) < 600, message  # the input is never echoed whole


def test_the_status_page_with_a_broken_token_is_the_locked_page(admin: AdminProcess) -> None:
    """/status is open, and checks the token only to decide whether to show data."""
    answer = admin.request(b"GET", b"/status", ((b"Authorization", b"Bearer \xff"),))
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/html")
    assert b"127.0.0.1:9" not in answer.body  # the locked page: no targets without the token


ROUTES = [
    (b"GET", b"/"),
    (b"GET", b"/healthz"),
    (b"GET", b"/readyz"),
    (b"GET", b"/metrics"),
    (b"GET", b"/status"),
    (b"GET", b"/v1/listeners"),
    (b"GET", b"/v1/crl"),
    (b"GET", b"/v1/crl.pem"),
    (b"GET", b"/v1/listeners/{}/crl"),
    (b"GET", b"/v1/listeners/{}/crl.pem"),
    (b"GET", b"/v1/workers"),
    (b"GET", b"/v1/target-groups"),
    (b"GET", b"/v1/target-groups/{}"),
    (b"POST", b"/v1/target-groups/{}/targets"),
    (b"DELETE", b"/v1/target-groups/{}/targets/{}"),
    (b"POST", b"/v1/reload"),
]
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]

# Characters allowed raw in a request target (RFC 3986 pchar and query), "%" included so that
# broken percent-encodings are drawn too.
TARGET_CHARS = st.sampled_from(
    [bytes([c]) for c in b"abcz09-._~!$&'()*+,;=:@/?%"] + [b"%00", b"%2f", b"%80", b"%ff"]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["address", "weight", "x"]) | st.text(max_size=5), children
        )
    ),
    max_leaves=12,
)


@st.composite
def hostile_requests(
    draw: st.DrawFn,
) -> tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...], bytes | None]:
    method, template = draw(st.sampled_from(ROUTES))
    if draw(st.booleans()):
        method = draw(st.sampled_from(METHODS))
    text = st.lists(TARGET_CHARS, max_size=12).map(b"".join)
    segment = st.one_of(
        st.sampled_from([b"chat", b"edge", b"127.0.0.1:9", b"127.0.0.1:1", b"[::1]:9"]),
        text.map(lambda s: s.replace(b"/", b"%2F").replace(b"?", b"%3F") or b"x"),
    )
    path = template
    while b"{}" in path:
        path = path.replace(b"{}", draw(segment), 1)
    if draw(st.booleans()):
        path += b"?" + draw(text)
    headers: list[tuple[bytes, bytes]] = []
    credential = draw(st.sampled_from(["right", "none", "bytes"]))
    if credential == "right":
        headers.append(AUTH)
    elif credential == "bytes":
        value = draw(st.binary(max_size=40)).translate(None, b"\r\n\x00")
        headers.append((b"Authorization", b"Bearer " + value))
    if draw(st.booleans()):
        charset = draw(st.sampled_from([b"utf-8", b"latin-1", b"bogus", b"\xff", b""]))
        headers.append((b"Content-Type", b"application/json; charset=" + charset))
    body = draw(
        st.one_of(
            st.none(),
            st.binary(max_size=200),
            json_values.map(lambda v: json.dumps(v).encode()),
            st.integers(1, 3000).map(lambda n: b"[" * n),
            st.fixed_dictionaries(
                {"address": json_values | st.text(max_size=60), "weight": json_values}
            ).map(lambda v: json.dumps(v).encode()),
        )
    )
    return method, path, tuple(headers), body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=hostile_requests())
def test_no_admin_request_gets_a_5xx(
    admin: AdminProcess,
    request: tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...], bytes | None],
) -> None:
    method, target, headers, body = request
    answer = admin.request(method, target, headers, body)
    assert answer.status < 500, (request, answer)
    json_error = answer.headers.get("content-type", "").startswith("application/json")
    if answer.status >= 400 and json_error and method != b"HEAD":
        answer.error()  # the middleware's errors are JSON with a message


def test_the_admin_logged_no_traceback(admin: AdminProcess) -> None:
    """After all of the above (run in this module first), the admin answers and never failed."""
    assert admin.request(b"GET", b"/healthz").status == 200
    assert admin.request(b"GET", b"/healthz", ((b"X-Control", b"\x01"),)).status == 400
    deadline = time.monotonic() + 10
    while not any("not valid HTTP" in line for line in admin.stderr):
        assert time.monotonic() < deadline, admin.stderr[-3:]
        time.sleep(0.05)
    failures = [line for line in admin.stderr if "admin" in line and "failed" in line]
    assert failures == [], failures[:3]
    # Requests aiohttp cannot parse (hypothesis sends control bytes in headers) are the
    # client's fault: one line each at info, no traceback, none of the client's bytes.
    entries = [json.loads(line) for line in admin.stderr if line.startswith("{")]
    assert not [e for e in entries if e["level"] == "error" or "exception" in e], entries[:3]
    refused = [e["message"] for e in entries if "not valid HTTP" in e["message"]]
    assert all(re.fullmatch(r"admin: answered 400 to 127\.0\.0\.1: .*", m) for m in refused)


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("a" * 40 + "!:80", False),  # was minutes of backtracking (the dot between labels optional)
        ("a-" * 100 + "!:80", False),
        (("a" * 60 + ".") * 4 + "!:80", False),
        ("a" * 63 + ":80", True),
        ("a" * 64 + ":80", False),  # RFC 1035 §2.3.4: a label is at most 63 octets
        (".".join(["a" * 63] * 3) + "." + "a" * 61 + ":80", True),  # 253 characters
        (".".join(["a" * 63] * 3) + "." + "a" * 62 + ":80", False),  # 254
        ("chat.internal.:80", True),
        ("a..b:80", False),
    ],
)
def test_host_names_are_checked_without_backtracking(text: str, valid: bool) -> None:
    if valid:
        assert parse_address(text).port == 80
    else:
        with pytest.raises(ValueError, match="nor a host name"):
            parse_address(text)
