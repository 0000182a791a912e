// ERDE demo page: calls only this service's own API (/models, /classify, /stats). No dependencies.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const DEBOUNCE_MS = 150;
const STATS_EVERY_MS = 3000;
const TOP_K = 5;

const state = {
  info: null,        // GET /models/{name} of the selected model
  image: null,       // the Blob being classified
  imageName: "",
  sent: 0,           // sequence number of the newest /classify request; older replies are dropped
  reply: null,       // the newest /classify reply shown
  timer: 0,
  previewUrl: "",
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

function svg(tag, attrs = {}, text = "") {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text) node.textContent = text;
  return node;
}

const pct = (x, digits = 1) => `${(100 * x).toFixed(digits)}%`;
const mega = (macs) => `${(macs / 1e6).toFixed(2)} M`;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Every call goes to this origin; error replies are {"error": {"code", "message"}}.
async function api(path, init) {
  const response = await fetch(path, init);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = body && body.error ? body.error : { code: `http_${response.status}`, message: response.statusText };
    throw new ApiError(response.status, error.code, error.message);
  }
  return body;
}

// ---- image input: file picker, drag and drop, paste, bundled samples ----

function setImage(blob, name) {
  state.image = blob;
  state.imageName = name;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(blob);
  const preview = $("preview");
  preview.src = state.previewUrl;
  preview.alt = `The image being classified: ${name}`;
  preview.hidden = false;
  for (const button of document.querySelectorAll(".samples button")) {
    button.setAttribute("aria-pressed", String(button.dataset.file === name));
  }
  classifyNow();
}

function firstImage(files) {
  return [...(files || [])].find((file) => file.type.startsWith("image/")) || (files && files[0]);
}

function wireImageInput() {
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) setImage(file, file.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("dragging");
    const file = firstImage(event.dataTransfer.files);
    if (file) setImage(file, file.name);
  });
  document.addEventListener("paste", (event) => {
    const file = firstImage(event.clipboardData && event.clipboardData.files);
    if (file) setImage(file, file.name || "pasted image");
  });
}

async function loadSamples() {
  const samples = await api("/ui/samples/samples.json");
  const list = $("samples");
  for (const sample of samples) {
    const button = el("button", { type: "button", title: `${sample.label} (test image ${sample.test_index})` },
      el("img", { src: `/ui/samples/${sample.file}`, alt: "" }), sample.label);
    button.dataset.file = sample.file;
    button.setAttribute("aria-pressed", "false");
    button.setAttribute("aria-label", `Sample: ${sample.label}, Fashion-MNIST test image ${sample.test_index}`);
    button.addEventListener("click", async () => {
      const response = await fetch(`/ui/samples/${sample.file}`);
      setImage(await response.blob(), sample.file);
    });
    list.append(el("li", {}, button));
  }
}

// ---- controls ----

function budget() {
  return Number($("budget").value);
}

function floorValue() {
  return $("floor-on").checked ? Number($("floor-value").value) : null;
}

function wireControls() {
  $("budget").addEventListener("input", () => {
    $("budget-value").value = budget().toFixed(2);
    drawCurve();
    classifySoon();
  });
  $("floor-on").addEventListener("change", () => {
    $("floor-value").disabled = !$("floor-on").checked;
    classifyNow();
  });
  $("floor-value").addEventListener("input", () => {
    $("floor-out").value = Number($("floor-value").value).toFixed(3);
    classifySoon();
  });
  $("model").addEventListener("change", () => selectModel($("model").value).catch(showError));
}

async function loadModels() {
  const models = await api("/models");
  const select = $("model");
  for (const model of models) select.append(el("option", { value: model.name, textContent: `${model.name} v${model.version}` }));
  if (!models.length) throw new ApiError(503, "no_model", "the service has no model loaded");
  await selectModel(models[0].name);
}

