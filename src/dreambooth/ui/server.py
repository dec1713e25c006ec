"""`dreambooth ui`: a local web page over the workspace (see workspace.py) — one page, a small JSON API, no
framework. The standard library's threaded HTTP server is enough for one user on 127.0.0.1; every slow thing (a
run, a gallery, an evaluation, an export) is a process of its own, so a request never waits on training."""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import json
import logging
import mimetypes
import os
import re
import shutil
import socket
import threading
import webbrowser
import zipfile
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse

from .. import schema
from ..bundled import BUNDLED, bundled_at
from ..config import TrainConfig
from ..errors import DreamBoothError
from ..evaluation.backends import BACKENDS
from ..schema import between, option
from . import form
from .workspace import InUse, Workspace, lock_holder, slug

log = logging.getLogger("dreambooth")
STATIC = Path(__file__).parent / "static"
MAX_JSON = 1 << 20  # bytes in a request body: form values and prompts are small
MAX_UPLOAD_REQUEST = 256 << 20  # an upload's photos, base64 in JSON (a third larger than the files)
PATH_FIELDS = ("pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "output_dir",
               "pretrained_vae_model_name_or_path", "tokenizer_name", "eval_config")


@dataclasses.dataclass
class UIConfig:
    host: str = option("127.0.0.1", "Address to serve on; anything but a loopback address shares the page (and the "
                                    "machine's files it can reach) with the network")
    port: int = option(7860, "Port (0: any free one)", check=between(0, 65535))
    workspace: Path = option(Path("dreambooth-workspace"), "Folder for uploads, runs and their results")
    open_browser: bool = option(False, "Open the page in the default browser")


def bundled_models() -> list[dict[str, Any]]:
    """The page's model list: the models that come with the package and its plug-ins, each with the evaluation
    backend that fits it and the subjects that backend knows."""
    return [{"label": m.label, "path": str(m.path), "family": m.family, "evaluation": m.evaluation or "dreambench",
             "subjects": [{"name": n, "cls": c} for n, c in m.subjects]} for m in BUNDLED.values()]


def presets(model: str) -> dict[str, Any]:
    """What the page pre-fills for a model, by method: its measured recipe (the model folder's own file), with the
    step count it was measured at, and the method it recommends."""
    from ..recipes import read_recipe, recommended_method

    found: dict[str, Any] = dict(read_recipe(model))
    method = recommended_method(model)
    return {**found, "method": method} if method else found


