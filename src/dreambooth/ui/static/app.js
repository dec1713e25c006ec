"use strict";
// The page: a form built from the training schema (GET /api/setup), photo upload and identifier suggestions, and a
// run view that tails the run's events.jsonl (GET /api/runs/<name>?offset=N) once a second.

const $ = (id) => document.getElementById(id);
const state = { setup: null, run: null, offset: 0, losses: [], timer: null, viewing: 0, preset: null, logOffset: 0,
                config: null, classStarted: null };

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: { "Content-Type": "application/json" },
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

// what an empty box means on the page, where the option's default alone would mislead
const PLACEHOLDERS = {
  output_dir: "empty: a new folder under the workspace's runs/",
  max_train_steps: "empty: one pass over the photos (set a number)",
  class_data_dir: "empty: the workspace's class-images/ folder for this model and class",
};

// ---- the form ------------------------------------------------------------------------------------------------
function fieldInput(f) {
  const id = `f-${f.name}`;
  if (f.kind === "bool") {
    const box = el("input", { type: "checkbox", id, name: f.name });
    box.checked = !!f.default;
    return box;
  }
  if (f.kind === "choice") {
    const sel = el("select", { id, name: f.name });
    if (!f.required && f.default === null) sel.append(el("option", { value: "", text: "(default)" }));
    for (const c of f.choices) sel.append(el("option", { value: c, text: c }));
    if (f.default !== null) sel.value = String(f.default);
    return sel;
  }
  const input = el("input", { type: f.kind === "int" || f.kind === "float" ? "number" : "text", id, name: f.name,
                              step: f.kind === "float" ? "any" : null });
  input.placeholder = PLACEHOLDERS[f.name] || (f.default === null || f.default === undefined
    ? (f.required ? "required" : "") : Array.isArray(f.default) ? f.default.join(", ") : String(f.default));
  return input;
}

function buildForm(fields) {
  const basic = $("basic"), advanced = $("advanced-fields");
  let group = null;
  for (const f of fields) {
    if (f.kind === "subjects") continue;  // the "Other subjects" blocks of section 3
    const target = f.advanced ? advanced : basic;
    if (f.advanced && f.group !== group) {
      group = f.group;
      advanced.append(el("h4", { class: "group", "data-group": group, text: group }));
    }
    const input = fieldInput(f);
    input.addEventListener("input", () => { $(`e-${f.name}`).textContent = ""; });  // fixed: its error goes
    input.addEventListener("change", () => { $(`e-${f.name}`).textContent = ""; });
    const row = el("div", { class: "field", "data-group": f.group,
                            "data-search": `${f.label} ${f.name} ${f.help}`.toLowerCase() },
                   el("label", { for: `f-${f.name}`, text: f.label, title: f.name }),
                   el("div", {}, input, el("span", { class: "help", text: f.help }),
                      el("span", { class: "error", id: `e-${f.name}` })));
    if (f.name === "use_lora") row.classList.add("hidden");  // the LoRA / full fine-tune choice above sets it
    target.append(row);
  }
}

function searchAdvanced() {
  const words = $("advanced-search").value.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = new Set();
  for (const row of document.querySelectorAll("#advanced-fields .field")) {
    const hit = words.every((w) => row.dataset.search.includes(w));
    row.classList.toggle("hidden", !hit);
    if (hit) shown.add(row.dataset.group);
  }
  for (const h of document.querySelectorAll("#advanced-fields h4.group")) h.hidden = !shown.has(h.dataset.group);
}

function setField(name, value) {
  const input = $(`f-${name}`);
  if (!input) return;
  if (input.type === "checkbox") input.checked = !!value; else input.value = value === null ? "" : String(value);
}

function formValues() {
  setField("use_lora", mode() !== "full");
  const values = {};
  for (const input of document.querySelectorAll("#basic [name], #advanced-fields [name]")) {
    if (input.type === "checkbox") {
      const f = state.setup.fields.find((x) => x.name === input.name);
      if (input.checked !== !!f.default) values[input.name] = input.checked;
    } else if (input.value.trim() !== "") values[input.name] = input.value;
  }
  const subjects = subjectBlocks().map(subjectValues);  // every block, empty ones too: errors name its place
  if (subjects.length) values.subjects = subjects;
  return values;
}