// The slider runs from the cheapest calibrated operating point (rounded up to its step) to 1.0.
async function selectModel(name) {
  state.info = await api(`/models/${encodeURIComponent(name)}`);
  const points = state.info.calibration;
  const cheapest = Math.min(...points.map((p) => p.expected_macs_fraction));
  const slider = $("budget");
  slider.min = (Math.ceil(cheapest * 100 - 1e-9) / 100).toFixed(2);
  slider.value = String(Math.max(budget(), Number(slider.min)));
  $("budget-value").value = budget().toFixed(2);
  $("budget-help").textContent = `From ${slider.min} (the cheapest operating point, ${pct(cheapest)} of the full ` +
    `model's MACs) to 1.0. Arrow keys move it by 0.01, Home and End jump to the ends.`;
  const accuracies = points.map((p) => p.expected_accuracy);
  const floor = $("floor-value");
  floor.min = (Math.floor(Math.min(...accuracies) * 100 - 1) / 100).toFixed(2);
  floor.max = Math.min(1, Math.ceil(Math.max(...accuracies) * 100 + 1) / 100).toFixed(2);
  $("floor-out").value = Number(floor.value).toFixed(3);
  state.reply = null;
  drawCurve();
  classifyNow();
}

// ---- classify ----

function classifySoon() {
  clearTimeout(state.timer);
  state.timer = setTimeout(classifyNow, DEBOUNCE_MS);
}

async function classifyNow() {
  clearTimeout(state.timer);
  if (!state.image || !state.info) return;
  const seq = ++state.sent;
  const form = new FormData();
  form.append("image", state.image, state.imageName);
  form.append("model", state.info.name);
  form.append("budget", String(budget()));
  form.append("top_k", String(Math.min(TOP_K, state.info.classes.length)));
  const floor = floorValue();
  if (floor !== null) form.append("min_accuracy", String(floor));
  try {
    const reply = await api("/classify", { method: "POST", body: form });
    if (seq === state.sent) showReply(reply);
  } catch (error) {
    if (seq === state.sent) showError(error);
  }
}

function showError(error) {
  const box = $("error");
  box.replaceChildren();
  box.dataset.code = error.code || "network";
  if (error.code === "unsatisfiable") {
    box.append(el("strong", { textContent: "No operating point meets this accuracy floor within the budget." }),
      el("span", { textContent: `${error.message} Lower the floor or raise the budget.` }));
  } else {
    box.append(el("strong", { textContent: "The service refused this request." }),
      el("span", { textContent: `${error.message}${error.code ? ` (${error.code})` : ""}` }));
  }
  box.hidden = false;
  $("result").classList.add("stale");
}

function showReply(reply) {
  state.reply = reply;
  $("error").hidden = true;
  $("placeholder").hidden = true;
  const result = $("result");
  result.hidden = false;
  result.classList.remove("stale");
  Object.assign(result.dataset, {
    budget: String(reply.budget), exit: String(reply.exit), macs: String(reply.macs), label: reply.label,
    image: state.imageName,
  });
  $("answer-label").textContent = reply.label;
  $("answer-confidence").textContent = pct(reply.confidence);
  $("answer-summary").textContent = `answered at exit ${reply.exit + 1} of ${reply.exits}`;
  showNotice(reply);
  drawStages(reply);
  const full = state.info.macs_per_exit[state.info.macs_per_exit.length - 1];
  $("macs-bar").style.width = pct(reply.macs_fraction, 2);
  $("macs-text").textContent = `${mega(reply.macs)} of ${mega(full)} MACs (${pct(reply.macs_fraction)}): ` +
    `${pct(1 - reply.macs_fraction)} saved against full depth`;
  $("expected-accuracy").textContent = pct(reply.expected_accuracy);
  $("threshold").textContent = reply.threshold.toFixed(3);
  const ms = reply.latency_ms;
  $("latency").textContent = `${ms.total.toFixed(1)} ms (decode ${ms.decode.toFixed(1)}, ` +
    `queue ${ms.queue.toFixed(1)}, inference ${ms.inference.toFixed(1)})`;
  $("topk").replaceChildren(...reply.top_k.map((c) => barRow(c.label, c.probability, pct(c.probability))));
  drawCurve();
}

function showNotice(reply) {
  const notes = [];
  if (reply.budget_clamped) notes.push("The budget is below the cheapest operating point: answered at the cheapest.");
  if (reply.degraded) notes.push(`The service is under load: answered at budget ${reply.budget} instead of the ` +
    `${reply.requested_budget} asked for.`);
  $("notice").textContent = notes.join(" ");
  $("notice").hidden = !notes.length;
}

function barRow(label, fraction, text) {
  const fill = el("div", { className: "bar-fill" });
  fill.style.width = pct(Math.min(1, Math.max(0, fraction)), 2);
  return el("li", { className: "bar-row" }, el("span", { textContent: label }),
    el("div", { className: "bar-track" }, fill), el("span", { className: "bar-value", textContent: text }));
}