class App:
    """The API behind the page; each method takes the request's JSON and returns JSON (DreamBoothError: a 400 with
    its one line; KeyError: a 404)."""

    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self.text_models: dict[str, Any] = {}
        self.text_lock = threading.Lock()

    # GET /api/setup
    def setup(self, _: dict) -> dict[str, Any]:
        models = bundled_models()
        return {"workspace": str(self.ws.root), "models": models,
                "presets": {m["path"]: presets(m["path"]) for m in models},
                "fields": [dataclasses.asdict(f) for f in form.form_fields()]}

    # POST /api/presets {model}: the recipe a typed model folder carries
    def model_presets(self, body: dict) -> dict[str, Any]:
        return {"presets": presets(str(body.get("model") or "").strip())}

    # POST /api/command {values}: the command line that runs these settings
    def command(self, body: dict) -> dict[str, Any]:
        values = form.values_from_form(TrainConfig, self._values(body))
        return {"command": form.command_line(values)}

    # POST /api/upload {files: [{name, data}], resolution}
    def upload(self, body: dict) -> dict[str, Any]:
        return self.ws.upload(body.get("files") or [], _whole(body.get("resolution") or 512, "the resolution"))

    # POST /api/identifiers {model, class_noun, top}
    def identifiers(self, body: dict) -> dict[str, Any]:
        from .. import identifier as ident
        from ..families import ModelSource, get_family

        model, noun = str(body.get("model") or "").strip(), str(body.get("class_noun") or "").strip()
        if not model or not noun:
            raise DreamBoothError("type the class noun (and pick a base model) to get identifier suggestions")
        with self.text_lock:  # one model's text encoder at a time, kept for the next request
            if model not in self.text_models:
                source = ModelSource(model)
                self.text_models = {model: get_family(source).load_text(source)}
            tokenizer, text_encoder = self.text_models[model]
            text_encoder.eval()
            ranked = ident.rank(tokenizer, text_encoder, noun, top=int(body.get("top") or 8))
            warning = ident.unknown_word(tokenizer, noun)
        return {"suggestions": [{"token": c.token, **{k: v for k, v in dataclasses.asdict(c).items()
                                                      if isinstance(v, int | float | str)}} for c in ranked],
                "warning": warning}

    # POST /api/validate {values}
    def validate(self, body: dict) -> dict[str, Any]:
        _, problems = form.validate(self._values(body))
        return {"problems": problems}

    # POST /api/train {values}
    def train(self, body: dict) -> dict[str, Any]:
        values = self._values(body)
        hint = str(values.get("class_prompt") or values.get("instance_prompt") or "run")
        folder = self.ws.new_run_folder(hint)
        if not str(values.get("output_dir") or "").strip():
            values["output_dir"] = str(folder)
        if _truthy(values.get("with_prior_preservation")) and not str(values.get("class_data_dir") or "").strip():
            model = Path(str(values.get("pretrained_model_name_or_path") or "model")).name
            values["class_data_dir"] = str(self.ws.root / "class-images" / slug(f"{model}-{hint}", 80))
        for name in PATH_FIELDS:  # a local path typed relative means the same in the run's process (hub ids stay)
            text = str(values.get(name) or "").strip()
            if text and (Path(text).expanduser().exists() or name in ("output_dir", "class_data_dir")):
                values[name] = str(Path(text).expanduser().resolve())
        cfg, problems = form.validate(values)
        if problems:
            return {"problems": problems}
        config = schema.to_dict(cfg)
        problems = self.ws.path_problems(config)  # what a run reads and writes stays in the workspace
        if problems:
            return {"problems": problems}
        out = Path(config["output_dir"])
        self.ws.start("train", config, out, run=out.name)
        return {"run": out.name}

    # GET /api/runs
    def runs(self, _: dict) -> dict[str, Any]:
        return {"runs": self.ws.runs()}

    # GET /api/runs/<name>?offset=N
    def run(self, body: dict, name: str) -> dict[str, Any]:
        return self.ws.run_view(name, int(body.get("offset") or 0))

    # POST /api/runs/<name>/stop
    def stop(self, _: dict, name: str) -> dict[str, Any]:
        folder = self.ws.run_folder(name)
        job = self.ws.running_job_of(name)
        if job is None:
            holder = lock_holder(folder)
            if holder:
                raise InUse(f"run {name} is training in a process this page did not start (pid {holder}); stop "
                            "it where it was started")
            raise DreamBoothError(f"run {name} is not training")
        if not self.ws.stop(job):
            return {"stopping": name, "message": f"run {name} is already stopping (it saves a checkpoint first)"}
        return {"stopping": name}

    # POST /api/runs/<name>/resume
    def resume(self, _: dict, name: str) -> dict[str, Any]:
        self.ws.run_folder(name)
        if self.ws.running_job_of(name):
            raise InUse(f"run {name} is already training")
        config = self.ws.run_view(name)["config"]
        if not config:
            raise DreamBoothError(f"run {name} has no train_config.json to resume from; start a new run")
        config = {**config, "resume_from_checkpoint": "latest"}
        folder = self.ws.checked_run(name, config)  # a copied-in run's settings may name any folder
        with self.ws.lock:  # two Resume clicks start one process
            holder = lock_holder(folder)
            if holder or self.ws.running_job_of(name):
                raise InUse(f"run {name} is in use by another process (pid {holder}); wait for it to end, then "
                            "resume" if holder else f"run {name} is already training")
            self.ws.start("train", config, folder, run=name)
        return {"run": name}

    # POST /api/runs/<name>/gallery {prompts, num_images, seed}
    def gallery(self, body: dict, name: str) -> dict[str, Any]:
        folder = self.ws.checked_run(name)
        prompts = [p.strip() for p in body.get("prompts") or [] if str(p).strip()]
        if not prompts:
            raise DreamBoothError("type at least one prompt for the gallery")
        config = {"model": str(folder), "prompt": prompts, "num_images": int(body.get("num_images") or 4),
                  "seed": int(body.get("seed") or 0), **self._sampling(folder)}
        out = self.ws.new_output("galleries", name)
        config["output_dir"] = str(out)
        return self.ws.job_view(self.ws.start("generate", config, out, run=name))

    # POST /api/runs/<name>/export {format}
    def export(self, body: dict, name: str) -> dict[str, Any]:
        fmt = str(body.get("format") or "")
        folder = self.ws.checked_run(name)
        out = self.ws.new_output("exports", f"{name}-{fmt}", "" if fmt == "merged" else ".safetensors")
        return self.ws.job_view(self.ws.start("export", {"model": str(folder), "format": fmt, "output": str(out)},
                                              out, run=name))

    # POST /api/runs/<name>/evaluate {backend, subject, images_per_prompt, class_images}
    def evaluate(self, body: dict, name: str) -> dict[str, Any]:
        folder = self.ws.checked_run(name)
        cfg = self.ws.run_view(name)["config"] or {}
        base = str(cfg.get("pretrained_model_name_or_path") or "")
        bundled = bundled_at(base)
        backend = str(body.get("backend") or (bundled and bundled.evaluation) or "dreambench")
        if backend not in BACKENDS:
            raise DreamBoothError(f"there is no evaluation backend {backend!r}; pick one of the list")
        which = str(body.get("which") or "tuned")
        if which not in ("tuned", "base"):
            raise DreamBoothError("evaluate the fine-tuned model or its base model")
        real = str(cfg.get("instance_data_dir") or "")
        reads_real = BACKENDS[backend].reads_real_images
        if reads_real and real and not self.ws.inside(Path(real)):  # a path from the run's own files
            raise DreamBoothError(f"run {name}'s photos folder {real} is outside the workspace; the page does not "
                                  "read it")
        out = self.ws.new_output("evaluations", f"{name}-{which}")
        model = str(folder) if which == "tuned" else base
        config: dict[str, Any] = {"model": model, "output_dir": str(out), "backend": backend}
        if not cfg.get("identifier") or which == "base":  # the base model has no training config to read it from
            from ..identifier import infer_identifier

            prompt = str(cfg.get("instance_prompt") or "")
            token = cfg.get("identifier") or infer_identifier(prompt, cfg.get("class_prompt"))
            config["identifier"] = token
            words = prompt.split()
            if which == "base" and token in words and words.index(token) + 1 < len(words):
                config["class_noun"] = " ".join(words[words.index(token) + 1:])  # "a [V] dog" -> dog
        if reads_real:
            config["real_images"] = real or None
        else:  # a backend that knows its subjects (the toy judges)
            config["subject"] = str(body.get("subject") or "")
        for key in ("images_per_prompt", "class_images"):  # empty: the backend's own counts
            if str(body.get(key) or "").strip():
                config[key] = int(body[key])
        return self.ws.job_view(self.ws.start("evaluate", config, out, run=name))

    # GET /api/jobs/<id>
    def job(self, _: dict, job_id: str) -> dict[str, Any]:
        job = self.ws.job(job_id)
        view = self.ws.job_view(job)
        if view["command"] == "evaluate" and view["status"] == "done":
            view["report"] = json.loads((Path(view["output"]) / "report.json").read_text())
        if view["command"] == "generate" and view["status"] == "done":  # each image with the prompt it shows
            prompts = job.config.get("prompt") or []
            view["images"] = [{"url": url, "prompt": prompts[int(url.rsplit("/", 1)[1][:2])]}
                              for url in view["files"] if re.match(r"\d\d-", url.rsplit("/", 1)[1])
                              and int(url.rsplit("/", 1)[1][:2]) < len(prompts)]
        return view

    # GET /api/runs/<name>/log?offset=N: the console output of the run's training process
    def log(self, body: dict, name: str) -> dict[str, Any]:
        self.ws.run_folder(name)
        return self.ws.run_log(name, int(body.get("offset") or 0))

    # GET /api/templates?class_noun=&identifier=&live=
    def templates(self, body: dict) -> dict[str, Any]:
        from ..evaluation.protocol import prompt_cases

        noun, token = str(body.get("class_noun") or "subject"), str(body.get("identifier") or "sks")
        cases = prompt_cases(str(body.get("live") or "").lower() in ("1", "true", "yes"))
        return {"prompts": [{"text": c.text(token, noun), "category": c.category} for c in cases]}

    def _values(self, body: dict) -> dict[str, Any]:
        values = body.get("values")
        if not isinstance(values, dict):
            raise DreamBoothError("the request holds no form values; reload the page")
        known = schema.fields(TrainConfig)
        return {k: v for k, v in values.items() if k in known}

    def _sampling(self, folder: Path) -> dict[str, Any]:
        """A bundled model's run samples the way that model does (e.g. a toy model: its sampler, steps, guidance)."""
        cfg = self.ws.run_view(folder.name)["config"] or {}
        bundled = bundled_at(str(cfg.get("pretrained_model_name_or_path") or ""))
        return dict(bundled.sampling) if bundled is not None else {}


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


