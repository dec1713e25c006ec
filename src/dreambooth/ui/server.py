"""`dreambooth ui`: a local web page over the workspace (see workspace.py) — one page, a small JSON API, no
framework. The standard library's threaded HTTP server is enough for one user on 127.0.0.1; every slow thing (a
run, a gallery, an evaluation, an export) is a process of its own, so a request never waits on training."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import mimetypes
import os
import shutil
import threading
import webbrowser
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from .. import schema
from ..config import TrainConfig
from ..errors import DreamBoothError
from ..schema import between, option
from . import form
from .workspace import Workspace, slug, stop

log = logging.getLogger("dreambooth")
STATIC = Path(__file__).parent / "static"
PATH_FIELDS = ("pretrained_model_name_or_path", "instance_data_dir", "class_data_dir", "output_dir",
               "pretrained_vae_model_name_or_path", "tokenizer_name", "eval_config")


@dataclasses.dataclass
class UIConfig:
    host: str = option("127.0.0.1", "Address to serve on; anything but a loopback address shares the page (and the "
                                    "machine's files it can reach) with the network")
    port: int = option(7860, "Port (0: any free one)", check=between(0, 65535))
    workspace: Path = option(Path("dreambooth-workspace"), "Folder for uploads, runs and their results")
    open_browser: bool = option(False, "Open the page in the default browser")


def bundled_models() -> list[dict[str, str]]:
    from ..toy.demo import BUNDLED_MODELS

    return [{"label": f"toy model ({'DDPM, UNet' if family == 'sd' else 'rectified flow, SD3'})",
             "path": str(path), "family": family} for family, path in BUNDLED_MODELS.items()]


class App:
    """The API behind the page; each method takes the request's JSON and returns JSON (DreamBoothError: a 400 with
    its one line; KeyError: a 404)."""

    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self.text_models: dict[str, Any] = {}
        self.text_lock = threading.Lock()

    # GET /api/setup
    def setup(self, _: dict) -> dict[str, Any]:
        from ..toy.measure import toy_train_settings
        from ..toy.subjects import SUBJECTS

        models = bundled_models()
        return {"workspace": str(self.ws.root), "models": models,
                "toy_subjects": [{"name": n, "cls": s.cls} for n, s in SUBJECTS.items()],
                "presets": {m["path"]: {"full": toy_train_settings(m["family"]),
                                        "lora": toy_train_settings(m["family"], lora=True)} for m in models},
                "fields": [dataclasses.asdict(f) for f in form.form_fields()]}

    # POST /api/upload {files: [{name, data}], resolution}
    def upload(self, body: dict) -> dict[str, Any]:
        resolution = int(body.get("resolution") or 512)
        return self.ws.upload(body.get("files") or [], resolution)

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
        out = Path(config["output_dir"])
        if out.resolve().parent != self.ws.root / "runs":
            return {"problems": {"output_dir": "the page shows runs of its workspace only; leave it empty for a "
                                               "new folder under runs/"}}
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
        job = self.ws.running_job_of(name)
        if job is None:
            raise DreamBoothError(f"run {name} is not training")
        stop(job)
        return {"stopping": name}

    # POST /api/runs/<name>/resume
    def resume(self, _: dict, name: str) -> dict[str, Any]:
        folder = self.ws.run_folder(name)
        if self.ws.running_job_of(name):
            raise DreamBoothError(f"run {name} is already training")
        config = self.ws.run_view(name)["config"]
        if not config:
            raise DreamBoothError(f"run {name} has no train_config.json to resume from; start a new run")
        self.ws.start("train", {**config, "resume_from_checkpoint": "latest"}, folder, run=name)
        return {"run": name}

    # POST /api/runs/<name>/gallery {prompts, num_images, seed}
    def gallery(self, body: dict, name: str) -> dict[str, Any]:
        folder = self.ws.run_folder(name)
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
        folder = self.ws.run_folder(name)
        out = self.ws.new_output("exports", f"{name}-{fmt}", "" if fmt == "merged" else ".safetensors")
        return self.ws.job_view(self.ws.start("export", {"model": str(folder), "format": fmt, "output": str(out)},
                                              out, run=name))

    # POST /api/runs/<name>/evaluate {backend, subject, images_per_prompt, class_images}
    def evaluate(self, body: dict, name: str) -> dict[str, Any]:
        folder = self.ws.run_folder(name)
        cfg = self.ws.run_view(name)["config"] or {}
        out = self.ws.new_output("evaluations", name)
        config: dict[str, Any] = {"model": str(folder), "output_dir": str(out),
                                  "backend": str(body.get("backend") or "dreambench")}
        if not cfg.get("identifier"):  # typed into the prompt only: the word the prompts share
            from ..identifier import infer_identifier

            config["identifier"] = infer_identifier(cfg.get("instance_prompt") or "", cfg.get("class_prompt"))
        if config["backend"] == "toy":
            config["subject"] = str(body.get("subject") or "")
        else:
            config["real_images"] = cfg.get("instance_data_dir")
        for key in ("images_per_prompt", "class_images"):  # empty: the backend's own counts
            if str(body.get(key) or "").strip():
                config[key] = int(body[key])
        return self.ws.job_view(self.ws.start("evaluate", config, out, run=name))

    # GET /api/jobs/<id>
    def job(self, _: dict, job_id: str) -> dict[str, Any]:
        view = self.ws.job_view(self.ws.job(job_id))
        if view["command"] == "evaluate" and view["status"] == "done":
            view["report"] = json.loads((Path(view["output"]) / "report.json").read_text())
        return view

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
        """A toy model's run samples the way the toy model does (its sampler, steps, guidance)."""
        from ..toy.demo import BUNDLED_MODELS
        from ..toy.measure import toy_sampling

        cfg = self.ws.run_view(folder.name)["config"] or {}
        base = str(cfg.get("pretrained_model_name_or_path") or "")
        for family, path in BUNDLED_MODELS.items():
            if Path(base).resolve() == path.resolve():
                sampler, steps, guidance = toy_sampling(family)
                return {"sampler": sampler, "num_inference_steps": steps, "guidance_scale": guidance}
        return {}


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


