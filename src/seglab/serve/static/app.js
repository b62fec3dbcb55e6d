// The page: upload an image to /v1/segment?format=mask, then draw the class colours over the image here, so
// the opacity slider needs no second request. Blending matches seglab.viz.overlay: background (class 0) stays
// untinted, other pixels become (1 - opacity) x image + opacity x class colour. The confidence view shows the
// server's format=confidence PNG (top class probability per pixel, black 0 to white 1), asked for once per image.
"use strict";

const state = { model: null, file: null, photo: null, colours: null, counts: null, confidence: null };
const $ = (id) => document.getElementById(id);
// A server that requires a token answers 401 without `Authorization: Bearer <token>`: the page then asks for it
// and keeps it in sessionStorage (this tab only; gone when the tab closes).
const TOKEN_KEY = "seglab-token";

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, { ...options, headers: token ? { Authorization: `Bearer ${token}` } : {} });
  if (response.status === 401) $("token-form").hidden = false;
  return response;
}

async function showError(response) {
  let detail = response.statusText;
  try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
  setStatus(`${response.status}: ${detail}`, true);
}

async function loadModel() {
  const response = await api("/v1/model");
  if (!response.ok) return showError(response);
  state.model = await response.json();
  const m = state.model;
  $("model-info").textContent =
    `${m.architecture} (${m.format} ${m.precision}, served by ${m.runtime}), ${m.class_names.length} classes, ` +
    `trained at ${m.input_size} px`;
  renderLegend();
}

function renderLegend() {
  const body = $("legend").querySelector("tbody");
  body.replaceChildren();
  const total = state.counts ? state.counts.reduce((a, b) => a + b, 0) : 0;
  state.model.class_names.forEach((name, i) => {
    const row = document.createElement("tr");
    const swatch = document.createElement("span");
    swatch.className = i === 0 ? "swatch untinted" : "swatch";
    if (i !== 0) swatch.style.background = `rgb(${state.model.palette[i].join(",")})`;
    const label = document.createElement("td");
    label.append(swatch, name);
    const pixels = document.createElement("td");
    const area = document.createElement("td");
    if (state.counts) {
      pixels.textContent = state.counts[i].toLocaleString();
      area.textContent = `${(100 * state.counts[i] / total).toFixed(2)} %`;
    }
    row.dataset.className = name;
    row.append(label, pixels, area);
    body.append(row);
  });
}

// The mask PNG holds class indices; one RGBA layer with the class colours, transparent on background.
async function colourLayer(maskBlob) {
  const bitmap = await createImageBitmap(maskBlob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d");
  context.drawImage(bitmap, 0, 0);
  const pixels = context.getImageData(0, 0, bitmap.width, bitmap.height);
  const counts = new Array(state.model.class_names.length).fill(0);
  const data = pixels.data;
  for (let p = 0; p < data.length; p += 4) {
    const index = data[p];
    counts[index] += 1;
    const colour = state.model.palette[index];
    if (index === 0 || !colour) {
      data[p + 3] = 0;
    } else {
      data[p] = colour[0]; data[p + 1] = colour[1]; data[p + 2] = colour[2]; data[p + 3] = 255;
    }
  }
  context.putImageData(pixels, 0, 0);
  return { layer: canvas, counts };
}

function display(blob, view) {
  const old = $("overlay").src;
  $("overlay").src = URL.createObjectURL(blob);
  $("overlay").dataset.view = view;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}

async function compose() {
  if (!state.photo || !state.colours) return;
  const opacity = Number($("opacity").value);
  const canvas = new OffscreenCanvas(state.photo.width, state.photo.height);
  const context = canvas.getContext("2d");
  context.drawImage(state.photo, 0, 0);
  context.globalAlpha = opacity;
  context.drawImage(state.colours, 0, 0);
  display(await canvas.convertToBlob({ type: "image/png" }), "overlay");
}

// The answer to POST /v1/segment?format=..., or null once the error is shown.
async function post(format, file) {
  const form = new FormData();
  form.append("image", file);
  const response = await api(`/v1/segment?format=${format}`, { method: "POST", body: form });
  if (response.ok) return response;
  await showError(response);
  return null;
}

// The chosen view of the current image; false if the server refused it (the error is shown).
async function render() {
  if (!$("confidence").checked) return compose().then(() => true);
  const file = state.file;
  if (!file) return true;
  if (!state.confidence) {
    const response = await post("confidence", file);
    if (!response) return false;
    const blob = await response.blob();
    if (state.file !== file) return true;  // another image was chosen meanwhile
    state.confidence = blob;
    if (!$("confidence").checked) return true;  // switched back meanwhile
  }
  display(state.confidence, "confidence");
  return true;
}

async function segment(file) {
  setStatus(`segmenting ${file.name} ...`);
  $("overlay").removeAttribute("data-ready");
  const started = performance.now();
  const response = await post("mask", file);
  if (!response) return;
  const timing = response.headers.get("Server-Timing") || "";
  const [photo, result] = await Promise.all([
    createImageBitmap(file, { imageOrientation: "from-image" }), colourLayer(await response.blob()),
  ]);
  Object.assign(state, { file, photo, colours: result.layer, counts: result.counts, confidence: null });
  if (!(await render())) return;
  renderLegend();
  $("caption").textContent = `${file.name}: ${photo.width} x ${photo.height} px`;
  $("overlay").dataset.ready = "true";
  setStatus(`done in ${Math.round(performance.now() - started)} ms (${timing})`);
}

function start() {
  loadModel().catch((e) => setStatus(`cannot read /v1/model: ${e}`, true));
  $("file").addEventListener("change", () => {
    if ($("file").files.length) segment($("file").files[0]).catch((e) => setStatus(String(e), true));
  });
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
    if (!$("confidence").checked) compose();
  });
  $("confidence").addEventListener("change", () => render().catch((e) => setStatus(String(e), true)));
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("token-form").hidden = true;
    setStatus("");
    loadModel().catch((e) => setStatus(`cannot read /v1/model: ${e}`, true));
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) segment(file).catch((e) => setStatus(String(e), true));
  });
}

document.addEventListener("DOMContentLoaded", start);