// the method choice: LoRA, full fine-tune, or a LyCORIS adapter (LoRA's preset, its own `adapter`)
const METHODS = { lora: "LoRA", full: "full fine-tune", lokr: "LoKr", loha: "LoHa" };
function mode() { return document.querySelector("input[name=mode]:checked").value; }
function presetKey() { return mode() === "full" ? "full" : "lora"; }
function pickMode(value) {
  document.querySelector(`input[name=mode][value=${value}]`).checked = true;
  setField("adapter", value === "lokr" || value === "loha" ? value : "lora");
}

function showProblems(problems) {
  for (const node of document.querySelectorAll(".fields .error")) node.textContent = "";
  const unplaced = [];
  for (const [name, message] of Object.entries(problems || {})) {
    const node = $(`e-${name}`);
    if (node) node.textContent = message; else unplaced.push(message);  // a rule of several fields
    if (node && node.closest("#advanced")) $("advanced").open = true;
  }
  const first = Object.keys(problems || {}).find((name) => $(`f-${name}`));
  if (first) $(`f-${first}`).scrollIntoView({ block: "center" });
  return unplaced;
}

function currentModel() {
  return $("model-path").value.trim() || $("model-choice").value;
}

async function applyPresets(modelChanged = false) {
  const model = currentModel();
  for (const k of Object.keys(state.preset || {})) {  // the previous model's preset goes back to the defaults
    const f = state.setup.fields.find((x) => x.name === k);
    if (f) setField(k, f.kind === "bool" ? f.default : "");
  }
  setField("pretrained_model_name_or_path", model);
  setField("use_lora", mode() !== "full");
  let presets = state.setup.presets[model];
  if (presets === undefined && model) {  // a typed model folder may carry its own measured recipe
    presets = (await api("POST", "/api/presets", { model }).catch(() => ({ presets: {} }))).presets;
    state.setup.presets[model] = presets;
  }
  if (modelChanged && presets && presets.method) {  // the method measured to work best on this model
    pickMode(presets.method);
    setField("use_lora", mode() !== "full");
  }
  const key = presetKey();
  state.preset = (presets || {})[key] || {};
  for (const [k, v] of Object.entries(state.preset)) setField(k, v);
  const named = METHODS[key];
  const note = !Object.keys(state.preset).length ? ""
    : presets.method && presets.method !== key ? `pre-filled with this model's ${named} recipe (measured weaker `
      + `than its ${METHODS[presets.method]} one)`
      : `pre-filled with this model's measured ${named} recipe`;
  $("preset-note").textContent = note && key !== mode() ? `${note}, as ${METHODS[mode()]} takes it` : note;
  refreshPreviews();  // the recipe's resolution, the model's bucket sides
}

// ---- photos --------------------------------------------------------------------------------------------------
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({ name: file.name, data: String(reader.result).split(",", 2)[1] || "" });
    reader.onerror = () => reject(new Error(`${file.name}: cannot be read`));
    reader.readAsDataURL(file);
  });
}

// a subject's photo box: the first subject's (section 2) or a further subject's block
function firstPhotos() {
  return { files: $("photos"), error: $("photo-error"), warnings: $("photo-warnings"), previews: $("photo-previews"),
           folder: $("f-instance_data_dir") };
}

// what the previews follow: the resolution, and the aspect-ratio buckets (their sides: the model's multiple)
function previewOptions() {
  const use = $("f-use_aspect_ratio_buckets"), list = $("f-aspect_ratio_buckets");
  return { resolution: Number($("f-resolution").value || $("f-resolution").placeholder) || 512, model: currentModel(),
           use_aspect_ratio_buckets: !!(use && use.checked), aspect_ratio_buckets: list ? list.value.trim() : "" };
}

function showPhotos(box, res) {
  box.previews.dataset.folder = res.folder;
  box.warnings.replaceChildren(...res.warnings.map((w) => el("li", { text: w })));
  box.previews.replaceChildren(...res.photos.map((p) => el("figure", {},
    el("img", { src: p.preview, class: p.small ? "small" : null, alt: p.name }),
    el("figcaption", { text: `${p.name} ${p.size[0]}×${p.size[1]}`
                             + (p.bucket ? ` · bucket ${p.bucket[0]}×${p.bucket[1]}` : "") }))));
}

async function upload(chosen, box = firstPhotos()) {
  box.error.textContent = "";
  box.warnings.replaceChildren();
  box.previews.replaceChildren();
  delete box.previews.dataset.folder;
  try {
    const files = await Promise.all([...(chosen || box.files.files)].map(readFile));
    const res = await api("POST", "/api/upload", { files, ...previewOptions() });
    box.folder.value = res.folder;
    box.folder.dispatchEvent(new Event("change"));  // its error, if any, goes
    showPhotos(box, res);
  } catch (e) { box.error.textContent = e.message; }
}

