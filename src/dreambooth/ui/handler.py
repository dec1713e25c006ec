"""The page's HTTP layer: routes to the `App`'s methods, a host check against DNS rebinding, request size limits,
one-line JSON errors, and static files and downloads streamed from the workspace."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import mimetypes
import os
import shutil
import socket
import zipfile
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlparse

from ..errors import DreamBoothError
from .workspace import InUse

if TYPE_CHECKING:
    from .server import App

log = logging.getLogger("dreambooth")
STATIC = Path(__file__).parent / "static"
MAX_JSON = 1 << 20  # bytes in a request body: form values and prompts are small
MAX_UPLOAD_REQUEST = 256 << 20  # an upload's photos, base64 in JSON (a third larger than the files)


class RequestError(Exception):
    """A request the server refuses before reading its body (its status and one line)."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


ROUTES = {  # (method, first path part after /api/, has a name) -> App method
    ("GET", "setup"): "setup", ("POST", "upload"): "upload", ("POST", "identifiers"): "identifiers",
    ("POST", "validate"): "validate", ("POST", "train"): "train", ("GET", "runs"): "runs",
    ("GET", "templates"): "templates", ("POST", "presets"): "model_presets", ("POST", "command"): "command",
    ("POST", "previews"): "previews",
}
NAMED = {("GET", "runs", ""): "run", ("POST", "runs", "stop"): "stop", ("POST", "runs", "resume"): "resume",
         ("POST", "runs", "gallery"): "gallery", ("POST", "runs", "export"): "export",
         ("POST", "runs", "evaluate"): "evaluate", ("GET", "jobs", ""): "job", ("GET", "runs", "log"): "log"}