// The reply carries the entropy of the answering exit only: earlier exits are known to have been at or
// above θ (the network went on), later ones did not run. Nothing else is drawn.
function drawStages(reply) {
  const macs = state.info.macs_per_exit;
  const maxEntropy = Math.log(state.info.classes.length);
  const stages = macs.map((cumulative, i) => {
    const stage = el("li", { className: "stage" }, el("span", { className: "stage-name", textContent: `Exit ${i + 1}` }),
      el("span", { className: "stage-macs", textContent: `${mega(cumulative)} MACs` }));
    if (i < reply.exit) {
      stage.classList.add("lit");
      stage.append(el("span", { className: "stage-status", textContent: "entropy ≥ θ: went on" }));
    } else if (i === reply.exit) {
      stage.classList.add("lit", "answered");
      stage.setAttribute("aria-current", "step");
      stage.append(el("span", { className: "stage-status", textContent: answeredText(reply, i === macs.length - 1) }),
        entropyGauge(reply.entropy, reply.threshold, maxEntropy));
    } else {
      stage.append(el("span", { className: "stage-status", textContent: "not run" }));
    }
    return stage;
  });
  $("stages").replaceChildren(...stages);
}

function answeredText(reply, last) {
  const h = reply.entropy.toFixed(3);
  const t = reply.threshold.toFixed(3);
  if (reply.entropy < reply.threshold) return `entropy ${h} < θ ${t}: answered`;
  if (last) return `entropy ${h} ≥ θ ${t}: the last exit always answers`;
  return `entropy ${h} ≥ θ ${t}: stopped by max_exit`;
}

function entropyGauge(entropy, threshold, maxEntropy) {
  const fill = el("div", { className: "gauge-fill" });
  fill.style.width = pct(Math.min(1, entropy / maxEntropy), 2);
  const tick = el("div", { className: "gauge-tick" });
  tick.style.left = pct(Math.min(1, threshold / maxEntropy), 2);
  const gauge = el("div", { className: "gauge", title: `entropy (bar) and θ (tick), on a scale to ln ${state.info.classes.length}` },
    fill, tick);
  gauge.setAttribute("aria-hidden", "true");
  return gauge;
}

// ---- calibration curve (inline SVG) ----

const CHART = { width: 480, height: 300, left: 52, right: 16, top: 16, bottom: 44 };

function distinctPoints(points) {
  const seen = new Map();
  for (const p of points) seen.set(p.threshold, p);
  return [...seen.values()].sort((a, b) => a.expected_macs_fraction - b.expected_macs_fraction);
}

// Where the operating point that answered sits: the calibration point with the reply's θ; when the
// budget falls between the listed points, its accuracy is exact and its MACs are only known to be
// within the budget, so it is drawn at the budget, dashed.
function operatingPoint(reply, points) {
  const match = points.find((p) => Math.abs(p.threshold - reply.threshold) < 1e-9);
  if (match) return { x: match.expected_macs_fraction, y: match.expected_accuracy, exact: true };
  return { x: reply.budget === null ? 1 : reply.budget, y: reply.expected_accuracy, exact: false };
}

