/**
 * lab.js — the init lab's comparison view (/labs/{id}): five runs that differ only
 * in their initialisation, compared layer by layer at one probe step.
 *
 * Owns: the step slider over the probe steps every run has (default: the latest
 * common one, following new steps while the runs train), and at that step: activation
 * mean and std against depth, dead and saturated ratios per layer (or a note saying why
 * no layer has one: a tanh lab has no dead units), symmetry (each
 * layer's unit_spread, the spread across units of their mean outputs, over its std: a
 * scale-free share, with exact zeros labelled "identical") and a layers x schemes grid
 * of histograms.
 * A button launches the same lab with batch norm switched the other way (BN lowers the
 * dependence on initialisation: compare the two views), once an inline confirm naming
 * the five runs and their steps is accepted (Escape or Cancel backs out): one stray click
 * started five trainers. The "?" helps close on Escape
 * and on a click outside them (controls.js's closeDropdowns, as on the run page).
 * Each chart is a named figure with a summary of what it shows at the step (charts.js
 * describeChart; labSummary), each histogram cell an image named by its run, layer and range.
 * Sets document.body.dataset.ready = "1" once every chart has drawn real data.
 * Never: changes a run (read-only), draws a step that some run lacks, or hands Plotly a
 * layer or run name unescaped (plotlyText: Plotly renders HTML in labels and hovers).
 */

import { ApiError, getJSON, postJSON, runUrl } from "./api.js";
import { COLORS, PLOT_CONFIG, plotReact, baseLayout, describeChart, formatNumber, hideNote, logAxis, noteLayout, plotlyReady,
  plotlyText, stepText } from "./charts.js";
import { closeDropdowns } from "./controls.js";
import { drawBars } from "./heatmaps.js";
import { setCondition, toast } from "./notify.js";

const ENDED = new Set(["finished", "failed", "stopped", "lost", "deleted"]);
const REFRESH_MS = 3000;
const $ = (id) => document.getElementById(id);
const labId = document.body.dataset.labId;

const state = { lab: null, layers: [], steps: [], step: null, following: true, at: new Map(), loading: 0 };

// Each chart a figure named by its card's heading (the grid's heading holds the step: named
// without it); a screen reader heard their tick labels and nothing else.
const FIGURES = ["chart-mean", "chart-std", "chart-dead", "chart-sat", "chart-sym"];
for (const id of FIGURES) describeChart($(id))?.append("no probe step yet");
const gridSummary = describeChart($("lab-grid"), "Histograms per layer"); // drawGrid puts it back after replaceChildren
gridSummary?.append("no probe step yet");

/**
 * A chart's summary at the chosen step: its layers, and per run its first and last layer's
 * value ("Step 100, 3 layers, fc1 to fc3. mean, first to last layer: zero 0 to 0; he 0.4 to
 * 0.6."), or `note` (why it has no line).
 */
function labSummary(id, order, what, valueOf, note = null) {
  const p = describeChart($(id));
  if (!p) return;
  if (!order.length) { p.textContent = "no probe step yet"; return; }
  const head = `Step ${stepText(state.step)}, ${order.length} layer${order.length === 1 ? "" : "s"}`
    + `${order.length > 1 ? `, ${order[0]} to ${order[order.length - 1]}` : `, ${order[0]}`}.`;
  if (note) { p.textContent = `${head} ${note}`; return; }
  const none = formatNumber(null);
  const values = state.lab.runs.map((r) => [r.label, valueOf(r, order[0]), valueOf(r, order[order.length - 1])]);
  if (values.every(([, first, last]) => first === none && last === none)) {
    p.textContent = `${head} No ${what} recorded at this step.`;
    return;
  }
  const runs = values.map(([label, first, last]) => (order.length > 1 ? `${label} ${first} to ${last}` : `${label} ${first}`));
  p.textContent = `${head} ${what}${order.length > 1 ? ", first to last layer" : ""}: ${runs.join("; ")}.`;
}