async function refreshPreviews() {  // each upload still in its folder box, drawn again as training will see it
  for (const box of [firstPhotos(), ...subjectBlocks().map((b) => b.photos)]) {
    const folder = box.previews.dataset.folder;
    if (!folder || !box.folder || box.folder.value.trim() !== folder) continue;
    try {
      showPhotos(box, await api("POST", "/api/previews", { folder, ...previewOptions() }));
      box.error.textContent = "";
    } catch (e) { box.error.textContent = e.message; }
  }
}

function dropPhotos(drop, box) {  // photos dropped anywhere on the box
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files, box); };
  box.files.onchange = () => upload(undefined, box);
}

// ---- identifiers ---------------------------------------------------------------------------------------------
async function suggest() {
  $("suggest-error").textContent = "";
  $("suggestions").replaceChildren(el("span", { class: "muted", text: "ranking rare tokens…" }));
  try {
    const noun = $("class-noun").value.trim();
    const res = await api("POST", "/api/identifiers", { model: currentModel(), class_noun: noun,
                                                        taken: takenIdentifiers($("f-identifier")) });
    $("suggestions").replaceChildren();
    if (res.warning) $("suggest-error").textContent = res.warning;
    for (const s of res.suggestions) {
      const b = el("button", { type: "button", class: "suggestion",
                               title: s.shift === undefined ? "" : `prior shift ${Number(s.shift).toFixed(4)}`,
                               text: s.token });
      b.onclick = () => useIdentifier(s.token, noun);
      $("suggestions").append(b);
    }
  } catch (e) { $("suggestions").replaceChildren(); $("suggest-error").textContent = e.message; }
}

function useIdentifier(token, noun) {
  setField("identifier", token);
  setField("instance_prompt", `a ${token} ${noun}`);
  setField("class_prompt", `a ${noun}`);
  setField("with_prior_preservation", true);  // a class prompt is prior preservation's: the two go together
  setField("validation_prompt", `a ${token} ${noun}`);
  for (const name of ["identifier", "instance_prompt", "class_prompt", "with_prior_preservation"])
    $(`e-${name}`).textContent = "";
  for (const b of $("suggestions").querySelectorAll(".suggestion")) {
    b.classList.toggle("primary", b.textContent === token);
  }
}

function takenIdentifiers(except) {  // the identifiers the run's other subjects have: suggestions share no piece
  const boxes = [$("f-identifier"), ...subjectBlocks().map((b) => subjectInput(b, "identifier"))];
  return boxes.filter((box) => box && box !== except).map((box) => box.value.trim()).filter(Boolean);
}

// ---- further subjects ----------------------------------------------------------------------------------------
// each block: its photos, a class noun with suggestions, and its boxes (GET /api/setup's subject_fields); its
// boxes and error spans carry ids `f-subjects[i].name` / `e-subjects[i].name`, so problems land beside them
function subjectBlocks() { return [...document.querySelectorAll("#subjects .subject")]; }
function subjectInput(block, name) { return block.querySelector(`input[data-key="${name}"]`); }

function subjectValues(block) {
  const values = {};
  for (const input of block.querySelectorAll("input[data-key]")) {
    if (input.value.trim() !== "") values[input.dataset.key] = input.value.trim();
  }
  return values;
}

function numberSubjects() {
  subjectBlocks().forEach((block, i) => {
    block.querySelector("legend").textContent = `Subject ${i + 2}`;
    for (const input of block.querySelectorAll("input[data-key]")) {
      input.id = `f-subjects[${i}].${input.dataset.key}`;
      input.closest(".field").querySelector("label").htmlFor = input.id;
    }
    for (const span of block.querySelectorAll("span.error[data-key]")) {
      const id = `e-subjects[${i}].${span.dataset.key}`;
      if (span.id && span.id !== id) span.textContent = "";  // a problem named its old place
      span.id = id;
    }
  });
}

