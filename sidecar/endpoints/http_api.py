"""HTTP for load balancers and monitoring: /primary, /standby, /health, /metrics.

Hand-written on ``asyncio.start_server`` on purpose. The sidecar already runs one event loop, and
none of its dependencies brings an asyncio HTTP server (aiohttp or uvicorn would add a framework
and several packages for four GET routes). What is needed is small: read a request line and
headers (bounded in size and in time), answer with a short body and close the connection. There
is no keep-alive, no request body and no chunked encoding, so none of HTTP's harder parsing is
reached: a request with a body is answered and the body is never read.

The routes only ask the node and the metrics registry; they never touch etcd. ``/primary`` and
``/standby`` answer in the style of an HAProxy ``option httpchk``: 200 or 503 with a one-line
body naming the role, the node and the epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..core.node import Node
from ..core.roles import Role, Status

log = structlog.get_logger(__name__)

# A health check sends a few hundred bytes; this is ample and bounds what a client can make us
# buffer (asyncio's StreamReader limit also caps any single line at this size).
MAX_HEADER_BYTES = 8192
MAX_HEADER_LINES = 64
# Time allowed for a whole request to arrive, and for a response to be taken: a client that
# connects and stays silent holds a socket for this long at most.
READ_TIMEOUT = 5.0
WRITE_TIMEOUT = 5.0
# More concurrent connections than this are closed at once: checks are tiny and answered at
# once, so reaching it means something is misbehaving, and sockets are cheaper kept.
MAX_CONNECTIONS = 128
ALLOWED_METHODS = ("GET", "HEAD")
TEXT = "text/plain; charset=utf-8"


class BadRequest(Exception):
    """The request cannot be parsed; ``status`` says how to answer."""

    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status.value} {self.status.phrase}",
                 f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}",
                 "Cache-Control: no-store",
                 "Connection: close",
                 *(f"{name}: {value}" for name, value in self.headers)]
        header = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return header if head else header + self.body


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) into a host and a port; raises ValueError."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{listen!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read a request line and its headers; return the method and the path (query dropped).

    The header values are not needed by any route, so they are only checked for shape.
    """
    request_line = await _read_line(reader)
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper():
        raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"unsupported version {version[:16]!r}")
    if not target.startswith(("/", "http://", "https://")):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed request target")
    size = len(request_line)
    for _ in range(MAX_HEADER_LINES):
        line = await _read_line(reader)
        if not line:
            return method, urlsplit(target).path
        size += len(line)
        if size > MAX_HEADER_BYTES:
            break
        name, colon, _ = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(HTTPStatus.BAD_REQUEST, "malformed header line")
    raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers too large")


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "line too long") from None
    except asyncio.IncompleteReadError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "connection closed mid-request") from None
    try:
        # Header bytes are ISO-8859-1 by definition; anything outside printable ASCII in a
        # request line is rejected by the checks above.
        return raw.decode("latin-1").rstrip("\r\n")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise BadRequest(HTTPStatus.BAD_REQUEST, "undecodable line") from None


class HttpServer:
    """The HTTP endpoints of one sidecar, served on the running event loop."""

    def __init__(self, node: Node, registry: CollectorRegistry, listen: str, *,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self.node = node
        self.registry = registry
        self.listen = listen
        self.read_timeout = read_timeout
        self._host, self._port = parse_listen(listen)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose when listening on port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the HTTP server is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        self._server = await asyncio.start_server(self._on_connection, self._host, self._port,
                                                  limit=MAX_HEADER_BYTES)
        log.info("http_listening", address=f"{self.listen}", port=self.port)

    async def stop(self) -> None:
        """Stop listening and end every open connection (each is answered within timeouts)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or self._server is None or len(self._connections) >= MAX_CONNECTIONS:
            writer.close()  # stopping, or too many at once: refuse rather than queue
            return
        self._connections.add(task)
        try:
            await self._serve_one(reader, writer)
        except Exception:  # one client must never take the server down
            log.exception("http_connection_failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        head = False
        try:
            async with asyncio.timeout(self.read_timeout):
                method, path = await read_request(reader)
            head = method == "HEAD"
            response = self.respond(method, path)
        except TimeoutError:
            response = Response(HTTPStatus.REQUEST_TIMEOUT, b"request timeout\n")
        except BadRequest as exc:
            log.debug("http_bad_request", reason=str(exc), peer=writer.get_extra_info("peername"))
            response = Response(exc.status, f"{exc}\n".encode())
        writer.write(response.encode(head=head))
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()

    def respond(self, method: str, path: str) -> Response:
        """The answer to one parsed request."""
        if method not in ALLOWED_METHODS:
            return Response(HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n",
                            headers=(("Allow", ", ".join(ALLOWED_METHODS)),))
        if path == "/primary":
            return self._role_check(Role.PRIMARY)
        if path == "/standby":
            return self._role_check(Role.STANDBY)
        if path == "/health":
            return self._health()
        if path == "/metrics":
            # On the loop thread on purpose: the collector reads node.status() (see metrics.py).
            return Response(HTTPStatus.OK, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        return Response(HTTPStatus.NOT_FOUND, b"not found\n")

    def _role_check(self, wanted: Role) -> Response:
        status = self.node.status()
        ok = status.role is wanted
        return Response(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, _describe(status))

    def _health(self) -> Response:
        try:
            status = self.node.status()
        except Exception:  # a status that cannot be read is the unhealthy answer, not a crash
            log.exception("http_health_status_failed")
            return Response(HTTPStatus.SERVICE_UNAVAILABLE, b"status unreadable\n")
        # An etcd alarm is shown, not judged: it stops writes on every node at once, and a
        # supervisor that restarted a primary for it would take away the lease that etcd,
        # refusing grants while full, gives to no one else (docs/DESIGN.md, etcd alarms).
        ok = status.role is not Role.STOPPING
        body = _describe(status) + _thinlinc_lines(self.node) + _alarm_line(self.node)
        if status.pause is not None:  # loud, but no failure: the node itself is fine
            body += f"pause: {status.pause.describe()}\n".encode()
        return Response(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)


def _describe(status: Status) -> bytes:
    return f"{status.role.name} node={status.node_id} epoch={status.epoch}\n".encode()


def _alarm_line(node: Node) -> bytes:
    alarms = node.etcd_alarms()
    if not alarms:
        return b""
    return (f"etcd_alarms: {' '.join(alarms)} (etcd refuses writes; see docs/OPERATIONS.md, "
            "Caring for etcd)\n").encode()


def _thinlinc_lines(node: Node) -> bytes:
    """The sessions file's copy and the VSM server, one line each, when configured."""
    lines = []
    if node.file_report is not None:
        lines.append(f"sessions_file: {node.file_report().line()}\n")
    if node.server_report is not None:
        lines.append(f"vsm_server: {node.server_report().line()}\n")
    return "".join(lines).encode()
