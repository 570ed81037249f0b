/**
 * compare.js — the comparison page (/compare?ids=a&ids=b): loss and validation loss of
 * every run overlaid, and the dead and saturated ratio of one chosen layer across
 * the runs. Re-fetched every few seconds while any of them is still running. Each run is
 * told apart by more than its colour: its own marker symbol on every chart (the page's
 * legend shows it too) and its own dash on the ratio charts, never the loss chart's
 * validation dash (the loss chart's dash says train or validation): runStyle.
 * Never: changes a run; this page only reads.
 */

import { getJSON, runUrl } from "./api.js";
import { COLORS, LineChart, plotlyReady, scheduler } from "./charts.js";
import { setCondition } from "./notify.js";

const ENDED = new Set(["finished", "failed", "stopped", "lost"]);
const REFRESH_MS = 5000;
const $ = (id) => document.getElementById(id);
const ids = JSON.parse(document.body.dataset.runIds || "[]"); // ids may hold commas

let details = [];
let charted = []; // the requested ids that loaded first, in chart order
let loss;
let dead;
let sat;

async function loadDetails() {
  const answers = await Promise.allSettled(ids.map((id) => getJSON(runUrl(id))));
  // Every failed request read "Not found": a token the server no longer takes (403) and a
  // server that did not answer are told apart from a run that is not there (404).
  const failed = ids.map((id, i) => [id, answers[i]]).filter(([, a]) => a.status === "rejected");
  const status = (a) => a.reason?.status;
  const missing = failed.filter(([, a]) => status(a) === 404).map(([id]) => id);
  const refused = failed.some(([, a]) => status(a) === 401 || status(a) === 403);
  const other = failed.filter(([, a]) => ![401, 403, 404].includes(status(a)));
  setCondition("missing", missing.length ? `Not found: ${missing.join(", ")}` : null, "warn");
  setCondition("refused", refused
    ? "The server no longer accepts this tab (a new token or an expired cookie): reopen the dashboard with ?token=…"
    : null);
  setCondition("unreachable", other.length
    ? `Could not load ${other.map(([id]) => id).join(", ")}: ${status(other[0][1]) ? other[0][1].reason.message : "the server did not answer"}; trying again`
    : null, "warn");
  const fresh = new Map();
  answers.forEach((a, i) => { if (a.status === "fulfilled") fresh.set(ids[i], a.value); });
  if (!charted.length) {
    charted = ids.filter((id) => fresh.has(id));
    details = charted.map((id) => fresh.get(id));
    return;
  }
  // The charts' traces are by position: a charted run keeps its slot, with its last
  // detail when a refresh cannot load it (deleted since, or a failed request); dropping
  // it shifted every later run's data under the run before it.
  details = charted.map((id, i) => fresh.get(id) || details[i]);
}

/**
 * Run i's marker symbol (one each for the page's ten runs at most, MAX_COMPARE_RUNS) and
 * ratio-chart dash. Runs were told apart by colour alone: two close shades, or a viewer who
 * tells few colours apart, read two runs as one, and a run drawn under another's identical
 * line did not show at all.
 */
const SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "triangle-down", "cross", "star", "pentagon", "hourglass"];
/**
 * No "dash" or "longdash": the loss card's note says a dashed line is a validation loss, and
 * runs 4 and 5 drew their dead and saturated ratios dashed. The symbol tells every run apart.
 */
export const DASHES = ["solid", "dot", "dashdot"];
/**
 * Each symbol as the legend's SVG draws it, centred on 0,0 (Plotly's shapes, about its size 7),
 * drawn SWATCH_SCALE times that: at 7 px a square, a diamond and a circle looked alike.
 */