function addSubject(values = {}) {
  const block = el("fieldset", { class: "subject" }, el("legend"));
  const files = el("input", { type: "file", multiple: "", accept: "image/*" });
  const drop = el("div", { class: "drop" }, el("p", { class: "muted", text: "Drop 3–5 photos of this subject here, "
                                                                           + "or choose them." }), files);
  const noun = el("input", { placeholder: "cat, teapot, square" });
  const suggestButton = el("button", { type: "button", text: "Suggest identifiers" });
  const suggestError = el("div", { class: "error" }), chips = el("div", { class: "chips" });
  const fields = el("div", { class: "fields" });
  for (const f of state.setup.subject_fields) {
    const input = el("input", { type: f.kind === "int" ? "number" : "text", "data-key": f.name,
                                placeholder: f.required ? "required" : SUBJECT_PLACEHOLDERS[f.name] || "" });
    input.value = values[f.name] === null || values[f.name] === undefined ? "" : String(values[f.name]);
    const error = el("span", { class: "error", "data-key": f.name });
    input.addEventListener("input", () => { error.textContent = ""; });
    input.addEventListener("change", () => { error.textContent = ""; });
    fields.append(el("div", { class: "field" }, el("label", { text: f.label }),
                     el("div", {}, input, el("span", { class: "help", text: f.help }), error)));
  }
  const remove = el("button", { type: "button", text: "Remove this subject" });
  block.photos = { files, error: el("div", { class: "error" }), warnings: el("ul", { class: "warnings" }),
                   previews: el("div", { class: "thumbs" }), folder: null };
  block.append(drop, block.photos.error, block.photos.warnings, block.photos.previews,
               el("div", { class: "row" }, el("label", {}, "Class noun ", noun), suggestButton), suggestError, chips,
               fields, el("div", { class: "row" }, remove));
  block.photos.folder = subjectInput(block, "instance_data_dir");
  dropPhotos(drop, block.photos);
  const ask = () => suggestFor(block, noun.value.trim(), chips, suggestError);
  suggestButton.onclick = ask;
  noun.onkeydown = (e) => { if (e.key === "Enter") ask(); };
  remove.onclick = () => { block.remove(); numberSubjects(); };
  $("subjects").append(block);
  numberSubjects();
  return block;
}

// what an empty box of a further subject means
const SUBJECT_PLACEHOLDERS = {
  identifier: "empty: the word its prompt has and its class prompt lacks",
  class_prompt: "empty: the first subject's class prompt",
  class_data_dir: "empty: the first subject's (same class) or the workspace's folder for its class",
  repeats: "empty: the run's repeats",
};

async function suggestFor(block, noun, chips, error) {
  error.textContent = "";
  chips.replaceChildren(el("span", { class: "muted", text: "ranking rare tokens…" }));
  try {
    const res = await api("POST", "/api/identifiers", { model: currentModel(), class_noun: noun,
                                                        taken: takenIdentifiers(subjectInput(block, "identifier")) });
    chips.replaceChildren();
    if (res.warning) error.textContent = res.warning;
    for (const s of res.suggestions) {
      const b = el("button", { type: "button", class: "suggestion", text: s.token,
                               title: s.shift === undefined ? "" : `prior shift ${Number(s.shift).toFixed(4)}` });
      b.onclick = () => {
        const fill = { identifier: s.token, instance_prompt: `a ${s.token} ${noun}`, class_prompt: `a ${noun}` };
        for (const [name, value] of Object.entries(fill)) {
          subjectInput(block, name).value = value;
          subjectInput(block, name).dispatchEvent(new Event("change"));
        }
        setField("with_prior_preservation", true);  // a class prompt is prior preservation's
        $("e-with_prior_preservation").textContent = "";
        for (const c of chips.children) c.classList.toggle("primary", c === b);
      };
      chips.append(b);
    }
  } catch (e) { chips.replaceChildren(); error.textContent = e.message; }
}

// ---- training ------------------------------------------------------------------------------------------------
async function start() {
  $("start-error").textContent = "";
  $("start").disabled = true;
  try {
    const res = await api("POST", "/api/train", { values: formValues() });
    if (res.problems) {
      const unplaced = showProblems(res.problems);
      $("start-error").textContent = unplaced.length ? unplaced.join("; ") : "fix the fields marked";
      return;
    }
    showProblems({});
    openRun(res.run);
    loadRuns().catch(() => {});
  } catch (e) { $("start-error").textContent = e.message; } finally { $("start").disabled = false; }
}