function intersect(lists) {
  if (!lists.length) return [];
  let common = new Set(lists[0]);
  for (const l of lists.slice(1)) common = new Set(l.filter((s) => common.has(s)));
  return [...common].sort((a, b) => a - b);
}

async function loadLab() {
  state.lab = await getJSON(`/api/labs/${encodeURIComponent(labId)}`);
  const p = state.lab.params || {};
  $("lab-bn").textContent = `Same lab, batch norm ${p.batch_norm ? "off" : "on"}`;
  $("lab-params").textContent = `${p.activation}${p.batch_norm ? " + batch norm" : ""} · depth ${p.depth} · width ${p.width} · ${p.dataset} · seed ${p.seed} · ${p.steps} steps`;
  $("legend").replaceChildren(...state.lab.runs.map((r, i) => {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    const a = document.createElement("a");
    sw.className = "swatch";
    sw.style.background = COLORS[i % COLORS.length];
    a.href = `/runs/${encodeURIComponent(r.id)}`;
    a.textContent = `${r.label} (${r.status})`;
    li.append(sw, a);
    return li;
  }));
}

async function loadSteps() {
  const runs = state.lab.runs.filter((r) => r.status !== "deleted");
  if (!state.layers.length) {
    for (const r of runs) {
      const d = await getJSON(runUrl(r.id)).catch(() => null);
      if (d?.layers?.length) { state.layers = d.layers.map((l) => l.name); break; }
    }
  }
  const all = await Promise.all(runs.map((r) => getJSON(runUrl(r.id, "probe_steps")).then((s) => s.steps).catch(() => [])));
  // A run that ended without a probe step will never have one: the others are compared
  // without it (its empty list left nothing in common, and the page waited for good).
  const none = runs.filter((r, i) => ENDED.has(r.status) && !all[i].length);
  const compared = all.filter((_, i) => !none.includes(runs[i]));
  const steps = intersect(compared);
  const slider = $("lab-step");
  const grew = steps.length !== state.steps.length;
  state.steps = steps;
  slider.max = String(Math.max(0, steps.length - 1));
  const missing = none.length ? ` · no probe data from ${none.map((r) => `${r.label} (${r.status})`).join(", ")}` : "";
  const by = compared.length === 1 ? "from 1 run"
    : `shared by ${compared.length === runs.length ? "all " : ""}${compared.length} runs`;
  $("lab-steps-note").textContent = steps.length
    ? `${steps.length} probe step${steps.length === 1 ? "" : "s"} ${by}${missing}`
    : (compared.length ? "waiting for every run's first probe step…" : "no run recorded a probe step") + missing;
  if (steps.length && (state.following || state.step === null) && grew) {
    slider.value = String(steps.length - 1);
    await showStep(steps[steps.length - 1]);
  }
}

async function showStep(step) {
  state.step = step;
  $("lab-step-value").textContent = String(step);
  // the slider's value is an index into the steps: it is read out as the step it shows
  $("lab-step").setAttribute("aria-valuetext", `step ${step}`);
  const ticket = ++state.loading;
  const answers = await Promise.all(state.lab.runs.map((r) =>
    getJSON(runUrl(r.id, "histogram", { step })).catch(() => ({ step: null, layers: [] }))));
  if (ticket !== state.loading) return; // a later slider move wins
  state.at = new Map(state.lab.runs.map((r, i) => [r.id, answers[i]]));
  await draw();
}

/** Layer order: the run's declared order, restricted to layers that have stats. */
function layerOrder() {
  const seen = new Set();
  for (const a of state.at.values()) for (const l of a.layers) seen.add(l.name);
  const order = state.layers.filter((n) => seen.has(n));
  for (const n of seen) if (!order.includes(n)) order.push(n);
  return order;
}

function statOf(runId, layer, stat) {
  const l = state.at.get(runId)?.layers.find((x) => x.name === layer);
  return l ? l[stat] ?? null : null;
}

