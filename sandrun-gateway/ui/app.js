// sandrun's web UI: plain DOM code, no framework, no inline handlers (the page's CSP allows
// scripts from this origin only). Talks to the same gateway that served it: /submit, /ws/{id},
// /status, /outputs, /download, DELETE /jobs/{id}, /stats, /environments, /health.
"use strict";

const $ = (id) => document.getElementById(id);

const ENTRYPOINTS = { python: "main.py", node: "index.js", shell: "run.sh" };
const SAMPLES = {
  python: 'print("hello from sandrun")\n',
  node: 'console.log("hello from sandrun");\n',
  shell: 'echo "hello from sandrun"\n',
};
const INDENT = "    ";

const state = {
  upload: [], // [{path, file}] chosen or dropped; sent instead of the editor when non-empty
  job: null, // the current job id
  socket: null,
  finished: false,
  workerId: "",
  previewUrl: null,
};

// ---------------------------------------------------------------- API helpers

/** An API failure: the API's own `error` text, with the HTTP status. */
class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** fetch, and turn any non-2xx answer into an ApiFailure carrying the API's `error` message. */
async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new ApiFailure(0, `cannot reach the gateway: ${e.message}`);
  }
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") message = body.error;
    } catch (_) {
      // not JSON: keep the status line
    }
    const retry = response.headers.get("retry-after");
    throw new ApiFailure(response.status, retry ? `${message} (retry after ${retry} s)` : message);
  }
  return response;
}

async function apiJson(path, options) {
  return (await api(path, options)).json();
}

function showError(error) {
  const box = $("error");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const text = error instanceof ApiFailure && error.status
    ? `${error.status}: ${error.message}`
    : String(error.message || error);
  box.textContent = text;
  box.hidden = false;
}

// ---------------------------------------------------------------- quota and server facts

async function refreshQuota() {
  try {
    const stats = await apiJson("/stats");
    const q = stats.quota || stats.your_quota;
    if (!q) return;
    const jobsLeft = Math.max(0, q.jobs_per_hour_limit - q.jobs_last_hour);
    const cpuLeft = Math.max(0, q.cpu_seconds_per_minute_limit - q.cpu_seconds_last_minute);
    $("quota").textContent =
      `quota left: ${jobsLeft} of ${q.jobs_per_hour_limit} jobs this hour · ` +
      `${cpuLeft.toFixed(1)} of ${q.cpu_seconds_per_minute_limit} CPU-s this minute · ` +
      `running ${q.active_jobs} of ${q.concurrent_jobs_limit}`;
  } catch (e) {
    $("quota").textContent = `quota unavailable: ${e.message}`;
  }
}

async function loadServerFacts() {
  try {
    const health = await apiJson("/health");
    state.workerId = health.worker_id_hex || "";
    if (!$("sig-key").value) $("sig-key").value = state.workerId;
  } catch (e) {
    showError(e);
  }
  try {
    const envs = await apiJson("/environments");
    const names = envs.environments || envs.templates || [];
    const select = $("environment");
    for (const item of names) {
      const name = typeof item === "string" ? item : item && item.name;
      if (!name) continue;
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      select.append(option);
    }
  } catch (e) {
    showError(e);
  }
}

// ---------------------------------------------------------------- the editor

