"""`dreambooth ui`: a local web page over the workspace (see workspace.py) — one page, a small JSON API (this
module's `App`; handler.py routes requests to it), no framework. The standard library's threaded HTTP server is enough
for one user on 127.0.0.1; every slow thing (a run, a gallery, an evaluation, an export) is a process of its own, so a
request never waits on training."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import webbrowser
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .. import schema
from ..bundled import BUNDLED, bundled_at
from ..config import TrainConfig
from ..errors import ConfigError, DreamBoothError
from ..evaluation.backends import BACKENDS
from ..schema import between, option
from . import form
from .handler import Handler, IPv6Server, is_loopback, own_names
from .workspace import SUBJECT_PATHS, Buckets, InUse, Workspace, lock_holder, slug

log = logging.getLogger("dreambooth")
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
                "fields": [dataclasses.asdict(f) for f in form.form_fields()],
                "subject_fields": [dataclasses.asdict(f) for f in form.subject_fields()]}

    # POST /api/presets {model}: the recipe a typed model folder carries
    def model_presets(self, body: dict) -> dict[str, Any]:
        return {"presets": presets(str(body.get("model") or "").strip())}

    # POST /api/command {values}: the command line that runs these settings
    def command(self, body: dict) -> dict[str, Any]:
        values = form.values_from_form(TrainConfig, self._values(body))
        return {"command": form.command_line(values)}

    # POST /api/upload {files: [{name, data}], resolution, model, use_aspect_ratio_buckets, aspect_ratio_buckets}
    def upload(self, body: dict) -> dict[str, Any]:
        buckets, warning = _buckets(body)
        found = self.ws.upload(body.get("files") or [], _whole(body.get("resolution") or 512, "the resolution"),
                               buckets)
        return {**found, "warnings": [*found["warnings"], *warning]}

    # POST /api/previews {folder, resolution, model, use_aspect_ratio_buckets, aspect_ratio_buckets}: an upload's
    # previews again, for the page's new resolution or buckets
    def previews(self, body: dict) -> dict[str, Any]:
        buckets, warning = _buckets(body)
        found = self.ws.previews(str(body.get("folder") or ""), _whole(body.get("resolution") or 512,
                                                                       "the resolution"), buckets)
        return {**found, "warnings": [*found["warnings"], *warning]}

    # POST /api/identifiers {model, class_noun, top, taken}: `taken`, the identifiers other subjects of the run
    # have: no suggestion shares a token piece with them
    def identifiers(self, body: dict) -> dict[str, Any]:
        from .. import identifier as ident
        from ..families import ModelSource, get_family

        model, noun = str(body.get("model") or "").strip(), str(body.get("class_noun") or "").strip()
        given = body.get("taken") or []
        taken = [str(w).strip() for w in given if str(w).strip()] if isinstance(given, list) else []
        if not model or not noun:
            raise DreamBoothError("type the class noun (and pick a base model) to get identifier suggestions")
        with self.text_lock:  # one model's text encoder at a time, kept for the next request
            if model not in self.text_models:
                source = ModelSource(model)
                self.text_models = {model: get_family(source).load_text(source)}
            tokenizer, text_encoder = self.text_models[model]
            text_encoder.eval()
            top = _whole(body.get("top") or 8, "the number of suggestions")
            ranked = ident.rank(tokenizer, text_encoder, noun, top=256 if taken else top)  # its whole pool
            ranked = [c for c in ranked if c.token not in taken and not any(
                ident.shared_pieces({"text_encoder": tokenizer}, [word, c.token]) for word in taken)][:top]
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
            values["class_data_dir"] = self._class_folder(values, hint)
        for name in set(PATH_FIELDS) & set(values):  # a local path typed relative: the same in the run's process
            values[name] = _resolved(name, values[name])
        if isinstance(values.get("subjects"), list):
            values["subjects"] = [self._subject(s, values) if isinstance(s, dict) else s for s in values["subjects"]]
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

    def _class_folder(self, values: dict[str, Any], class_prompt: str) -> str:
        """The workspace's class images folder for this model and class prompt (made by the run, kept for the next
        run of the same class)."""
        model = Path(str(values.get("pretrained_model_name_or_path") or "model")).name
        return str(self.ws.root / "class-images" / slug(f"{model}-{class_prompt}", 80))

    def _subject(self, subject: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """A further subject's boxes as the run reads them: its paths resolved as the first subject's are and, with
        prior preservation, a class of its own given the workspace's folder for it (the first subject's class is
        the first subject's folder)."""
        subject = {k: v for k, v in subject.items() if not (isinstance(v, str) and not v.strip())}
        own = str(subject.get("class_prompt") or "").strip()
        if (_truthy(values.get("with_prior_preservation")) and own and not subject.get("class_data_dir")
                and own != str(values.get("class_prompt") or "").strip()
                and str(values.get("prior_target") or "class_images") == "class_images"):
            subject["class_data_dir"] = self._class_folder(values, own)
        return {**subject, **{name: _resolved(name, subject.get(name)) for name in SUBJECT_PATHS if name in subject}}

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


def _resolved(name: str, value: Any) -> Any:
    """A local path typed relative, absolute: it means the same in the run's process (a hub id stays)."""
    text = str(value or "").strip()
    if text and (Path(text).expanduser().exists() or name in ("output_dir", "class_data_dir")):
        return str(Path(text).expanduser().resolve())
    return value


def _buckets(body: dict) -> tuple[Buckets | None, list[str]]:
    """The page's aspect-ratio bucket options as previews follow them (None: centre squares), and a warning where
    its bucket list is refused (the form says why beside the field when training starts)."""
    text = str(body.get("aspect_ratio_buckets") or "").strip()
    if not (_truthy(body.get("use_aspect_ratio_buckets")) or text):
        return None, []
    multiple = _resolution_multiple(str(body.get("model") or "").strip())
    if not text:
        return Buckets(multiple), []
    from ..data.buckets import parse

    try:
        return Buckets(multiple, parse(text, multiple)), []
    except ConfigError as e:
        return None, [f"previews show centre squares: {form.label_of(e.field)}: {form.page_problem(e.field, str(e))}"]


def _resolution_multiple(model: str) -> int:
    """The multiple a bucket's sides keep for this model (Flux, SD3: 16): its family's, read from a local folder's
    model_index.json (milliseconds); 8, most families', for a hub id (no network request for a preview) or a
    folder that is no pipeline."""
    from ..families import ModelSource, get_family

    if not model or not Path(model).expanduser().is_dir():
        return 8
    try:
        return get_family(ModelSource(str(Path(model).expanduser()))).resolution_multiple
    except DreamBoothError:
        return 8


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


def _whole(value: Any, what: str) -> int:
    """A whole number from a request, or a one-line refusal naming it."""
    try:
        return int(str(value).strip())
    except ValueError:
        raise DreamBoothError(f"{what} must be a whole number") from None


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
    loopback = is_loopback(cfg.host)
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
