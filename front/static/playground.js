// The playground: a form built from the model's /openapi.json (never a copy of it), a Run that
// follows the prediction's record (GET /predictions/{id}) with a progress bar, the images with
// their seeds, a Cancel, and the caller's recent predictions. Plain JavaScript, no build step.
"use strict";

const state = { schema: null, fields: [], running: null, timer: null };
const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem("apiToken") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  return { status: response.status, body };
}

function resolve(doc, schema) {
  if (schema && schema.allOf && schema.allOf.length === 1 && schema.allOf[0].$ref) {
    const name = schema.allOf[0].$ref.split("/").pop();
    return Object.assign({}, doc.components.schemas[name], schema, { allOf: undefined });
  }
  return schema;
}

function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  if (text) node.textContent = text;
  return node;
}

function buildField(name, spec, required) {
  const id = "input-" + name;
  const wrapper = element("div", { class: "field", id: "field-" + name });
  const label = element("label", { for: id }, name + (required ? " (required)" : ""));
  wrapper.appendChild(label);
  const help = element("p", { class: "help", id: id + "-help" }, spec.description || "");
  const described = id + "-help " + id + "-error";
  let input;
  if (spec.enum) {
    input = element("select", { id, name, "aria-describedby": described });
    for (const choice of spec.enum) {
      const option = element("option", { value: choice }, choice);
      if (choice === spec.default) option.selected = true;
      input.appendChild(option);
    }
  } else if (spec.type === "boolean") {
    input = element("input", { id, name, type: "checkbox", "aria-describedby": described });
    input.checked = spec.default === true;
  } else if (spec.type === "integer" || spec.type === "number") {
    input = element("input", {
      id, name, type: "number", "aria-describedby": described,
      min: spec.minimum, max: spec.maximum, step: spec.type === "integer" ? 1 : "any",
      value: spec.default, required: required || undefined,
    });
  } else if (spec["x-cog-secret"]) {
    input = element("input", { id, name, type: "password", autocomplete: "off", "aria-describedby": described });
  } else if (spec.format === "uri") {
    input = element("input", { id, name, type: "url", placeholder: "https://… or choose a file", "aria-describedby": described });
    const file = element("input", { id: id + "-file", type: "file", accept: "image/*", "aria-label": name + " file" });
    wrapper.appendChild(help);
    wrapper.appendChild(input);
    wrapper.appendChild(file);
    wrapper.appendChild(element("p", { class: "error", id: id + "-error", role: "alert" }));
    return { name, spec, input, file, wrapper };
  } else if (name === "prompt") {
    input = element("textarea", { id, name, required: required || undefined, "aria-describedby": described });
  } else {
    input = element("input", { id, name, type: "text", value: spec.default, "aria-describedby": described });
  }
  wrapper.appendChild(help);
  wrapper.appendChild(input);
  if (name === "extra_lora") wrapper.appendChild(loraHelper(input));
  wrapper.appendChild(element("p", { class: "error", id: id + "-error", role: "alert" }));
  return { name, spec, input, wrapper };
}

function loraHelper(target) {
  // Adds `source:scale` entries to the comma-separated extra_lora list.
  const row = element("div", { class: "lora-row" });
  const source = element("input", { type: "text", id: "lora-source", placeholder: "owner/model or a URL", "aria-label": "LoRA to add" });
  const scale = element("input", { type: "number", id: "lora-scale", min: -1, max: 2, step: "any", value: 1, "aria-label": "its scale" });
  const add = element("button", { type: "button", id: "lora-add" }, "Add LoRA");
  add.addEventListener("click", () => {
    if (!source.value.trim()) return;
    const entry = source.value.trim() + ":" + (scale.value || "1");
    target.value = target.value.trim() ? target.value.trim() + ", " + entry : entry;
    source.value = "";
  });
  row.append(source, scale, add);
  return row;
}

async function loadSchema() {
  const { status, body } = await api("/openapi.json");
  if (status !== 200) { $("fields").textContent = "Could not load the schema (" + status + ")."; return; }
  state.schema = body;
  const input = body.components.schemas.Input;
  const required = new Set(input.required || []);
  const names = Object.keys(input.properties).sort((a, b) => (input.properties[a]["x-order"] || 0) - (input.properties[b]["x-order"] || 0));
  $("fields").textContent = "";
  state.fields = names.map((name) => buildField(name, resolve(body, input.properties[name]), required.has(name)));
  for (const field of state.fields) $("fields").appendChild(field.wrapper);
  if (body.components.securitySchemes) {
    $("token-row").hidden = false;
    $("api-token").value = token();
  }
}