const SWATCH_SCALE = 1.4;
const SYMBOL_PATHS = {
  circle: "M3.5,0A3.5,3.5 0 1,1 -3.5,0A3.5,3.5 0 1,1 3.5,0Z",
  square: "M-3,-3H3V3H-3Z",
  diamond: "M0,-4L4,0L0,4L-4,0Z",
  "triangle-up": "M0,-4L4,3H-4Z",
  x: "M-3.5,-2L-2,-3.5L0,-1.5L2,-3.5L3.5,-2L1.5,0L3.5,2L2,3.5L0,1.5L-2,3.5L-3.5,2L-1.5,0Z",
  "triangle-down": "M0,4L4,-3H-4Z",
  cross: "M-1.2,-4H1.2V-1.2H4V1.2H1.2V4H-1.2V1.2H-4V-1.2H-1.2Z",
  star: "M0,-4L1,-1.3L3.8,-1.2L1.6,0.5L2.4,3.2L0,1.6L-2.4,3.2L-1.6,0.5L-3.8,-1.2L-1,-1.3Z",
  pentagon: "M0,-4L3.8,-1.2L2.4,3.2H-2.4L-3.8,-1.2Z",
  hourglass: "M-3.5,-3.5H3.5L-3.5,3.5H3.5Z",
};

/** Run i's colour, symbol and ratio-chart dash. */
export function runStyle(i) {
  return { color: COLORS[i % COLORS.length], symbol: SYMBOLS[i % SYMBOLS.length], dash: DASHES[i % DASHES.length] };
}

/**
 * The legend's sample of run i: its symbol on a line in its colour. A solid line: on the
 * loss chart the dash says train or validation, on the ratio charts (each with its own
 * legend) which run.
 */
function swatch(i) {
  const { color, symbol } = runStyle(i);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 -7 28 14");
  svg.setAttribute("width", "28");
  svg.setAttribute("height", "14");
  svg.setAttribute("aria-hidden", "true");
  svg.style.marginRight = "6px";
  svg.style.verticalAlign = "middle";
  svg.dataset.symbol = symbol;
  const line = document.createElementNS(ns, "line");
  Object.entries({ x1: 0, y1: 0, x2: 28, y2: 0, stroke: color, "stroke-width": 2 })
    .forEach(([k, v]) => line.setAttribute(k, String(v)));
  const mark = document.createElementNS(ns, "path");
  mark.setAttribute("d", SYMBOL_PATHS[symbol]);
  mark.setAttribute("transform", `translate(14 0) scale(${SWATCH_SCALE})`);
  mark.setAttribute("fill", color);
  mark.setAttribute("stroke", "#0f1216");
  mark.setAttribute("stroke-width", String(1 / SWATCH_SCALE)); // 1 px, as scaled
  svg.append(line, mark);
  return svg;
}

/** A short form of a run id, enough to tell two runs of the same name apart. */
function shortId(id) {
  return id.length <= 12 ? id : `…${id.slice(-8)}`;
}

/** Each run's name in the charts and the legend; runs sharing a name get their short id too. */
function labels() {
  const names = details.map((d) => d.name || d.id);
  return details.map((d, i) =>
    names.filter((n) => n === names[i]).length > 1 && names[i] !== d.id ? `${names[i]} [${shortId(d.id)}]` : names[i]);
}

/** The legend, with each run's status as last loaded (it is rebuilt on every refresh). */
function renderLegend() {
  const named = labels();
  $("legend").replaceChildren(...details.map((d, i) => {
    const li = document.createElement("li");
    const sw = swatch(i);
    const a = document.createElement("a");
    a.href = `/runs/${encodeURIComponent(d.id)}`;
    a.textContent = `${named[i]} (${d.status})`;
    li.dataset.runId = d.id;
    li.append(sw, a);
    return li;
  }));
}

function buildCharts() {
  const named = labels();
  // the loss chart's dash says train or validation (the card's note): a run's symbol says which run
  const traces = details.flatMap((d, i) => [
    { name: `${named[i]} train`, color: runStyle(i).color, symbol: runStyle(i).symbol },
    { name: `${named[i]} val`, color: runStyle(i).color, symbol: runStyle(i).symbol, dash: "dash" },
  ]);
  loss = new LineChart($("chart-loss"), traces, { logY: $("loss-log").checked, yTitle: "loss" });
  const perRun = details.map((d, i) => ({ name: named[i], ...runStyle(i) }));
  // A ratio's axis starts at 0 (to 1 with no data, else just above the largest value):
  // Plotly's autorange put an empty chart at -1..4 and an all-zero one at -1..1.
  dead = new LineChart($("chart-dead"), perRun, { yTitle: "dead ratio", zeroBased: true });
  sat = new LineChart($("chart-sat"), perRun.map((t) => ({ ...t })), { yTitle: "saturated ratio", zeroBased: true });
  renderLegend();
  const names = [];
  for (const d of details) for (const l of d.layers || []) if (!names.includes(l.name)) names.push(l.name);
  const select = $("layer");
  // Runs probing different layers (a `layers=` filter on one of them): an option says
  // which runs have it, rather than leaving a run's line silently missing.
  select.replaceChildren(...names.map((n) => {
    const having = details.map((d, i) => ((d.layers || []).some((l) => l.name === n) ? named[i] : null)).filter(Boolean);
    return new Option(having.length === details.length ? n : `${n} (${having.join(", ")} only)`, n);
  }));
  const act = details.flatMap((d) => d.layers || []).find((l) => /relu|tanh|sigmoid|gelu|elu/i.test(l.kind));
  if (act) select.value = act.name;
}