/**
 * A line a run over the layers. Names reach Plotly escaped (plotlyText): layer names are
 * the x axis's categories, and Plotly renders HTML in them, in trace names and in hovers.
 */
function lineData(order, stat, transform = (v) => v) {
  const x = order.map(plotlyText);
  return state.lab.runs.map((r, i) => ({
    type: "scatter", mode: "lines+markers", name: plotlyText(r.label), x,
    y: order.map((n) => transform(statOf(r.id, n, stat))),
    line: { color: COLORS[i % COLORS.length], width: 1.5 }, marker: { size: 5 },
    hovertemplate: `${plotlyText(r.label)}: %{y:.4g}<extra>%{x}</extra>`,
  }));
}

/**
 * Why a ratio chart has no line: no layer of any run has the statistic (a tanh lab's dead
 * ratio, a ReLU lab's saturation). It drew empty axes and said nothing, while the run page
 * says tanh/sigmoid have no dead region. Null when some layer has it.
 */
const NO_RATIO = {
  dead_ratio: (act) => `no layer has a dead-unit ratio: ${act || "this activation"} has no dead region `
    + "(only ReLU-family units die: their output stays 0)",
  saturated_ratio: (act) => `no layer has a saturated ratio: only bounded activations (tanh, sigmoid) saturate`
    + `${act ? `, not ${act}` : ""}`,
};

function ratioNote(order, stat) {
  const any = state.lab.runs.some((r) => order.some((n) => {
    const v = statOf(r.id, n, stat);
    return v !== null && v !== undefined;
  }));
  return any ? null : NO_RATIO[stat](state.lab.params?.activation);
}

/** A ratio chart: its lines, or the note saying why it has none (ratioNote). */
function ratioChart(div, order, stat, yTitle) {
  const note = order.length ? ratioNote(order, stat) : null;
  if (note) {
    div.dataset.empty = "1";
    return plotReact(window.Plotly, div, [], noteLayout(div, note), PLOT_CONFIG);
  }
  delete div.dataset.empty;
  hideNote(div);
  return plotReact(window.Plotly, div, lineData(order, stat), layout(yTitle, { range: [-0.02, 1.02] }), PLOT_CONFIG);
}

/** The std chart's y axis: log (labelled as the run page's: logAxis) or linear. */
function stdAxis(order, log) {
  if (!log) return { type: "linear", tickmode: "auto" };
  const ys = state.lab.runs.flatMap((r) => order.map((n) => statOf(r.id, n, "std")))
    .filter((v) => v !== null && v > 0 && Number.isFinite(v));
  return ys.length ? logAxis(Math.min(...ys), Math.max(...ys)) : { type: "log" };
}

/**
 * The symmetry chart's scale-free measure: a layer's unit_spread over its std, the share of
 * its activations' spread that lies between units (0..1 for the population std the trainer
 * sends). Absolute spreads ran from ~2 (normal 1.0) to ~1e-9 (normal 0.01, deep), so
 * normal 0.01's units, which do differ, drew as zero init's exact 0. 0 when the units are
 * identical (spread exactly 0, even where every value is 0 and std too); null without both.
 */
function symmetryOf(spread, std) {
  if (spread === null || spread === undefined || std === null || std === undefined) return null;
  if (spread === 0) return 0;
  return std > 0 ? spread / std : null;
}

function layout(yTitle, extra = {}) {
  return baseLayout({
    hovermode: "closest",
    xaxis: { ...baseLayout().xaxis, type: "category", title: { text: "layer (input → output)" }, tickangle: -30 },
    yaxis: { ...baseLayout().yaxis, title: { text: yTitle }, ...extra },
    margin: { l: 56, r: 12, t: 8, b: 70 },
  });
}