function readFile(file) {
  return new Promise((resolveFile, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolveFile(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function collect() {
  const values = {};
  for (const field of state.fields) {
    const { name, spec, input, file } = field;
    if (file && file.files.length) { values[name] = await readFile(file.files[0]); continue; }
    if (spec.type === "boolean") { values[name] = input.checked; continue; }
    const raw = input.value;
    if (raw === "" || raw === undefined) continue;
    values[name] = spec.type === "integer" ? parseInt(raw, 10) : spec.type === "number" ? parseFloat(raw) : raw;
  }
  return values;
}

function clearErrors() {
  $("form-error").textContent = "";
  for (const field of state.fields) $("input-" + field.name + "-error").textContent = "";
}

function showRefusal(body, status) {
  const details = body && Array.isArray(body.detail) ? body.detail : [];
  let shown = false;
  for (const detail of details) {
    const loc = detail.loc || [];
    const name = loc[0] === "body" && loc[1] === "input" ? loc[2] : null;
    const target = name && $("input-" + name + "-error");
    if (target) { target.textContent = detail.msg; shown = true; }
  }
  if (!shown) $("form-error").textContent = (body && (typeof body.detail === "string" ? body.detail : body.error)) || ("HTTP " + status);
}

async function run(event) {
  event.preventDefault();
  if (!$("prediction-form").reportValidity()) return;  // the browser's own messages for its bounds
  clearErrors();
  const input = await collect();
  $("status").textContent = "Sending…";
  $("outputs").textContent = "";
  const { status, body } = await api("/predictions", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Prefer": "respond-async" },
    body: JSON.stringify({ input }),
  });
  if (status !== 202) { $("status").textContent = "Refused."; showRefusal(body, status); return; }
  follow(body.id);
}

function follow(id) {
  state.running = id;
  $("run").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  $("progress").max = 1;
  clearInterval(state.timer);
  state.timer = setInterval(() => poll(id), 250);
}

function progressOf(logs) {
  const lines = (logs || "").split("\n").reverse();
  for (const line of lines) {
    const step = line.match(/step\s+(\d+)\s*\/\s*(\d+)/i);
    if (step) return { done: +step[1], total: +step[2], text: "Step " + step[1] + " of " + step[2] };
    const bytes = line.match(/([\d,]+)\s+of\s+([\d,]+)\s+bytes/i);
    if (bytes) {
      const done = +bytes[1].replace(/,/g, ""), total = +bytes[2].replace(/,/g, "");
      return { done, total, text: "Downloading a LoRA: " + bytes[1] + " of " + bytes[2] + " bytes" };
    }
  }
  return null;
}

function seedsOf(logs) {
  const match = (logs || "").match(/seeds \[([\d, ]+)\]/);
  return match ? match[1].split(",").map((s) => s.trim()) : [];
}

async function poll(id) {
  const { status, body } = await api("/predictions/" + encodeURIComponent(id));
  if (status !== 200 || state.running !== id) return;
  $("status").textContent = "Status: " + body.status;
  $("logs").textContent = body.logs || "";
  const progress = progressOf(body.logs);
  if (progress) {
    $("progress").max = progress.total;
    $("progress").value = progress.done;
    $("progress-text").textContent = progress.text;
  }
  if (["succeeded", "failed", "canceled"].includes(body.status)) {
    clearInterval(state.timer);
    state.running = null;
    $("run").disabled = false;
    $("cancel").disabled = true;
    if (body.status === "succeeded") {
      $("progress").value = $("progress").max;
      showOutputs(body);
    } else if (body.status === "failed") {
      $("form-error").textContent = body.error || "failed";
    }
    loadHistory();
  }
}

function showOutputs(prediction) {
  const seeds = seedsOf(prediction.logs);
  const took = prediction.metrics && prediction.metrics.predict_time;
  $("outputs").textContent = "";
  (prediction.output || []).forEach((uri, i) => {
    const figure = element("figure");
    const image = element("img", { src: uri, alt: "Output " + (i + 1) + " for: " + (prediction.input.prompt || ""), class: "output" });
    const caption = element("figcaption");
    caption.appendChild(element("span", { class: "seed", "data-seed": seeds[i] || "" }, "Seed " + (seeds[i] || "?")));
    if (took) caption.appendChild(document.createTextNode(" · " + took.toFixed(2) + " s "));
    const extension = (uri.match(/^data:image\/(\w+)/) || [, "webp"])[1].replace("jpeg", "jpg");
    caption.appendChild(element("a", { href: uri, download: prediction.id + "-" + i + "." + extension }, "Download"));
    figure.append(image, caption);
    $("outputs").appendChild(figure);
  });
  $("status").textContent = "Status: succeeded";
}

async function cancel() {
  if (!state.running) return;
  await api("/predictions/" + encodeURIComponent(state.running) + "/cancel", { method: "POST" });
}

function fill(input) {
  for (const field of state.fields) {
    const value = input[field.name];
    if (field.spec.type === "boolean") field.input.checked = value === undefined ? field.spec.default === true : !!value;
    else field.input.value = value === undefined ? (field.spec.default ?? "") : value;
    if (field.file) field.file.value = "";
  }
}

async function loadHistory() {
  const { status, body } = await api("/predictions");
  $("history").textContent = "";
  if (status !== 200) return;
  for (const prediction of body.results.slice(0, 20)) {
    const item = element("li");
    item.appendChild(document.createTextNode(prediction.created_at.slice(0, 19).replace("T", " ") + " · " + prediction.status + " · " + (prediction.input.prompt || "").slice(0, 80) + " "));
    const again = element("button", { type: "button", class: "rerun" }, "Re-run");
    again.addEventListener("click", () => { fill(prediction.input); $("input-prompt").focus(); });
    item.appendChild(again);
    $("history").appendChild(item);
  }
}

async function health() {
  const { body } = await api("/health-check");
  $("health").textContent = "Model server: " + ((body && body.status) || "unreachable");
}

document.addEventListener("DOMContentLoaded", async () => {
  $("prediction-form").addEventListener("submit", run);
  $("cancel").addEventListener("click", cancel);
  $("refresh-history").addEventListener("click", loadHistory);
  $("api-token").addEventListener("change", (e) => { sessionStorage.setItem("apiToken", e.target.value); loadHistory(); });
  await loadSchema();
  health();
  loadHistory();
});