function drawCurve() {
  const chart = $("curve-chart");
  if (!state.info) return;
  const points = distinctPoints(state.info.calibration);
  const accuracies = points.map((p) => p.expected_accuracy);
  const yLow = Math.floor(Math.min(...accuracies) * 100 - 1) / 100;
  const yHigh = Math.ceil(Math.max(...accuracies) * 100 + 0.5) / 100;
  const { width, height, left, right, top, bottom } = CHART;
  const sx = (x) => left + x * (width - left - right);
  const sy = (y) => height - bottom - ((y - yLow) / (yHigh - yLow)) * (height - top - bottom);
  const parts = [];
  for (let i = 0; i <= 5; i++) {
    const x = i / 5;
    parts.push(svg("line", { class: "grid", x1: sx(x), x2: sx(x), y1: sy(yLow), y2: sy(yHigh) }),
      svg("text", { x: sx(x), y: height - bottom + 16, "text-anchor": "middle" }, x.toFixed(1)));
  }
  const ySteps = Math.round((yHigh - yLow) * 100);
  const yEvery = Math.max(1, Math.ceil(ySteps / 6));
  for (let i = 0; i <= ySteps; i += yEvery) {
    const y = yLow + i / 100;
    parts.push(svg("line", { class: "grid", x1: sx(0), x2: sx(1), y1: sy(y), y2: sy(y) }),
      svg("text", { x: left - 6, y: sy(y) + 4, "text-anchor": "end" }, pct(y, 0)));
  }
  parts.push(svg("line", { class: "axis", x1: sx(0), x2: sx(1), y1: sy(yLow), y2: sy(yLow) }),
    svg("line", { class: "axis", x1: sx(0), x2: sx(0), y1: sy(yLow), y2: sy(yHigh) }),
    svg("text", { class: "axis-title", x: sx(0.5), y: height - 8, "text-anchor": "middle" },
      "expected MACs, fraction of the full model"),
    svg("text", { class: "axis-title", x: 12, y: sy((yLow + yHigh) / 2), "text-anchor": "middle",
      transform: `rotate(-90 12 ${sy((yLow + yHigh) / 2)})` }, "expected accuracy"));
  parts.push(svg("polyline", { id: "curve-line", class: "curve",
    points: points.map((p) => `${sx(p.expected_macs_fraction).toFixed(1)},${sy(p.expected_accuracy).toFixed(1)}`).join(" ") }));
  for (const p of points) {
    const dot = svg("circle", { class: "point", cx: sx(p.expected_macs_fraction), cy: sy(p.expected_accuracy), r: 3.5 });
    dot.append(svg("title", {}, `θ ${p.threshold.toFixed(3)}: ${pct(p.expected_accuracy)} at ${pct(p.expected_macs_fraction)} of the MACs`));
    parts.push(dot);
  }
  parts.push(svg("line", { id: "curve-budget", class: "budget-line", x1: sx(budget()), x2: sx(budget()), y1: sy(yLow), y2: sy(yHigh) }));
  if (state.reply && state.reply.model === state.info.name) {
    const at = operatingPoint(state.reply, points);
    const marker = svg("circle", { id: "curve-marker", class: at.exact ? "marker" : "marker approximate",
      cx: sx(at.x), cy: sy(at.y), r: 8 });
    marker.dataset.x = String(at.x);
    marker.dataset.y = String(at.y);
    marker.append(svg("title", {}, `operating point: θ ${state.reply.threshold.toFixed(3)}, expected accuracy ` +
      `${pct(at.y)}${at.exact ? `, expected MACs ${pct(at.x)}` : `, expected MACs within the budget ${at.x}`}`));
    parts.push(marker);
  }
  chart.replaceChildren(...parts);
}

// ---- live service state ----

async function pollStats() {
  try {
    showStats(await api("/stats"));
  } catch (error) {
    $("live-status").textContent = `Live state unavailable: ${error.message}`;
  } finally {
    setTimeout(pollStats, STATS_EVERY_MS);
  }
}

function showStats(stats) {
  const model = stats.models.find((m) => state.info && m.name === state.info.name) || stats.models[0];
  $("live-rate").textContent = stats.requests_per_s === null ? "–" : stats.requests_per_s.toFixed(1);
  $("live-requests").textContent = model ? String(model.requests) : "–";
  $("live-saved").textContent = model && model.compute_saved !== null ? pct(model.compute_saved) : "–";
  if (model) {
    const images = model.exits.reduce((a, b) => a + b, 0);
    $("live-exits").replaceChildren(...model.exits.map((count, i) => {
      const perSecond = model.exits_per_s === null ? "" : `, ${model.exits_per_s[i].toFixed(1)}/s now`;
      const row = barRow(`Exit ${i + 1}`, images ? count / images : 0, images ? pct(count / images, 0) : "–");
      row.title = `${count} images${perSecond}`;
      return row;
    }));
    $("live-budgets").replaceChildren(...model.budgets.map((b) => {
      const row = barRow(`Asked ≤ ${b.budget}`, Math.min(b.spent, 1), `${b.spent.toFixed(3)} (${(b.spent / b.budget).toFixed(2)}×)`);
      row.title = `${b.replies} replies asked for a budget up to ${b.budget}; they spent ${b.spent.toFixed(3)} of the full MACs`;
      return row;
    }));
  }
  $("live-status").textContent = `Updated ${new Date().toLocaleTimeString()}` +
    (stats.window_s === null ? "" : `; rates over the last ${stats.window_s.toFixed(0)} s`) + ".";
}

// ---- start ----

document.addEventListener("DOMContentLoaded", () => {
  wireImageInput();
  wireControls();
  Promise.all([loadModels(), loadSamples()]).catch(showError);
  pollStats();
});