function drawGrid(order) {
  const grid = $("lab-grid");
  const runs = state.lab.runs;
  grid.style.gridTemplateColumns = `minmax(90px, 140px) repeat(${runs.length}, minmax(110px, 1fr))`;
  const cells = [document.createElement("div")];
  runs.forEach((r, i) => {
    const h = document.createElement("div");
    h.className = "colhead";
    h.style.color = COLORS[i % COLORS.length];
    h.textContent = r.label;
    cells.push(h);
  });
  const canvases = [];
  for (const name of order) {
    const head = document.createElement("div");
    head.className = "rowhead";
    head.textContent = name;
    head.title = name;
    cells.push(head);
    for (const r of runs) {
      const l = state.at.get(r.id)?.layers.find((x) => x.name === name);
      const el = document.createElement("div");
      el.className = "multiple";
      el.dataset.layer = name;
      el.dataset.run = r.id;
      // an image named by its run, layer and range; its title (the statistics) describes it
      el.setAttribute("role", "img");
      el.setAttribute("aria-label", `${r.label}, ${name}, values from ${formatNumber(l?.lo ?? null)} to ${formatNumber(l?.hi ?? null)}`);
      el.innerHTML = '<canvas></canvas><div class="range" aria-hidden="true"><span></span><span></span></div>';
      const spans = el.querySelectorAll(".range span");
      spans[0].textContent = formatNumber(l?.lo ?? null);
      spans[1].textContent = formatNumber(l?.hi ?? null);
      const counts = l?.counts || [];
      el.dataset.counts = JSON.stringify(counts);
      el.title = `${r.label} · ${name} at step ${state.step}\nmean ${formatNumber(l?.mean)}\nstd ${formatNumber(l?.std)}\nzero ${formatNumber(l?.zero_frac)}`;
      canvases.push([el.querySelector("canvas"), counts]);
      cells.push(el);
    }
  }
  grid.replaceChildren(...cells);
  $("grid-step").textContent = String(state.step);
  const p = gridSummary;
  if (p) {
    p.textContent = order.length ? `${order.length} layer${order.length === 1 ? "" : "s"} × ${runs.length} schemes at step `
      + `${stepText(state.step)}: each cell one scheme's activation histogram of one layer.` : "no probe step yet";
    grid.prepend(p); // replaceChildren took it out (first: the cells keep their :last-child)
  }
  for (const [canvas, counts] of canvases) drawBars(canvas, counts);
}

async function draw() {
  await plotlyReady();
  const P = window.Plotly;
  const order = layerOrder();
  const logStd = $("std-log").checked;
  const sym = state.lab.runs.map((r, i) => {
    const spread = order.map((n) => statOf(r.id, n, "unit_spread"));
    const y = order.map((n, k) => symmetryOf(spread[k], statOf(r.id, n, "std")));
    return { type: "bar", name: plotlyText(r.label), x: order.map(plotlyText), y, marker: { color: COLORS[i % COLORS.length] },
      customdata: spread.map((v) => formatNumber(v)),
      // upright beside its empty bar at full size: "outside" shrank it to the bar's width
      text: spread.map((v) => (v === 0 ? "identical" : "")), textposition: "outside", textangle: -90,
      constraintext: "none", cliponaxis: false, textfont: { size: 10 },
      hovertemplate: `${plotlyText(r.label)}: unit spread / std %{y:.3g} (spread %{customdata})<extra>%{x}</extra>` };
  });
  await Promise.all([
    plotReact(P, $("chart-mean"), lineData(order, "mean"), layout("mean"), PLOT_CONFIG),
    plotReact(P, $("chart-std"), lineData(order, "std", (v) => (logStd && v === 0 ? null : v)),
      layout("std", stdAxis(order, logStd)), PLOT_CONFIG),
    ratioChart($("chart-dead"), order, "dead_ratio", "dead ratio"),
    ratioChart($("chart-sat"), order, "saturated_ratio", "saturated ratio"),
    plotReact(P, $("chart-sym"), sym, { ...layout("unit spread / std", { rangemode: "tozero" }), barmode: "group" }, PLOT_CONFIG),
  ]);
  drawGrid(order);
  const stat = (name, fmt = formatNumber) => (r, layer) => fmt(statOf(r.id, layer, name));
  labSummary("chart-mean", order, "mean", stat("mean"));
  labSummary("chart-std", order, "std", stat("std"));
  labSummary("chart-dead", order, "dead ratio", stat("dead_ratio"), ratioNote(order, "dead_ratio"));
  labSummary("chart-sat", order, "saturated ratio", stat("saturated_ratio"), ratioNote(order, "saturated_ratio"));
  labSummary("chart-sym", order, "unit spread / std", (r, layer) => {
    const v = symmetryOf(statOf(r.id, layer, "unit_spread"), statOf(r.id, layer, "std"));
    return v === 0 ? "0 (identical units)" : formatNumber(v);
  });
  if (order.length) document.body.dataset.ready = "1";
  document.body.dataset.step = String(state.step);
}