function openRun(name) {
  state.run = name; state.offset = 0; state.losses = []; state.viewing += 1; state.logOffset = 0;
  state.config = null; state.classStarted = null;
  $("run").hidden = false; $("after").hidden = true;
  $("run-name").textContent = name;
  for (const id of ["validations", "gallery", "eval-report", "eval-grids", "exports"]) $(id).replaceChildren();
  $("gallery-prompts").value = ""; $("log").textContent = ""; $("run-command-text").hidden = true;
  for (const id of ["step-text", "eta", "class-progress", "run-message", "gallery-status", "eval-status", "phase",
                    "phase-detail"])
    $(id).textContent = "";
  $("progress").value = 0;
  drawLoss();
  for (const li of document.querySelectorAll("#runs li")) li.classList.toggle("current", li.dataset.name === name);
  clearTimeout(state.timer);
  poll(state.viewing);
  $("run").scrollIntoView();
}

async function poll(viewing) {
  if (viewing !== state.viewing) return;
  try {
    const res = await api("GET", `/api/runs/${encodeURIComponent(state.run)}?offset=${state.offset}`);
    if (viewing !== state.viewing) return;
    state.offset = res.offset;
    if (res.config && !state.config) { state.config = res.config; fitEvaluation(res.config); }
    for (const e of res.events) onEvent(e);
    drawLoss();
    if ($("log-pane").open) await readLog(viewing);
    const status = $("run-status");
    status.textContent = res.status; status.className = `badge ${res.status}`;
    if (res.message) $("run-message").textContent = res.message;
    if (res.class_images_on_disk !== undefined && res.config) {
      showClassImages(res.class_images_on_disk, res.config.num_class_images);
    }
    if (res.status === "running" && !$("phase").textContent) $("phase").textContent = "starting";
    if (["failed", "stopped", "interrupted"].includes(res.status)) $("phase").textContent = res.status;
    $("stop").disabled = res.status !== "running";
    $("resume").disabled = !["stopped", "interrupted", "failed"].includes(res.status);
    if (res.status === "finished") { $("after").hidden = false; fillGalleryDefaults(res.config); }
    if (res.status === "running" || res.status === "starting") state.timer = setTimeout(() => poll(viewing), 1000);
    else loadRuns().catch(() => {});
  } catch (e) {
    $("run-message").textContent = e.message;
    state.timer = setTimeout(() => poll(viewing), 3000);
  }
}

function showClassImages(done, total) {
  const now = Date.now() / 1000;
  if (state.classStarted === null || done === 0) state.classStarted = { time: now, done };
  $("class-progress").textContent = `class images ${done}/${total}`;
  $("phase").textContent = "making class images";
  const rate = (done - state.classStarted.done) / Math.max(now - state.classStarted.time, 1e-3);
  $("phase-detail").textContent = `${done}/${total}` + (rate > 0 && done < total
    ? ` · ETA ${formatSeconds((total - done) / rate)}` : "");
}

function onEvent(e) {
  if (e.event === "phase") { $("phase").textContent = e.name; $("phase-detail").textContent = ""; }
  if (e.event === "class_images") showClassImages(e.done, e.total);
  if (e.event === "start") { $("phase").textContent = "training"; $("phase-detail").textContent = ""; }
  if (e.event === "start" && e.resumed_from) state.losses = state.losses.filter((p) => p[0] <= e.step);
  if (e.event === "step") {
    if ($("phase").textContent !== "training") { $("phase").textContent = "training"; $("phase-detail").textContent = ""; }
    $("progress").max = e.max_train_steps; $("progress").value = e.step;
    $("step-text").textContent = `step ${e.step}/${e.max_train_steps}`;
    $("eta").textContent = e.eta_s === null || e.eta_s === undefined ? "" : `ETA ${formatSeconds(e.eta_s)}`;
    $("lr").textContent = Number(e.lr).toExponential(2);
    $("loss").textContent = e.loss === null ? "NaN" : Number(e.loss).toFixed(4);
    if (e.loss !== null) state.losses.push([e.step, e.loss]);
  }
  if (e.event === "validation" && e.url) {
    $("validations").prepend(el("figure", {}, el("img", { src: e.url, class: "validation", alt: `step ${e.step}` }),
                                el("figcaption", { text: `step ${e.step}${e.prompt ? `: “${e.prompt}”` : ""} ` },
                                   el("a", { href: `${e.url}?download`, text: "download" }))));
  }
  if (e.event === "stopped") $("run-message").textContent = `stopped at step ${e.step}; resume continues it`;
  if (e.event === "error") $("run-message").textContent = `${e.message} (${e.kept || ""})`;
  if (e.event === "finish") {
    $("eta").textContent = ""; $("step-text").textContent = `done: ${e.step} steps`;
    $("phase").textContent = "finished"; $("phase-detail").textContent = "";
  }
}