function onEditorKey(event) {
  const area = event.target;
  if (event.key === "Escape") {
    area.dataset.released = "1"; // the next Tab moves focus as usual
    return;
  }
  if (event.key === "Tab" && area.dataset.released === "1") {
    delete area.dataset.released;
    return;
  }
  delete area.dataset.released;
  if (event.key === "Tab") {
    event.preventDefault();
    if (event.shiftKey) dedent(area);
    else indent(area);
  } else if (event.key === "Enter" && !event.ctrlKey && !event.metaKey) {
    event.preventDefault();
    const before = area.value.slice(0, area.selectionStart);
    const line = before.slice(before.lastIndexOf("\n") + 1);
    let lead = line.match(/^[ \t]*/)[0];
    if (/[:{[(]\s*$/.test(line)) lead += INDENT;
    insertText(area, "\n" + lead);
  }
}

/** Inserts text at the cursor, keeping the browser's undo history where it can. */
function insertText(area, text) {
  if (!document.execCommand || !document.execCommand("insertText", false, text)) {
    area.setRangeText(text, area.selectionStart, area.selectionEnd, "end");
  }
}

/** The bounds of the whole lines the selection touches. */
function selectedLines(area) {
  const value = area.value;
  const start = value.lastIndexOf("\n", area.selectionStart - 1) + 1;
  let end = area.selectionEnd;
  if (end > start && value[end - 1] === "\n") end -= 1;
  const next = value.indexOf("\n", end);
  return { start, end: next === -1 ? value.length : next };
}

function indent(area) {
  if (area.selectionStart === area.selectionEnd) {
    insertText(area, INDENT);
    return;
  }
  const { start, end } = selectedLines(area);
  const block = area.value.slice(start, end).replace(/^/gm, INDENT);
  area.setSelectionRange(start, end);
  insertText(area, block);
  area.setSelectionRange(start, start + block.length);
}

function dedent(area) {
  const { start, end } = selectedLines(area);
  const block = area.value.slice(start, end).replace(/^( {1,4}|\t)/gm, "");
  area.setSelectionRange(start, end);
  insertText(area, block);
  area.setSelectionRange(start, start + block.length);
}

function onLanguageChange() {
  const code = $("code");
  const lang = $("lang").value;
  if (Object.values(SAMPLES).includes(code.value) || code.value.trim() === "") {
    code.value = SAMPLES[lang];
  }
  $("entrypoint").placeholder = ENTRYPOINTS[lang];
}

// ---------------------------------------------------------------- uploads

/** Sets the upload, dropping a folder name that every path shares (the folder is the root). */
function setUpload(items) {
  const split = items.map((i) => i.path.split("/"));
  const first = split.length ? split[0][0] : null;
  const common = split.length > 0 && split.every((p) => p.length > 1 && p[0] === first);
  state.upload = items.map((item, n) => ({
    path: common ? split[n].slice(1).join("/") : item.path,
    file: item.file,
  }));
  const list = $("file-list");
  list.replaceChildren();
  for (const item of state.upload) {
    const li = document.createElement("li");
    li.textContent = `${item.path} (${formatBytes(item.file.size)})`;
    list.append(li);
  }
  $("clear-files").hidden = state.upload.length === 0;
}

function onPicked(event) {
  const items = Array.from(event.target.files).map((file) => ({
    path: file.webkitRelativePath || file.name,
    file,
  }));
  setUpload(items);
  event.target.value = "";
}

/** Every file under a dropped entry, with its path from the drop's root. */
async function walkEntry(entry, out) {
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    out.push({ path: entry.fullPath.replace(/^\/+/, ""), file });
    return;
  }
  if (!entry.isDirectory) return;
  const reader = entry.createReader();
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (batch.length === 0) break;
    for (const child of batch) await walkEntry(child, out);
  }
}

async function onDrop(event) {
  event.preventDefault();
  $("drop").classList.remove("over");
  const transfer = event.dataTransfer;
  const entries = Array.from(transfer.items || [])
    .filter((item) => item.kind === "file")
    .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
  try {
    if (entries.length && entries.every(Boolean)) {
      const out = [];
      for (const entry of entries) await walkEntry(entry, out);
      setUpload(out);
    } else {
      setUpload(Array.from(transfer.files).map((file) => ({ path: file.name, file })));
    }
  } catch (e) {
    showError(new Error(`reading the dropped files failed: ${e.message || e}`));
  }
}

// ---------------------------------------------------------------- submitting

/** The manifest from the options the user set; null when none is set (a job.json applies). */
function optionsManifest() {
  const m = {};
  const entry = $("entrypoint").value.trim();
  if (entry) m.entrypoint = entry;
  const args = $("args").value.split("\n").filter((a) => a !== "");
  if (args.length) m.args = args;
  const outputs = $("outputs").value.split(",").map((p) => p.trim()).filter(Boolean);
  if (outputs.length) m.outputs = outputs;
  for (const [id, key] of [["memory", "memory_mb"], ["timeout", "timeout"], ["cpu", "cpu_seconds"]]) {
    const text = $(id).value.trim();
    if (text === "") continue;
    const n = Number(text);
    if (!Number.isInteger(n)) throw new Error(`${id} must be a whole number`);
    m[key] = n;
  }
  const environment = $("environment").value;
  if (environment) m.environment = environment;
  const env = {};
  let any = false;
  for (const line of $("env").value.split("\n")) {
    if (line.trim() === "") continue;
    const eq = line.indexOf("=");
    if (eq <= 0) throw new Error(`env var line "${line}" is not NAME=value`);
    env[line.slice(0, eq).trim()] = line.slice(eq + 1);
    any = true;
  }
  if (any) m.env = env;
  return Object.keys(m).length ? m : null;
}

function buildForm() {
  const form = new FormData();
  let manifest = optionsManifest();
  if (state.upload.length) {
    for (const item of state.upload) form.append("files", item.file, item.path);
  } else {
    manifest = manifest || {};
    const name = manifest.entrypoint || ENTRYPOINTS[$("lang").value];
    manifest.entrypoint = name;
    form.append("files", new Blob([$("code").value], { type: "text/plain" }), name);
  }
  if (manifest) form.append("manifest", JSON.stringify(manifest));
  return form;
}

async function run() {
  showError(null);
  let form;
  try {
    form = buildForm();
  } catch (e) {
    showError(e);
    return;
  }
  $("run").disabled = true;
  const shown = $("status").textContent;
  setStatus("submitting");
  try {
    const answer = await apiJson("/submit", { method: "POST", body: form });
    startJob(answer.job_id, answer.status);
  } catch (e) {
    setStatus(shown); // the job shown before is still the one on the page
    showError(e);
    $("run").disabled = false;
  }
  refreshQuota();
}

function resetResult() {
  for (const id of ["exit-code", "reason", "cpu-time", "memory-peak", "wall-time"]) {
    $(id).textContent = "–";
  }
  $("console").replaceChildren();
  $("output-list").replaceChildren();
  $("outputs-empty").hidden = false;
  $("outputs-empty").textContent = "No outputs yet.";
  $("download-all").disabled = true;
  clearPreview();
  $("sig-message").value = "";
  $("sig-value").value = "";
  $("verify-result").textContent = "";
  $("verify-result").className = "";
}

function setStatus(status) {
  const el = $("status");
  el.textContent = status;
  el.className = status;
}

function startJob(id, status) {
  if (state.socket) state.socket.close();
  state.job = id;
  state.finished = false;
  resetResult();
  $("job-id").textContent = id;
  setStatus(status || "queued");
  $("cancel").disabled = false;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/ws/${id}`);
  state.socket = socket;
  socket.addEventListener("message", (event) => onEvent(id, event));
  socket.addEventListener("close", () => {
    if (state.job === id && !state.finished) pollUntilDone(id);
  });
}

function appendOutput(kind, text) {
  if (!text) return;
  const pane = $("console");
  const stick = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
  const last = pane.lastElementChild;
  if (last && last.className === kind) {
    last.append(text);
  } else {
    const span = document.createElement("span");
    span.className = kind;
    span.textContent = text;
    pane.append(span);
  }
  if (stick) pane.scrollTop = pane.scrollHeight;
}

function onEvent(id, event) {
  if (state.job !== id) return;
  let e;
  try {
    e = JSON.parse(event.data);
  } catch (_) {
    return;
  }
  if (e.type === "stdout" || e.type === "stderr") appendOutput(e.type, e.data);
  else if (e.type === "status") setStatus(e.status);
  else if (e.type === "error") showError(new Error(e.error));
  else if (e.type === "exit") finish(id, e);
}

/** Without a socket (it failed or closed early), ask /status until the job ends. */
async function pollUntilDone(id) {
  for (;;) {
    if (state.job !== id || state.finished) return;
    try {
      const s = await apiJson(`/status/${id}`);
      setStatus(s.status);
      if (s.status === "completed" || s.status === "failed") {
        const logs = await apiJson(`/logs/${id}`);
        $("console").replaceChildren();
        appendOutput("stdout", logs.stdout);
        appendOutput("stderr", logs.stderr);
        finish(id, { status: s.status, reason: s.reason, exit_code: s.execution_metadata.exit_code });
        return;
      }
    } catch (e) {
      showError(e);
      return;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function finish(id, exit) {
  if (state.finished) return;
  state.finished = true;
  setStatus(exit.status);
  $("reason").textContent = exit.reason || "–";
  $("exit-code").textContent = exit.exit_code ?? (exit.signal != null ? `signal ${exit.signal}` : "–");
  $("cancel").disabled = true;
  $("run").disabled = false;
  refreshQuota();
  try {
    const status = await apiJson(`/status/${id}`);
    showMetadata(status);
    await showSignature(status);
    await showOutputs(id);
  } catch (e) {
    showError(e);
  }
}

function showMetadata(status) {
  const m = status.execution_metadata || {};
  if (m.cpu_seconds != null) $("cpu-time").textContent = `${m.cpu_seconds.toFixed(3)} s`;
  if (m.memory_peak_mb != null) $("memory-peak").textContent = `${m.memory_peak_mb.toFixed(1)} MiB`;
  if (m.wall_time_ms != null) $("wall-time").textContent = `${m.wall_time_ms} ms`;
  if (m.exit_code != null) $("exit-code").textContent = String(m.exit_code);
  $("reason").textContent = status.reason || "–";
  if (status.message) showError(new Error(status.message));
}

async function cancel() {
  if (!state.job) return;
  try {
    const answer = await apiJson(`/jobs/${state.job}`, { method: "DELETE" });
    if (answer.action === "cancelled") {
      // A queued job never started: no exit event will come.
      finish(state.job, { status: "failed", reason: "cancelled", exit_code: null });
    }
  } catch (e) {
    showError(e);
  }
}

// ---------------------------------------------------------------- outputs

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

async function showOutputs(id) {
  const listing = await apiJson(`/outputs/${id}`);
  const list = $("output-list");
  list.replaceChildren();
  const files = listing.files || [];
  $("outputs-empty").hidden = files.length > 0;
  $("outputs-empty").textContent = "This job returned no files.";
  for (const file of files) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = file.name;
    const size = document.createElement("span");
    size.className = "size";
    size.textContent = file.size_formatted || formatBytes(file.size);
    const preview = document.createElement("button");
    preview.type = "button";
    preview.textContent = "Preview";
    preview.className = "preview";
    preview.addEventListener("click", () => previewFile(file));
    const download = document.createElement("button");
    download.type = "button";
    download.textContent = "Download";
    download.className = "download";
    download.addEventListener("click", () => downloadFile(file));
    li.dataset.name = file.name;
    li.append(name, size, preview, download);
    list.append(li);
  }
  $("download-all").disabled = files.length === 0;
}

function clearPreview() {
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = null;
  $("preview").replaceChildren();
}

async function previewFile(file) {
  clearPreview();
  try {
    const blob = await (await api(file.download_url)).blob();
    const box = $("preview");
    if (file.type === "image") {
      const img = document.createElement("img");
      state.previewUrl = URL.createObjectURL(new Blob([blob], { type: file.mime_type }));
      img.src = state.previewUrl;
      img.alt = file.name;
      box.append(img);
    } else if (file.type === "text" || blob.size <= 256 * 1024) {
      const pre = document.createElement("pre");
      const text = await blob.slice(0, 256 * 1024).text();
      pre.textContent = file.type === "text" ? text : `(binary, shown as text)\n${text}`;
      box.append(pre);
    } else {
      box.textContent = `${file.name} is ${formatBytes(blob.size)} of binary data: download it instead.`;
    }
  } catch (e) {
    showError(e);
  }
}

function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

async function downloadFile(file) {
  try {
    const blob = await (await api(file.download_url)).blob();
    saveBlob(blob, file.name.split("/").pop());
  } catch (e) {
    showError(e);
  }
}

async function downloadAll() {
  if (!state.job) return;
  try {
    const blob = await (await api(`/download/${state.job}`)).blob();
    saveBlob(blob, `sandrun-${state.job}.tar.gz`);
    $("download-all").disabled = true;
    for (const b of document.querySelectorAll("#output-list button")) b.disabled = true;
    $("outputs-empty").hidden = false;
    $("outputs-empty").textContent = "Downloaded; the server has deleted this job.";
  } catch (e) {
    showError(e);
  }
}

// ---------------------------------------------------------------- signatures

/** The bytes of a string in UTF-8. */
const utf8 = (text) => new TextEncoder().encode(text);

function compareBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i += 1) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

const escapeLine = (s) => s.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");

/** The signed message of docs/signatures.md, rebuilt from a /status answer. */
function signedMessage(status) {
  const m = status.execution_metadata || {};
  const outputs = Object.entries(status.output_files || {})
    .map(([path, info]) => ({ path, bytes: utf8(path), sha256: info.sha256 }))
    .sort((a, b) => compareBytes(a.bytes, b.bytes));
  // Format 2 (a job with an environment template) adds its name and lock hash.
  const env = status.environment_lock
    ? `environment=${escapeLine(status.environment)}\nenvironment_lock=${status.environment_lock}\n`
    : "";
  // Format 3 (a job with requirements) adds what they installed, one line per wheel, sorted.
  const installed = status.requirements ? status.requirements.installed || [] : null;
  const reqLines = (installed || [])
    .map((p) => utf8(`requirement=${p.sha256} ${escapeLine(p.name)}==${escapeLine(p.version)}\n`))
    .sort(compareBytes)
    .map((b) => new TextDecoder().decode(b))
    .join("");
  // ...then whether the install succeeded (a failed one is `failed`, its list empty).
  const reqResult = status.requirements && status.requirements.error != null ? "failed" : "installed";
  const reqs = installed
    ? `requirements=${installed.length}\n${reqLines}requirements_result=${reqResult}\n`
    : "";
  const format = installed ? "sandrun-result-v3\n" : env ? "sandrun-result-v2\n" : "sandrun-result-v1\n";
  let text =
    format +
    `job_id=${escapeLine(status.job_id)}\n` +
    `job_hash=${status.job_hash}\n` +
    env +
    reqs +
    `exit_code=${m.exit_code ?? "none"}\n` +
    `cpu_ms=${status.cpu_ms}\n` +
    `memory_peak_bytes=${m.memory_peak_bytes}\n` +
    `completed_at=${status.completed_at}\n` +
    `outputs=${outputs.length}\n`;
  for (const o of outputs) text += `output=${o.sha256} ${escapeLine(o.path)}\n`;
  return text;
}

function hexBytes(hex) {
  if (!/^([0-9a-fA-F]{2})*$/.test(hex)) throw new Error("the key is not hex");
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i += 1) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function base64Bytes(text) {
  let raw;
  try {
    raw = atob(text.trim());
  } catch (_) {
    throw new Error("the signature is not base64");
  }
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

async function showSignature(status) {
  const signature = status.worker_metadata && status.worker_metadata.signature;
  if (!signature) {
    $("verify-result").textContent = "This result has no signature.";
    return;
  }
  const signer = status.worker_metadata.worker_id_hex;
  $("sig-key").value = state.workerId || signer;
  $("sig-message").value = signedMessage(status);
  $("sig-value").value = signature;
  await verify();
  if (state.workerId && signer !== state.workerId) {
    $("verify-result").textContent += ` (the result names worker ${signer}, not this gateway's)`;
  }
}

async function verify() {
  const out = $("verify-result");
  out.className = "";
  try {
    if (!window.crypto || !crypto.subtle) {
      throw new Error("WebCrypto is not available (the page needs HTTPS or localhost)");
    }
    const keyBytes = hexBytes($("sig-key").value.trim());
    if (keyBytes.length !== 32) throw new Error("an Ed25519 public key is 32 bytes (64 hex digits)");
    const signature = base64Bytes($("sig-value").value);
    let key;
    try {
      key = await crypto.subtle.importKey("raw", keyBytes, { name: "Ed25519" }, false, ["verify"]);
    } catch (e) {
      throw new Error(`this browser cannot import an Ed25519 key: ${e.message}`);
    }
    const ok = await crypto.subtle.verify({ name: "Ed25519" }, key, signature, utf8($("sig-message").value));
    out.textContent = ok
      ? `Signature valid: signed by worker ${$("sig-key").value.trim()}`
      : "Signature INVALID: this message was not signed by this key";
    out.className = ok ? "valid" : "invalid";
  } catch (e) {
    out.textContent = `Cannot verify: ${e.message}`;
    out.className = "invalid";
  }
}

// ---------------------------------------------------------------- wiring

function init() {
  $("code").addEventListener("keydown", onEditorKey);
  $("lang").addEventListener("change", onLanguageChange);
  $("pick-files").addEventListener("change", onPicked);
  $("pick-folder").addEventListener("change", onPicked);
  $("clear-files").addEventListener("click", () => setUpload([]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", onDrop);
  $("run").addEventListener("click", run);
  $("cancel").addEventListener("click", cancel);
  $("download-all").addEventListener("click", downloadAll);
  $("verify").addEventListener("click", verify);
  onLanguageChange();
  loadServerFacts();
  refreshQuota();
}

document.addEventListener("DOMContentLoaded", init);