async function loadLoss() {
  const all = await Promise.allSettled(details.map((d) => getJSON(runUrl(d.id, "series", { names: "loss,val_loss", max_points: 1500 }))));
  all.forEach((answer, i) => {
    if (answer.status === "rejected") return; // keeps what it showed (see loadDetails)
    const s = answer.value;
    if (s.loss) loss.setSeries(2 * i, s.loss.steps, s.loss.values);
    if (s.val_loss) loss.setSeries(2 * i + 1, s.val_loss.steps, s.val_loss.values);
  });
}

async function loadLayer() {
  const layer = $("layer").value;
  if (!layer) return;
  const all = await Promise.allSettled(details.map((d) =>
    (d.layers || []).some((l) => l.name === layer)
      ? getJSON(runUrl(d.id, "probes", { layer, stats: "dead_ratio,saturated_ratio", max_points: 1500 }))
      : Promise.resolve(null)));
  // the ratio charts' summaries name the layer they show (describeChart)
  dead.about = `dead ratio of ${layer}`;
  sat.about = `saturated ratio of ${layer}`;
  all.forEach((answer, i) => {
    if (answer.status === "rejected") return;
    const p = answer.value;
    dead.setSeries(i, p ? p.steps : [], p ? p.dead_ratio : []);
    sat.setSeries(i, p ? p.steps : [], p ? p.saturated_ratio : []);
  });
  const probed = all.map((a) => (a.status === "fulfilled" ? a.value : undefined));
  $("dead-note").textContent = layerNote(layer, probed, "dead_ratio",
    "has no dead ratio (no ReLU-like activation follows it)");
  $("sat-note").textContent = layerNote(layer, probed, "saturated_ratio",
    "has no saturated ratio (only bounded activations, tanh and sigmoid, saturate)");
}

/**
 * Why a run has no line on a layer chart: it does not probe the layer, or the layer has
 * no such statistic. Without it an empty chart, or a run missing from one, read as a
 * fault (or as a run whose ratio was zero). `probed[i]`: the answer, null (not probed)
 * or undefined (its request failed: it keeps its line).
 */
function layerNote(layer, probed, stat, none) {
  const named = labels();
  const missing = named.filter((_, i) => probed[i] === null);
  const empty = named.filter((_, i) => probed[i] && !(probed[i][stat] || []).some((v) => v !== null));
  const parts = [];
  if (missing.length) parts.push(`${missing.join(", ")}: ${layer} is not probed in ${missing.length > 1 ? "these runs" : "this run"}.`);
  if (empty.length) parts.push(`${empty.join(", ")}: ${layer} ${none}.`);
  return parts.join(" ");
}

async function refresh() {
  await Promise.all([loadLoss(), loadLayer()]);
}

async function main() {
  if (!ids.length) return;
  await loadDetails();
  if (!details.length) return;
  buildCharts();
  $("loss-log").addEventListener("change", (ev) => loss.setLogY(ev.target.checked));
  $("layer").addEventListener("change", () => loadLayer());
  await Promise.all([refresh(), plotlyReady()]);
  await scheduler.flush();
  document.body.dataset.ready = "1";
  const timer = setInterval(async () => {
    if (document.hidden) return;
    await loadDetails();
    renderLegend();
    if (details.every((d) => ENDED.has(d.status))) clearInterval(timer);
    await refresh();
  }, REFRESH_MS);
}

main().catch((e) => {
  setCondition("load", `The comparison failed to load: ${e.message}`);
  document.body.dataset.ready = "error";
});