def _whole(value: Any, what: str) -> int:
    """A whole number from a request, or a one-line refusal naming it."""
    try:
        return int(str(value).strip())
    except ValueError:
        raise DreamBoothError(f"{what} must be a whole number") from None


class RequestError(Exception):
    """A request the server refuses before reading its body (its status and one line)."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


ROUTES = {  # (method, first path part after /api/, has a name) -> App method
    ("GET", "setup"): "setup", ("POST", "upload"): "upload", ("POST", "identifiers"): "identifiers",
    ("POST", "validate"): "validate", ("POST", "train"): "train", ("GET", "runs"): "runs",
    ("GET", "templates"): "templates", ("POST", "presets"): "model_presets", ("POST", "command"): "command",
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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def own_names(bound: str) -> set[str]:
    """The names a request may give this server's host as. Loopback names always; on any other bind also the
    machine's own names and addresses (what a user on the network types), never a name someone else's DNS
    chose: a DNS-rebinding page still names its own domain and is refused."""
    names = {"localhost", "127.0.0.1", "::1", _normal(bound)}
    if _is_loopback(bound):
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


def make_server(cfg: UIConfig) -> ThreadingHTTPServer:
    app = App(Workspace(Path(cfg.workspace)))
    handler = type("BoundHandler", (Handler,), {"app": app})
    ipv6 = ":" in cfg.host  # an IPv6 literal ("::1", "::"): the IPv4 socket cannot bind it
    server = (IPv6Server if ipv6 else ThreadingHTTPServer)((cfg.host.strip("[]"), cfg.port), handler)
    server.daemon_threads = True
    port = server.server_address[1]
    server.allowed_hosts = {(name, port) for name in own_names(str(server.server_address[0]))}  # type: ignore
    return server


def serve(config: UIConfig | dict | None = None, **overrides: Any) -> None:
    cfg = config if isinstance(config, UIConfig) and not overrides else schema.build(
        UIConfig, {**schema.values_of(config, UIConfig), **overrides})
    loopback = _is_loopback(cfg.host)
    server = make_server(cfg)
    host, port = server.server_address[:2]
    url = f"http://{host if ':' not in str(host) else f'[{host}]'}:{port}/"
    if not loopback:
        log.warning("serving on %s: anyone who can reach this address can start runs and read the workspace", host)
    print(f"dreambooth ui: serving {url} (workspace {Path(cfg.workspace).resolve()}); Ctrl-C stops the page, "
          "not its runs", flush=True)
    if cfg.open_browser:
        threading.Thread(target=partial(webbrowser.open, url), daemon=True).start()
    try:
        server.serve_forever()
    finally:
        server.server_close()


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
