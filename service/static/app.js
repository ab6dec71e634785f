// The demo page: one image in, attention maps and nearest neighbours out. Plain JS, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { image: null, attention: null, galleryOffset: 0, blob: null };
const PAGE = 24;

function showError(message) { $("#error").textContent = message || ""; }

async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    const error = new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    error.status = response.status;
    throw error;
  }
  return response;
}

function authHeaders() {
  const token = $("#token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// Colour ramp from dark blue through yellow: readable on photos and on grey clothing.
function heat(v) {
  const r = Math.min(255, Math.max(0, 255 * Math.min(1, 2 * v)));
  const g = Math.min(255, Math.max(0, 255 * (v < 0.5 ? v : 1 - (v - 0.5) * 0.6)));
  const b = Math.min(255, Math.max(0, 255 * (1 - 2 * v)));
  return [r, g, b];
}

// DINO's masks: sort the map ascending, keep the patches whose cumulative share exceeds 1 - t,
// i.e. the smallest set of patches holding the share t of the attention.
function mask(values, threshold) {
  const order = values.map((v, i) => [v, i]).sort((a, b) => a[0] - b[0]);
  const total = values.reduce((s, v) => s + v, 0) || 1;
  const keep = new Array(values.length).fill(false);
  let cum = 0;
  for (const [v, i] of order) { cum += v / total; keep[i] = cum > 1 - threshold; }
  return keep;
}

function flat(map) { return Array.isArray(map[0]) ? map.flat() : map; }

function drawMap(canvas, values, grid, threshold, withMask) {
  const [h, w] = grid;
  const img = state.image;
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const max = Math.max(...values) || 1;
  const keep = withMask ? mask(values, threshold) : null;
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const sctx = small.getContext("2d");
  const pixels = sctx.createImageData(w, h);
  values.forEach((v, i) => {
    // Outside the mask: darkened; inside (or without a mask): the heat colour, image showing through.
    const colour = keep && !keep[i] ? [15, 18, 28, 200] : [...heat(v / max), keep ? 90 : 150];
    pixels.data.set(colour, i * 4);
  });
  sctx.putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = !withMask;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function renderAttention() {
  const att = state.attention;
  const box = $("#maps");
  box.textContent = "";
  if (!att) return;
  const threshold = Number($("#threshold").value);
  const withMask = $("#show-mask").checked;
  const heads = att.maps.map(flat);
  const mean = heads[0].map((_, i) => heads.reduce((s, m) => s + m[i], 0) / heads.length);
  [["mean of heads", mean], ...heads.map((m, i) => [`head ${i}`, m])].forEach(([label, values]) => {
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.setAttribute("aria-label", `attention ${label}`);
    drawMap(canvas, values, att.grid, threshold, withMask);
    const caption = document.createElement("figcaption");
    caption.textContent = label;
    figure.append(canvas, caption);
    box.append(figure);
  });
}

function itemFigure(item, caption) {
  const figure = document.createElement("figure");
  figure.className = "result";
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = item.id;
  img.src = `items/${encodeURIComponent(item.id)}/thumbnail`;
  const text = document.createElement("figcaption");
  text.innerHTML = caption;
  figure.append(img, text);
  figure.addEventListener("click", () => pickItem(item.id));
  return figure;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function describe(metadata) {
  if (!metadata || typeof metadata !== "object") return "";
  return Object.entries(metadata).slice(0, 3)
    .map(([k, v]) => `${escapeHtml(k)}: ${escapeHtml(typeof v === "object" ? JSON.stringify(v) : v)}`)
    .join("<br>");
}

function renderResults(results) {
  const box = $("#results");
  box.textContent = "";
  $("#neighbours").hidden = false;
  if (!results.length) { box.textContent = "The index is empty: add images to search them."; return; }
  results.forEach((r) => box.append(itemFigure(r,
    `<span class="score">${r.score.toFixed(3)}</span> ${escapeHtml(r.id)}<br>${describe(r.metadata)}`)));
}

function k() { return Math.max(1, Math.min(50, Number($("#k").value) || 12)); }

// The filter box takes `key=value, key2=value2` (numbers and true/false typed) or a JSON object;
// the server checks it either way and says what is wrong.
function filterJson() {
  const text = $("#filter").value.trim();
  if (!text || text.startsWith("{")) return text;
  const out = {};
  for (const part of text.split(",")) {
    const [key, ...rest] = part.split("=");
    if (!key.trim() || !rest.length) throw new Error("filter: write key=value, or a JSON object");
    const raw = rest.join("=").trim();
    const num = raw !== "" && !Number.isNaN(Number(raw));
    out[key.trim()] = raw === "true" ? true : raw === "false" ? false : num ? Number(raw) : raw;
  }
  return JSON.stringify(out);
}

function searchNeighbours(blob, itemId) {
  let filter;
  try { filter = filterJson(); } catch (e) { showError(e.message); return Promise.resolve(); }
  const query = itemId
    ? api(`similar?id=${encodeURIComponent(itemId)}&k=${k()}` +
          (filter ? `&filter=${encodeURIComponent(filter)}` : ""))
    : (() => { const f = new FormData(); f.append("image", blob, "upload"); f.append("k", k());
               if (filter) f.append("filter", filter);
               return api("similar", { method: "POST", body: f }); })();
  return query.then((r) => r.json()).then((d) => renderResults(d.results))
    .catch((e) => showError(e.message));
}

async function analyse(blob, itemId) {
  showError("");
  state.blob = blob;
  state.itemId = itemId;
  $("#actions").hidden = Boolean(itemId);
  $("#add-status").textContent = "";
  const url = URL.createObjectURL(blob);
  const drop = $("#drop");
  drop.style.backgroundImage = `url(${url})`;
  drop.classList.add("has-image");
  state.image = await new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot display this image"));
    img.src = url;
  }).catch((e) => { showError(e.message); return null; });

  const form = new FormData();
  form.append("image", blob, "upload");
  const attention = api("attention", { method: "POST", body: form })
    .then((r) => r.json())
    .then((att) => { state.attention = att; $("#attention").hidden = false; renderAttention(); })
    .catch((e) => {
      state.attention = null;
      $("#attention").hidden = true;
      if (e.status !== 409) showError(e.message); // 409: this model has no attention (ResNet)
    });
  await Promise.all([attention, searchNeighbours(blob, itemId)]);
}

async function pickItem(id) {
  try {
    const blob = await (await api(`items/${encodeURIComponent(id)}/thumbnail`)).blob();
    await analyse(blob, id);
    window.scrollTo({ top: 0, behavior: "smooth" });
  } catch (e) { showError(e.message); }
}

async function loadGallery() {
  try {
    const data = await (await api(`items?offset=${state.galleryOffset}&limit=${PAGE}`)).json();
    data.items.forEach((item) => $("#gallery").append(itemFigure(item, describe(item.metadata) || escapeHtml(item.id))));
    state.galleryOffset += data.items.length;
    $("#gallery-more").hidden = state.galleryOffset >= data.total;
  } catch (e) { showError(e.message); }
}

async function addToIndex() {
  if (!state.blob) return;
  const form = new FormData();
  form.append("images", state.blob, "upload");
  $("#add").disabled = true;
  try {
    const data = await (await api("items", { method: "POST", body: form, headers: authHeaders() })).json();
    $("#add-status").textContent = `added as ${data.ids.join(", ")}`;
  } catch (e) {
    $("#add-status").textContent = e.status === 401 ? "a valid API token is required" : e.message;
  } finally { $("#add").disabled = false; }
}

// Duplicate groups: GET /duplicates, a page of groups at a time.
const DUP_PAGE = 10;
const dup = { offset: 0, threshold: null };

function renderGroup(group) {
  const box = document.createElement("div");
  box.className = "dup-group";
  const title = document.createElement("h3");
  title.textContent = `${group.size} items · best score ${group.max_score.toFixed(3)}`;
  const grid = document.createElement("div");
  grid.className = "grid";
  group.items.forEach((m) => grid.append(itemFigure(m,
    `<span class="score">${m.best_score.toFixed(3)}</span> ${escapeHtml(m.id)}`)));
  box.append(title, grid);
  return box;
}

async function loadDuplicates(fresh) {
  if (fresh) {
    dup.offset = 0;
    dup.threshold = Number($("#dup-threshold").value);
    $("#dup-groups").textContent = "";
  }
  $("#dup-status").textContent = "searching…";
  try {
    const query = `threshold=${dup.threshold}&offset=${dup.offset}&limit=${DUP_PAGE}`;
    const data = await (await api(`duplicates?${query}`)).json();
    data.groups.forEach((g) => $("#dup-groups").append(renderGroup(g)));
    dup.offset += data.groups.length;
    $("#dup-status").textContent = `${data.total_groups} groups among ${data.items_scanned} items`;
    $("#dup-more").hidden = dup.offset >= data.total_groups;
  } catch (e) {
    $("#dup-status").textContent = e.message;
    $("#dup-more").hidden = true;
  }
}

function init() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (e) => e.target.files[0] && analyse(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files[0]) analyse(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("#file").click(); });
  $("#threshold").addEventListener("input", () => {
    $("#threshold-value").textContent = Number($("#threshold").value).toFixed(2);
    renderAttention();
  });
  $("#show-mask").addEventListener("change", renderAttention);
  $("#add").addEventListener("click", addToIndex);
  $("#filter").addEventListener("change", () => {
    showError("");
    if (state.blob) searchNeighbours(state.blob, state.itemId);
  });
  $("#gallery-more").addEventListener("click", loadGallery);
  $("#dup-find").addEventListener("click", () => loadDuplicates(true));
  $("#dup-more").addEventListener("click", () => loadDuplicates(false));
  $("#gallery-box").addEventListener("toggle", () => {
    if ($("#gallery-box").open && !state.galleryOffset) loadGallery();
  }, { once: false });
  api("models").then((r) => r.json()).then((m) => {
    $("#model-info").textContent = `model ${m.name} · ${m.arch}` +
      (m.patch_size ? `/${m.patch_size}` : "") + ` · ${m.served_dim ?? m.embed_dim}-d embeddings` +
      (m.n_register_tokens ? ` · ${m.n_register_tokens} ${m.lineage === "dinov3" ? "storage" : "register"} tokens (not in the maps)` : "") +
      (m.embedding_transform ? ` · ${m.embedding_transform.kind === "whiten" ? "whitened" : "centred"} to ${m.embedding_transform.output_dim}-d` : "");
  }).catch((e) => { $("#model-info").textContent = `model not ready: ${e.message}`; });
}

init();