ROUTES = {  # (method, first path part after /api/, has a name) -> App method
    ("GET", "setup"): "setup", ("POST", "upload"): "upload", ("POST", "identifiers"): "identifiers",
    ("POST", "validate"): "validate", ("POST", "train"): "train", ("GET", "runs"): "runs",
    ("GET", "templates"): "templates",
}
NAMED = {("GET", "runs", ""): "run", ("POST", "runs", "stop"): "stop", ("POST", "runs", "resume"): "resume",
         ("POST", "runs", "gallery"): "gallery", ("POST", "runs", "export"): "export",
         ("POST", "runs", "evaluate"): "evaluate", ("GET", "jobs", ""): "job"}


class Handler(BaseHTTPRequestHandler):
    app: App
    server_version = "dreambooth-ui"

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
                return self._file(self.app.ws.file("/".join(parts[1:])))
            if not parts or parts[0] != "api" or len(parts) < 2:
                raise KeyError(url.path)
            body = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if method == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                body |= json.loads(self.rfile.read(length) or b"{}")
            if len(parts) == 2 and (method, parts[1]) in ROUTES:
                return self._json(getattr(self.app, ROUTES[method, parts[1]])(body))
            key = (method, parts[1], parts[3] if len(parts) == 4 else "")
            if len(parts) in (3, 4) and key in NAMED:
                return self._json(getattr(self.app, NAMED[key])(body, parts[2]))
            raise KeyError(url.path)
        except ConnectionError:
            return  # the browser went away (a closed tab, an image load cancelled)
        except DreamBoothError as e:
            self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)
        except KeyError as e:
            self._json({"error": f"not found: {e.args[0] if e.args else url.path}"}, HTTPStatus.NOT_FOUND)
        except (ValueError, TypeError, AttributeError) as e:
            self._json({"error": f"bad request: {e}"}, HTTPStatus.BAD_REQUEST)
        except Exception as e:  # the page shows it; the server goes on
            log.exception("ui: %s %s failed", method, url.path)
            self._json({"error": f"{type(e).__name__}: {e}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _refusal(self, method: str) -> str | None:
        """Only this page may drive the server: a request must name the address it was served on (a DNS-rebinding
        page names its own), and a POST must be JSON (a cross-site form cannot send it without a preflight this
        server never answers) from this page's origin, when the browser says."""
        host, port = self.server.server_address[:2]
        allowed = {f"{h}:{port}" for h in (host, "localhost", "127.0.0.1", "[::1]")}
        if self.headers.get("Host") not in allowed:
            return "this server answers requests to its own address only; open the address it printed"
        if method == "POST":
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                return "requests must be JSON"
            origin = self.headers.get("Origin")
            if origin is not None and origin.removeprefix("http://") not in allowed:
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

    def _file(self, path: Path) -> None:
        with open(path, "rb") as f:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            shutil.copyfileobj(f, self.wfile)  # streamed: a run's weights are not read into memory


def make_server(cfg: UIConfig) -> ThreadingHTTPServer:
    app = App(Workspace(Path(cfg.workspace)))
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((cfg.host, cfg.port), handler)
    server.daemon_threads = True
    return server


def serve(config: UIConfig | dict | None = None, **overrides: Any) -> None:
    cfg = config if isinstance(config, UIConfig) and not overrides else schema.build(
        UIConfig, {**schema.values_of(config, UIConfig), **overrides})
    try:
        loopback = ipaddress.ip_address(cfg.host).is_loopback
    except ValueError:
        loopback = cfg.host == "localhost"
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