/** The twin lab in words: which runs, what changes, and what they cost in steps. */
function twinText() {
  const p = state.lab.params || {};
  const runs = state.lab.runs;
  const steps = Number(p.steps) || 0;
  return `Launch ${runs.length} training runs (${runs.map((r) => r.label).join(", ")}), the same lab with `
    + `batch norm ${p.batch_norm ? "off" : "on"}: ${p.activation} · depth ${p.depth} · width ${p.width} · `
    + `${p.dataset} · seed ${p.seed}, ${steps} steps each (${runs.length * steps} steps in all)?`;
}

function askTwin() {
  const box = $("lab-bn-confirm");
  if (!box.hidden) return;
  $("lab-bn-confirm-text").textContent = twinText();
  $("lab-bn-go").textContent = `Launch ${state.lab.runs.length} runs`;
  box.hidden = false;
  $("lab-bn").setAttribute("aria-expanded", "true");
  $("lab-bn-cancel").focus(); // Enter right after the click backs out, never launches
}

/** Closes the confirm; true when it was open. */
function closeTwin() {
  const box = $("lab-bn-confirm");
  if (box.hidden) return false;
  const hadFocus = box.contains(document.activeElement);
  box.hidden = true;
  $("lab-bn").setAttribute("aria-expanded", "false");
  if (hadFocus) $("lab-bn").focus();
  return true;
}

async function launchTwin() {
  const button = $("lab-bn");
  closeTwin();
  button.disabled = true;
  try {
    const twin = await postJSON("/api/labs/init", { ...state.lab.params, batch_norm: !state.lab.params.batch_norm });
    location.href = twin.url;
  } catch (e) {
    const d = e instanceof ApiError ? e.detail : e.message;
    toast(`Not launched: ${Array.isArray(d) ? d.map((x) => `${x.loc.join(".")}: ${x.msg}`).join("; ") : d}`, "error");
    button.disabled = false;
  }
}

// The "?" helps close on Escape and on a click outside them, as the run page's do.
document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && !closeTwin()) closeDropdowns(null); });
document.addEventListener("click", (ev) => closeDropdowns(ev.target));

async function main() {
  await loadLab();
  $("lab-bn").addEventListener("click", askTwin);
  $("lab-bn-go").addEventListener("click", launchTwin);
  $("lab-bn-cancel").addEventListener("click", closeTwin);
  const slider = $("lab-step");
  slider.addEventListener("input", () => {
    const i = Number(slider.value);
    state.following = i === state.steps.length - 1;
    if (state.steps[i] !== undefined) showStep(state.steps[i]);
  });
  $("std-log").addEventListener("change", () => { if (state.step !== null) draw(); });
  await loadSteps();
  const timer = setInterval(async () => {
    if (document.hidden) return;
    try {
      await loadLab();
      await loadSteps();
      setCondition("refresh", null); // refreshing works (again): a failure before is over
      if (state.lab.runs.every((r) => ENDED.has(r.status))) clearInterval(timer);
    } catch (e) {
      setCondition("refresh", `Refreshing the lab failed: ${e.message}`, "warn");
    }
  }, REFRESH_MS);
}

main().catch((e) => {
  setCondition("load", `The init lab failed to load: ${e.message}`);
  document.body.dataset.ready = "error";
});