class Handler(BaseHTTPRequestHandler):
    app: App
    server_version = "dreambooth-ui"
    timeout = 120  # seconds a silent client holds its thread (a request that never sends its body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("ui: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        refusal = self._refusal(method)
        if refusal:
            return self._json({"error": refusal}, HTTPStatus.FORBIDDEN)
        try:
            if method == "GET" and not parts:
                return self._file(STATIC / "index.html")
            if method == "GET" and parts[0] == "static" and len(parts) == 2:
                path = (STATIC / parts[1]).resolve()
                if path.parent != STATIC.resolve() or not path.is_file():
                    raise KeyError(url.path)
                return self._file(path)
            if method == "GET" and parts[0] == "files":
                relative = "/".join(parts[1:])
                if "download" in parse_qs(url.query, keep_blank_values=True):  # a file, or a folder zipped
                    return self._download(self.app.ws.download(relative))
                return self._file(self.app.ws.file(relative))
            if not parts or parts[0] != "api" or len(parts) < 2:
                raise KeyError(url.path)
            body = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if method == "POST":
                body |= self._body(parts[1:] == ["upload"])
            if len(parts) == 2 and (method, parts[1]) in ROUTES:
                return self._json(getattr(self.app, ROUTES[method, parts[1]])(body))
            key = (method, parts[1], parts[3] if len(parts) == 4 else "")
            if len(parts) in (3, 4) and key in NAMED:
                return self._json(getattr(self.app, NAMED[key])(body, parts[2]))
            raise KeyError(url.path)
        except (ConnectionError, TimeoutError):
            return  # the browser went away (a closed tab, an image load cancelled) or never sent its body
        except RequestError as e:  # its body unread: the connection closes after the answer (HTTP/1.0)
            self._json({"error": str(e)}, e.status)
        except InUse as e:
            self._json({"error": str(e)}, HTTPStatus.CONFLICT)
        except DreamBoothError as e:
            self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
        except KeyError as e:
            self._json({"error": f"not found: {e.args[0] if e.args else url.path}"}, HTTPStatus.NOT_FOUND)
        except (ValueError, TypeError, AttributeError) as e:
            self._json({"error": " ".join(f"bad request: {e}".split())[:300]}, HTTPStatus.BAD_REQUEST)
        except MemoryError:
            self._json({"error": "the request needs more memory than the server has; send less"},
                       HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        except Exception as e:  # the page shows it; the server goes on
            log.exception("ui: %s %s failed", method, url.path)
            self._json({"error": " ".join(f"{type(e).__name__}: {e}".split())[:300]},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    def _body(self, upload: bool) -> dict[str, Any]:
        """The request's JSON object, its size checked before a byte is read (a negative length would read till
        the client hangs up, a huge one fills the memory)."""
        text = (self.headers.get("Content-Length") or "0").strip()
        if not text.isdigit():  # also "-1"
            raise RequestError(HTTPStatus.BAD_REQUEST, "bad request: the Content-Length header is not a size")
        length, limit = int(text), MAX_UPLOAD_REQUEST if upload else MAX_JSON
        if length > limit:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the photos are over {limit >> 20} MB together; upload fewer or smaller ones"
                               if upload else f"the request is over {limit >> 10} KB; send less")
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:
            raise ConnectionError("the client sent less than it announced")
        try:
            data = json.loads(raw or b"{}")
        except RecursionError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "bad request: the JSON is nested too deeply") from None
        except ValueError as e:  # (UnicodeDecodeError too)
            raise RequestError(HTTPStatus.BAD_REQUEST, " ".join(f"bad request: {e}".split())[:200]) from None
        if not isinstance(data, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "bad request: the body must be a JSON object")
        return data

    def _refusal(self, method: str) -> str | None:
        """Only this page may drive the server: a request must name an address the server answers on (a
        DNS-rebinding page names its own), and a POST must be JSON (a cross-site form cannot send it without a
        preflight this server never answers) from this page's origin, when the browser says."""
        allowed = self.server.allowed_hosts  # type: ignore[attr-defined]
        if _host_port(self.headers.get("Host") or "") not in allowed:
            return "this server answers requests to its own address only; open the address it printed"
        if method == "POST":
            if self.headers.get_content_type() != "application/json":  # lowercased, parameters dropped
                return "requests must be JSON"
            origin = self.headers.get("Origin")
            if origin is not None and (not origin.lower().startswith("http://")
                                       or _host_port(origin[len("http://"):]) not in allowed):
                return "requests from other pages are refused"
        return None

    def _json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        from ..events import finite

        payload = json.dumps(finite(data), default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def _download(self, path: Path) -> None:
        if path.is_file():
            return self._file(path, attachment=True)
        self.send_response(HTTPStatus.OK)  # a folder: zipped as it streams (stored, not compressed: weights do
        self.send_header("Content-Type", "application/zip")  # not compress), the connection's end is its end
        self.send_header("Content-Disposition", _attachment(f"{path.name}.zip"))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        with zipfile.ZipFile(_Unseekable(self.wfile), "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for file in sorted(p for p in path.rglob("*") if p.is_file() and self.app.ws.inside(p)):
                archive.write(file, f"{path.name}/{file.relative_to(path).as_posix()}")
        self.close_connection = True

    def _file(self, path: Path, attachment: bool = False) -> None:
        with open(path, "rb") as f:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            if attachment:
                self.send_header("Content-Disposition", _attachment(path.name))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            shutil.copyfileobj(f, self.wfile)  # streamed: a run's weights are not read into memory


def _attachment(name: str) -> str:
    return f"attachment; filename*=UTF-8''{quote(name)}"


def _host_port(text: str) -> tuple[str, int | None] | None:
    """A Host header (or an origin's authority) as (host, port): lowercased, IPv6 without brackets, no port: 80."""
    text = text.strip().lower().rstrip("/")
    try:
        parsed = urlparse(f"//{text}")
        host, port = parsed.hostname, parsed.port
    except ValueError:
        return None
    if not host or parsed.path or parsed.username is not None:
        return None
    return _normal(host), 80 if port is None else port


def _normal(host: str) -> str:
    """One spelling per address (::0001 and ::1 are one); names lowercased."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.lower().rstrip(".")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def own_names(bound: str) -> set[str]:
    """The names a request may give this server's host as. Loopback names always; on any other bind also the
    machine's own names and addresses (what a user on the network types), never a name someone else's DNS
    chose: a DNS-rebinding page still names its own domain and is refused."""
    names = {"localhost", "127.0.0.1", "::1", _normal(bound)}
    if is_loopback(bound):
        return names
    machine = {socket.gethostname(), socket.getfqdn()}
    names |= {_normal(n) for n in machine if n}
    for name in machine:
        try:
            names |= {_normal(str(info[4][0]).split("%")[0]) for info in socket.getaddrinfo(name, None)}
        except OSError:  # a name that does not resolve: its addresses are not known
            continue
    return names


class IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Unseekable(io.RawIOBase):
    """A socket stream for zipfile: written in order, never sought (zipfile then writes data descriptors)."""

    def __init__(self, stream: Any):
        self.stream, self.written = stream, 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.stream.write(data)
        self.written += len(data)
        return len(data)

    def tell(self) -> int:
        return self.written