function formatSeconds(s) {
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`
    : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function drawLoss() {  // the plot area is x 50..430, y 10..120 of the SVG's 440 x 150
  const pts = state.losses;
  const line = $("loss-curve").querySelector("polyline");
  const ticks = { "loss-y-max": "", "loss-y-min": "", "loss-x-min": "", "loss-x-max": "" };
  if (pts.length < 2) {
    line.setAttribute("points", "");
    for (const [id, text] of Object.entries(ticks)) $(id).textContent = text;
    return;
  }
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (const [x, y] of pts) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  line.setAttribute("points", pts.map(([x, y]) =>
    `${(50 + ((x - x0) / (x1 - x0 || 1)) * 380).toFixed(1)},${(120 - ((y - y0) / (y1 - y0 || 1)) * 110).toFixed(1)}`)
    .join(" "));
  Object.assign(ticks, { "loss-y-max": y1.toPrecision(3), "loss-y-min": y0.toPrecision(3), "loss-x-min": x0,
                         "loss-x-max": x1 });
  for (const [id, text] of Object.entries(ticks)) $(id).textContent = String(text);
}

async function readLog(viewing) {
  const res = await api("GET", `/api/runs/${encodeURIComponent(state.run)}/log?offset=${state.logOffset}`);
  if (viewing !== state.viewing) return;
  state.logOffset = res.offset;
  const pre = $("log");
  const end = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.textContent = (pre.textContent + res.text.replace(/\n{2,}/g, "\n")).slice(-200000);
  if (end) pre.scrollTop = pre.scrollHeight;  // follows the end unless the reader scrolled up
}

async function showCommand(values, target) {
  try {
    const res = await api("POST", "/api/command", { values });
    target.textContent = res.command;
    target.hidden = false;
  } catch (e) { target.textContent = e.message; target.hidden = false; }
}

function saveSettings() {
  const blob = new Blob([JSON.stringify(formValues(), null, 2)], { type: "application/json" });
  const a = el("a", { href: URL.createObjectURL(blob), download: "dreambooth-settings.json" });
  document.body.append(a); a.click(); a.remove();
}

function loadValues(values) {
  for (const f of state.setup.fields) {
    if (!(f.name in values)) setField(f.name, f.kind === "bool" ? f.default : "");
    else if (f.kind !== "subjects") {
      setField(f.name, Array.isArray(values[f.name]) ? values[f.name].join(", ") : values[f.name]);
    }
  }
  $("subjects").replaceChildren();
  for (const s of Array.isArray(values.subjects) ? values.subjects : []) if (s && typeof s === "object") addSubject(s);
  const adapter = ["lokr", "loha"].includes(values.adapter) ? values.adapter : null;
  pickMode(adapter || (values.use_lora ? "lora" : "full"));
  if (values.adapter) setField("adapter", values.adapter);
  showProblems({});
}

async function loadSettings(file) {
  $("start-error").textContent = "";
  try {
    const values = JSON.parse(await file.text());
    if (!values || typeof values !== "object" || Array.isArray(values)) throw new Error("not a settings file");
    const known = new Set(state.setup.fields.map((f) => f.name));
    const unknown = Object.keys(values).filter((k) => !known.has(k));
    loadValues(Object.fromEntries(Object.entries(values).filter(([k]) => known.has(k))));
    if (unknown.length) $("start-error").textContent = `ignored what this version does not know: ${unknown.join(", ")}`;
  } catch (e) { $("start-error").textContent = `${file.name}: ${e.message}`; }
}

async function control(action) {
  try {
    const res = await api("POST", `/api/runs/${encodeURIComponent(state.run)}/${action}`, {});
    if (res.message) $("run-message").textContent = res.message;  // e.g. already stopping
    if (action === "resume") {
      $("run-message").textContent = "";
      clearTimeout(state.timer);
      state.viewing += 1;  // any poll still in flight belongs to the old chain and stops
      poll(state.viewing);
    }
  } catch (e) { $("run-message").textContent = e.message; }
}

// ---- after training ------------------------------------------------------------------------------------------
function subjectOf(config) {
  const identifier = config.identifier || "";
  const prompt = config.instance_prompt || "";
  const noun = identifier && prompt.includes(identifier) ? prompt.split(identifier)[1].trim() : "";
  return { identifier, noun };
}

function fillGalleryDefaults(config) {
  if ($("gallery-prompts").value.trim() || !config) return;
  $("gallery-prompts").value = [config.instance_prompt, config.validation_prompt].filter(Boolean)
    .filter((p, i, all) => all.indexOf(p) === i).join("\n");
}

async function templates() {
  const config = (await api("GET", `/api/runs/${encodeURIComponent(state.run)}?offset=0`)).config || {};
  const { identifier, noun } = subjectOf(config);
  const q = new URLSearchParams({ class_noun: noun, identifier, live: $("live").checked ? "1" : "" });
  const res = await api("GET", `/api/templates?${q}`);
  $("gallery-prompts").value = res.prompts.map((p) => p.text).join("\n");
}

async function waitJob(job, status) {
  const viewing = state.viewing;
  while (job.status === "running") {
    if (viewing !== state.viewing) throw new Error("another run is open");
    status.textContent = `${job.command} running…`;
    await new Promise((r) => setTimeout(r, 1000));
    job = await api("GET", `/api/jobs/${encodeURIComponent(job.id)}`);
  }
  status.textContent = job.status === "done" ? `${job.command} done` : `${job.command} ${job.status}: ${job.message}`;
  return job;
}

async function render() {
  const prompts = $("gallery-prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
  $("gallery").replaceChildren();
  $("render").disabled = true;
  try {
    let job = await api("POST", `/api/runs/${encodeURIComponent(state.run)}/gallery`,
                        { prompts, num_images: Number($("gallery-n").value) || 2 });
    job = await waitJob(job, $("gallery-status"));
    for (const image of job.images || []) {
      $("gallery").append(el("figure", {}, el("img", { src: image.url, class: "gallery-image", alt: image.prompt }),
                             el("figcaption", { text: image.prompt })));
    }
    if (job.download) {
      $("gallery-status").append(" · ", el("a", { href: job.download, text: "download all (zip)" }));
    }
  } catch (e) { $("gallery-status").textContent = e.message; } finally { $("render").disabled = false; }
}

function fitEvaluation(config) {  // a bundled model is judged by its own backend (a toy model: the toy judges)
  const model = (state.setup.models || []).find((m) => m.path === config.pretrained_model_name_or_path);
  $("eval-backend").value = model ? model.evaluation : "dreambench";
  const subjects = model ? model.subjects : [];
  $("eval-subject").replaceChildren(...subjects.map((s) => el("option", { value: s.name, text: `subject: ${s.name} (${s.cls})` })));
  $("eval-subject").hidden = !subjects.length;
}

async function evaluate() {
  $("eval-report").replaceChildren(); $("eval-grids").replaceChildren();
  $("evaluate").disabled = true;
  const reports = {};
  try {
    for (const which of ["base", "tuned"]) {  // one after the other: each is a process that fills the CPU or GPU
      let job = await api("POST", `/api/runs/${encodeURIComponent(state.run)}/evaluate`,
                          { backend: $("eval-backend").value, subject: $("eval-subject").value,
                            images_per_prompt: $("eval-n").value, which });
      job = await waitJob(job, $("eval-status"));
      if (!job.report) return;
      reports[which] = job;
      $("eval-status").textContent = which === "base" ? "base model measured; now the fine-tuned one" : "done";
    }
    const fmt = (m) => (m ? `${m.value.toFixed(3)} (${m.ci95[0].toFixed(3)} – ${m.ci95[1].toFixed(3)})` : "–");
    $("eval-report").append(el("tr", {}, el("th", { text: "metric" }), el("th", { text: "base model" }),
                                el("th", { text: "fine-tuned" }), el("th", { text: "what it measures" })));
    for (const [name, m] of Object.entries(reports.tuned.report.metrics)) {
      $("eval-report").append(el("tr", {}, el("td", { text: name }),
                                  el("td", { text: fmt(reports.base.report.metrics[name]) }),
                                  el("td", { text: fmt(m) }), el("td", { text: m.description || "" })));
    }
    for (const which of ["base", "tuned"]) {
      for (const url of reports[which].files || []) {
        if (url.includes("/grids/")) {
          $("eval-grids").append(el("figure", {}, el("img", { src: url }), el("figcaption", {
            text: `${which === "base" ? "base model" : "fine-tuned"}: ${url.split("/").pop()}` })));
        }
      }
    }
  } catch (e) { $("eval-status").textContent = e.message; } finally { $("evaluate").disabled = false; }
}

async function exportAs(format) {
  const item = el("li", { text: `${format}: writing…` });
  $("exports").append(item);
  try {
    let job = await api("POST", `/api/runs/${encodeURIComponent(state.run)}/export`, { format });
    job = await waitJob(job, item);
    if (job.status === "done") {
      item.replaceChildren(`${format}: `, el("a", { class: "export-download", href: job.download,
                                                    text: job.output.endsWith(".safetensors") ? "download"
                                                      : "download (zip)" }),
                           " · on the server: ", el("code", { class: "export-path", text: job.output }));
    }
  } catch (e) { item.textContent = `${format}: ${e.message}`; }
}

// ---- runs ----------------------------------------------------------------------------------------------------
async function loadRuns() {
  const res = await api("GET", "/api/runs");
  $("runs").replaceChildren(...res.runs.map((r) => {
    const li = el("li", { "data-name": r.name, title: r.instance_prompt || "" },
                  el("div", { text: r.name }),
                  el("small", { class: "muted", text: `${r.status}${r.use_lora ? " · LoRA" : ""}`
                    + (r.steps ? ` · ${r.steps} steps` : "") + (r.mean_loss ? ` · loss ${r.mean_loss.toFixed(3)}` : "") }));
    li.onclick = () => openRun(r.name);
    li.classList.toggle("current", r.name === state.run);
    return li;
  }));
}

async function init() {
  state.setup = await api("GET", "/api/setup");
  $("workspace").textContent = `workspace: ${state.setup.workspace}`;
  for (const m of state.setup.models) $("model-choice").append(el("option", { value: m.path, text: m.label }));
  buildForm(state.setup.fields);
  await applyPresets(true);
  $("model-choice").onchange = () => { $("model-path").value = ""; applyPresets(true); };
  $("model-path").onchange = () => applyPresets(true);
  for (const r of document.querySelectorAll("input[name=mode]")) {
    r.onchange = () => { pickMode(r.value); applyPresets(); };  // LoRA and full fine-tune: adapter back to lora
  }
  if ($("f-adapter")) {
    $("f-adapter").addEventListener("change", () => {  // the advanced adapter and the method choice agree
      const adapter = $("f-adapter").value;
      const want = adapter === "lokr" || adapter === "loha" ? adapter : mode() === "full" ? "full" : "lora";
      if (want !== mode()) { pickMode(want); applyPresets(); }
    });
  }
  for (const name of ["resolution", "use_aspect_ratio_buckets", "aspect_ratio_buckets"]) {
    if ($(`f-${name}`)) $(`f-${name}`).addEventListener("change", () => refreshPreviews());
  }
  $("add-subject").onclick = () => addSubject().scrollIntoView({ block: "nearest" });
  $("advanced-search").oninput = searchAdvanced;
  $("show-command").onclick = () => showCommand(formValues(), $("command"));
  $("save-settings").onclick = saveSettings;
  $("load-settings").onchange = () => { if ($("load-settings").files[0]) loadSettings($("load-settings").files[0]); };
  $("run-command").onclick = () => showCommand(state.config || {}, $("run-command-text"));
  $("reuse").onclick = () => { if (state.config) { loadValues({ ...state.config, output_dir: null });
    $("run").hidden = true; $("setup").scrollIntoView(); } };
  $("log-pane").ontoggle = () => { if ($("log-pane").open && state.run) readLog(state.viewing).catch(() => {}); };
  dropPhotos($("photo-drop"), firstPhotos());
  $("suggest").onclick = suggest;
  $("class-noun").onkeydown = (e) => { if (e.key === "Enter") suggest(); };
  $("start").onclick = start;
  $("stop").onclick = () => control("stop");
  $("resume").onclick = () => control("resume");
  $("templates").onclick = () => templates().catch((e) => { $("gallery-status").textContent = e.message; });
  $("render").onclick = render;
  $("evaluate").onclick = evaluate;
  for (const b of document.querySelectorAll("button.export")) b.onclick = () => exportAs(b.dataset.format);
  $("new-run").onclick = () => { state.viewing += 1; $("run").hidden = true; $("setup").scrollIntoView(); };
  await loadRuns();
  document.body.dataset.ready = "1";
}

init().catch((e) => { document.body.prepend(el("p", { class: "error", text: `the page could not load: ${e.message}` })); });
