/**
 * run.js — the run page (/runs/{id}), live and replay.
 *
 * Owns: the order of loading (viewer socket first, and for a live run the history
 * over REST only once its snapshot shows the server has subscribed it, so no frame
 * between the REST history and the live stream is missed; then the buffered live
 * frames, de-duplicated by step), routing each frame to the charts, the connection /
 * trainer / stuck-loop banners, and switching to replay when the run ends; the window's line
 * charts drawn as canvas previews (preview.js) before Plotly has run. Sets
 * document.body.dataset.paintedMs once the charts in the window are visible with their
 * data (paintedBy: "preview" or "plotly"), plotlyPaintedMs once Plotly has drawn them,
 * and document.body.dataset.ready = "1" once every chart has rendered.
 * Never: draws directly (charts.js / heatmaps.js do) or sends a command itself.
 */

import { getJSON, runUrl, ApiError, flatConfig } from "./api.js";
import { COLORS, LineChart, groupMarkers, inViewport, plotlyReady, scheduler, formatNumber, stepsPerPixels } from "./charts.js";
import { Controls } from "./controls.js";
import { drawPreview } from "./preview.js";
import { EventLog, Markers, actionText, eventKey } from "./eventlog.js";
import { HistogramOverTime, LayerHeatmap, SmallMultiples } from "./heatmaps.js";
import { setCondition, toast } from "./notify.js";
import { Replay, stepFromUrl } from "./replay.js";
import { RulesPanel } from "./rules.js";
import { RunSocket } from "./socket.js";
import { Snapshots, onSharedRange } from "./snapshots.js";

const ENDED = new Set(["finished", "failed", "stopped", "lost"]);
const SERIES_POINTS = 1500;
const MATRIX_STEPS = 300;
const HIST_STEPS = 200;
/** The most points a line of the per-layer charts (gradient norm, update ratio) keeps. */
const LAYER_POINTS = 1000;
/** The newest events the log reads over REST (the history's, again after a reconnect, and each "Load older"). */
const EVENTS_READ = 500;
/**
 * The most alerts (and sanity verdicts) read apart from the log when the run has more
 * events than it reads: the server's most (/events limit). A run's early alerts are not
 * among its newest 500 events, and the replay lists those raised by the cursor's step.
 */
const ALERTS_READ = 100000;
const REGRID_MIN_MS = 5000;
/** The most alert markers the loss chart draws (the latest steps'): each is a Plotly shape. */
const MAX_ALERT_MARKS = 200;
/** The longest the preview's data is waited for before Plotly runs regardless. */
const PREVIEW_WAIT_MS = 1000;
const $ = (id) => document.getElementById(id);
const runId = document.body.dataset.runId;

/** The dead-units card's note when no layer has a dead ratio, by why (deadUnitsNote). */
const NO_DEAD_REGION = "no layer of this run has a dead-unit ratio: tanh/sigmoid have no dead region";
const TOO_FEW_VALUES = "no dead-unit ratio: this run's ReLU-family layers see fewer than 8 values a unit in "
  + "each probed batch (batch size 1 on an MLP), too few to tell a dead unit from a healthy one. "
  + "Train with a larger batch (or probe a batch with more values a unit) to see dead units";
/** Layer kinds whose outputs carry a dead_ratio (trainer/stats.py: module_rule's ReLU family). */
const RELU_FAMILY = /^(ReLU|ReLU6|LeakyReLU|PReLU|ELU|SELU|CELU|GELU|SiLU|Mish|Hardswish|Softplus)$/;

/**
 * Why a run's dead-units card is empty. Its ReLU-family layers would carry a dead ratio: when
 * none has one, a unit had fewer than 8 values to judge (trainer MIN_ACTIVITY_VALUES), not
 * a missing dead region. Only a run without such a layer has no dead region.
 */
function deadUnitsNote(layers) {
  return layers.some((l) => RELU_FAMILY.test(l.kind || "")) ? TOO_FEW_VALUES : NO_DEAD_REGION;
}

const isLr = (n) => n === "lr" || (/^lr[/.:[_]/.test(n) && n !== "lr_scale");
const isWd = (n) => n === "weight_decay" || /^weight_decay[/.:[_]/.test(n);

const page = {
  status: "starting", trainerConnected: false, uploading: false, socketOpen: false, historyLoaded: false,
  buffer: [], layers: [], lastStep: null, firstStep: 0, dataFirstStep: null, histLayer: null, lastRegrid: 0, replaying: false,
  // charts whose history failed to load ("hist", "other"; the server was down when the
  // person picked a layer or a series): read again once the socket is back
  reload: new Set(),
  refreshingLayers: false, detail: null, wasOpen: false, statusFrames: 0, statusEvents: 0,
};

const charts = {
  // A chart with no data says why (as the heatmaps do), rather than drawing empty axes.
  loss: new LineChart($("chart-loss"), [{ name: "train" }, { name: "validation", color: COLORS[1] }], { yTitle: "loss",
    empty: "no loss logged yet: pass loss= (and val_loss=) to w.step" }),
  acc: new LineChart($("chart-acc"), [{ name: "train" }, { name: "validation", color: COLORS[1] }], { yTitle: "accuracy",
    empty: "no accuracy logged: pass acc= (and val_acc=) to w.step to chart it" }),
  lr: new LineChart($("chart-lr"), [], { yTitle: "lr", zeroBased: true,
    empty: "no learning rate logged yet: watch() reads it from the optimizer it is given" }),
  wd: new LineChart($("chart-wd"), [], { yTitle: "weight decay", zeroBased: true,
    empty: "no weight decay logged: watch() reads it from the optimizer's weight_decay setting" }),
  dead: new LayerHeatmap($("chart-dead"), { title: "dead ratio", empty: NO_DEAD_REGION }),
  sat: new LayerHeatmap($("chart-sat"), { title: "saturated ratio",
    empty: "no layer of this run has a saturated ratio: only bounded activations (tanh, sigmoid) saturate" }),
  hist: new HistogramOverTime($("chart-hist"), { onRegrid: (layer) => regrid(layer) }),
  // A line per layer: 44 lines of 4,000 points took 250 ms a draw on a 2-core machine;
  // 1,000 a line is more than the chart is pixels wide.
  grad: new LineChart($("chart-grad"), [], { logY: true, yTitle: "grad norm", showLegend: false, maxPoints: LAYER_POINTS,
    empty: "no layer's gradient norm recorded yet: layers are probed every few steps (watch()'s every=)" }),
  update: new LineChart($("chart-update"), [], { logY: true, yTitle: "‖Δw‖/‖w‖", showLegend: false, maxPoints: LAYER_POINTS,
    empty: "no layer's update ratio recorded yet: layers are probed every few steps (watch()'s every=)" }),
  // every logged series no chart above shows, one at a time (the picker's)
  other: new LineChart($("chart-other"), [], { showLegend: false,
    empty: "no other scalar logged: what else the run passes to w.step (e.g. grad_norm_raw=) is charted here" }),
};
const multiples = new SmallMultiples($("multiples"), $("multiples-step"));
const snapshots = new Snapshots(runId, showMultiples);
const events = new EventLog($("events"), $("alerts"));
events.loadOlder = () => loadOlderEvents().catch((e) => toast(`Could not load older events: ${e.message}`, "error"));
const markers = new Markers();
const socket = new RunSocket(runId, { onSnapshot, onFrame, onConnection, onCatchup });
const controls = new Controls($("controls"), { send: (msg) => socket.send(msg) });
const replay = new Replay($("replay"), { onCursor: moveCursor });
controls.spaceFallback = () => replay.toggle();
const rules = new RulesPanel($("rules"), controls);
events.suggestion = { send: (kind) => controls.suggest(kind), blocked: (kind) => controls.suggestionBlocked(kind) };
controls.onRender = () => { rules.render(); events.renderSuggestions(); };
controls.extraPending = () => [...rules.pending.keys()];

/** series name -> [chart, trace index] */
const routes = new Map([["loss", [charts.loss, 0]], ["val_loss", [charts.loss, 1]],
  ["acc", [charts.acc, 0]], ["val_acc", [charts.acc, 1]]]);

function route(name) {
  if (routes.has(name)) return routes.get(name);
  const chart = isLr(name) ? charts.lr : isWd(name) ? charts.wd : null;
  if (!chart) {
    noteOther(name);
    return null;
  }
  // "lr" is the only group's; "lr/1" (or lr.1, lr_1) is group 1's.
  const group = name.replace(/^(lr|weight_decay)[/.:[_]?/, "");
  const entry = [chart, chart.addTrace({ name: group ? `group ${group}` : name, smoothable: false })];
  routes.set(name, entry);
  return entry;
}

// ---- the small multiples: each layer on its own x-range, or all on one ----

/** The "same x-range" choice is kept per run (restored on reload), as the picker's is. */
const SHARED_KEY = `layerscope:multiples-shared:${runId}`;
/** The step and layers the small multiples show, as the snapshots handed them over. */
let multiplesShown = null;

function showMultiples(step, layers) {
  multiplesShown = [step, layers];
  multiples.show(step, $("multiples-shared").checked ? onSharedRange(layers) : layers);
}

function setupSharedRange() {
  const box = $("multiples-shared");
  try {
    box.checked = localStorage.getItem(SHARED_KEY) === "1";
  } catch {
    // storage off (a private window's policy): each layer on its own range
  }
  box.addEventListener("change", () => {
    try {
      localStorage.setItem(SHARED_KEY, box.checked ? "1" : "0");
    } catch {
      // not kept: the choice holds for this page
    }
    if (multiplesShown) showMultiples(...multiplesShown);
  });
}
setupSharedRange();

// ---- other scalars: every series no chart above shows, one at a time ----
// (or one kind's series of every rank of a distributed run together: RANKS)

/** The "Other scalars" picker's choice is kept per run (restored on reload). */
const OTHER_KEY = `layerscope:other-series:${runId}`;
/** The series the picker prefers when nothing was picked: the global gradient norm. */
const OTHER_DEFAULT = "grad_norm";
/**
 * A distributed run logs a series a rank ("step_time_s/rank0", "step_time_s/rank1", ...): the
 * picker also lists each kind's "every rank" entry (value "step_time_s/rank*"), drawing a
 * line per rank so a straggler stands out (one rank at a time, it could not be seen).
 */
const RANK_SERIES = /^(.+)\/rank(\d+)$/;
const RANKS = "/rank*";
const isRanks = (value) => value !== null && value.endsWith(RANKS);

/** The series a picker value charts, by trace: itself, or every rank's of its kind (by rank). */
function otherMembers(value) {
  if (value === null) return [];
  if (!isRanks(value)) return [value];
  const base = value.slice(0, -RANKS.length);
  return other.series
    .map((n) => [n, RANK_SERIES.exec(n)])
    .filter(([, m]) => m && m[1] === base)
    .sort(([, a], [, b]) => Number(a[2]) - Number(b[2]))
    .map(([n]) => n);
}

const other = {
  /** the picker's values: each series, and each per-rank kind's RANKS entry */
  names: [],
  /** every series the picker's values draw from */
  series: [],
  /** the series charted, by trace index */
  members: [],
  selected: null,
  picked: false, // the choice is a person's (kept), not the default
  /** live points of the charted series while their history is read: [series, step, value] */
  live: null,
  request: 0,
};

function storedOther() {
  try {
    return localStorage.getItem(OTHER_KEY);
  } catch {
    return null; // storage off (a private window's policy)
  }
}

/** The picker's label for a value. */
const otherLabel = (value) => (isRanks(value) ? `${value.slice(0, -RANKS.length)} (every rank)` : value);

/**
 * A series no other chart shows: listed in the picker (a rank's series with its kind's
 * "every rank" entry); the first one seen is charted. A rank's series first seen while its
 * kind's every-rank entry is charted joins the chart as a line.
 */
function noteOther(name) {
  if (other.series.includes(name)) return;
  other.series.push(name);
  const rank = RANK_SERIES.exec(name);
  const values = [name, ...(rank ? [`${rank[1]}${RANKS}`] : [])].filter((v) => !other.names.includes(v));
  other.names.push(...values);
  other.names.sort();
  const select = $("other-series");
  select.replaceChildren(...other.names.map((n) => new Option(otherLabel(n), n)));
  if (rank && other.selected === `${rank[1]}${RANKS}`) addOtherMember(name);
  for (const value of values) {
    // the default's arrival moves a default choice to it; a person's choice stays
    const better = !other.picked && value === OTHER_DEFAULT && other.selected !== OTHER_DEFAULT;
    if (other.selected === null || better || (value === storedOther() && !other.picked)) {
      selectOther(value, { picked: value === storedOther() });
    }
  }
  if (other.selected !== null) select.value = other.selected;
}

/** A rank's series joins the every-rank chart charted (in rank order: the chart is redrawn). */
function addOtherMember(name) {
  const members = otherMembers(other.selected);
  if (other.members.includes(name)) return;
  const kept = new Map(other.members.map((n, i) => [n, charts.other.model[i]]));
  other.members = members;
  charts.other.setTraces(members.map(otherTrace));
  members.forEach((n, i) => {
    const m = kept.get(n);
    if (m) charts.other.setSeries(i, m.x, m.y);
  });
}

/** The trace of series `name` in "Other scalars": a rank's named by its rank. */
function otherTrace(name, i) {
  const rank = isRanks(other.selected) ? RANK_SERIES.exec(name) : null;
  return rank ? { name: `rank${rank[2]}`, color: COLORS[i % COLORS.length] } : { name };
}

/** The "Other scalars" trace that draws series `name`, else -1. */
function otherIndex(name) {
  return other.members.indexOf(name);
}

/**
 * Charts `name` in "Other scalars". Its history is read unless `load` is false (the
 * page's first history request carries it).
 */
function selectOther(name, { picked = false, load = page.historyLoaded } = {}) {
  other.selected = name;
  other.picked = picked;
  other.members = otherMembers(name);
  $("other-series").value = name;
  charts.other.setTraces(other.members.map(otherTrace));
  // every rank's lines: a legend names them
  charts.other.showLegend = isRanks(name);
  charts.other.yTitle = isRanks(name) ? name.slice(0, -RANKS.length) : name;
  if (load) loadOther(name).catch((e) => loadFailed(`Could not load ${otherLabel(name)}: ${e.message}`));
}

async function loadOther(name) {
  const request = ++other.request;
  other.live = [];
  const members = other.members.slice();
  let s;
  try {
    s = await getJSON(runUrl(runId, "series", { names: members.join(","), max_points: SERIES_POINTS }));
  } catch (e) {
    if (request === other.request) {
      other.live = null;
      page.reload.add("other");
    }
    throw e;
  }
  if (request !== other.request || other.selected !== name) return;
  reloaded("other");
  for (const member of members) {
    const i = otherIndex(member);
    const points = s[member] || { steps: [], values: [] };
    if (i >= 0) charts.other.setSeries(i, points.steps, points.values);
  }
  // points that came live while it was read, past its last one
  for (const [member, step, value] of other.live) {
    const i = otherIndex(member);
    if (i >= 0) charts.other.append(i, step, value);
  }
  other.live = null;
}

function appendOther(name, step, value) {
  if (other.live) other.live.push([name, step, value]);
  const i = otherIndex(name);
  if (i >= 0) charts.other.append(i, step, value);
}

$("other-series").addEventListener("change", (ev) => {
  const name = ev.target.value;
  try {
    localStorage.setItem(OTHER_KEY, name);
  } catch {
    // storage off: the choice lasts until the page is left
  }
  selectOther(name, { picked: true, load: true });
});

function layerTrace(chart, name) {
  const i = chart.traces.findIndex((t) => t.name === name);
  return i >= 0 ? i : chart.addTrace({ name, color: COLORS[chart.traces.length % COLORS.length] });
}

// ---- run state ----

function setStatus(status, trainerConnected, uploading) {
  if (status) page.status = status;
  if (trainerConnected !== undefined) page.trainerConnected = trainerConnected;
  // layerscope sync holding the run (status frames and the snapshot say so): frames
  // arrive, but nothing on that connection applies commands
  if (uploading !== undefined) page.uploading = Boolean(uploading);
  const pill = $("status");
  // a polite live region: set only on a change (every heartbeat set it again)
  if (pill.textContent !== page.status) pill.textContent = page.status;
  pill.className = `pill ${page.status}`;
  const trainer = ENDED.has(page.status)
    ? ""
    : page.trainerConnected
      ? "trainer connected"
      : page.uploading
        ? "uploading from its spool"
        : page.status === "starting"
          ? "waiting for the trainer to start"
          : "no trainer";
  if ($("trainer").textContent !== trainer) $("trainer").textContent = trainer;
  controls.setRun({
    status: page.status,
    trainerConnected: page.trainerConnected,
    socketOpen: page.socketOpen,
    uploading: page.uploading,
  });
  const ended = ENDED.has(page.status);
  if (page.status === "lost") setCondition("trainer", "The trainer was lost (no heartbeat). The run is shown as recorded.");
  else if (!ended && page.uploading && !page.trainerConnected) {
    setCondition("trainer", "layerscope sync is uploading this run from its spool: its data arrives, but nothing can apply commands.", "warn");
  } else if (!ended && page.historyLoaded && !page.trainerConnected && page.status !== "starting") {
    // not while the run is starting: a launched run's page said its trainer was "not
    // connected" (an alert) for the seconds its trainer took to start
    setCondition("trainer", "The trainer is not connected: no new data arrives and controls are off until it reconnects.", "warn");
  } else setCondition("trainer", null);
  if (ended && page.historyLoaded && !page.replaying) startReplay();
  noteLive();
}

// ---- a stuck training loop ----

/*
 * The trainer's link thread heartbeats on its own thread, so a training loop blocked in a
 * hung DataLoader worker, a deadlock, a blocked collective or an input() (or a server
 * whose store writer stalled: it then stops reading the trainer) looked live: "running ·
 * trainer connected", charts that merely stopped. The page says so ("stall" condition, a
 * warning in the banner, role=alert), while the run is running (not paused, not ended)
 * with its trainer connected and this page's socket open (else the connection banner
 * says why nothing comes), and clears it on the next step, a pause, or the end.
 *
 * Rule: no new step (a metrics row or a probe past the highest step seen) for
 * max(STALL_MIN_S, STALL_CADENCE × the median of the run's recent wall times between
 * steps, STALL_GAP × the longest healthy one seen). The times are the trainer's own
 * step_time_s (a trainer that sends none: rows' time_s apart), as the server kept them
 * raw (the snapshot's and catch-up's step_times_s: the chart series is min/max per
 * bucket, whose median leaned slow, 40 s for a run stepping every second), then the live
 * rows'; less step 1's (it counts from watch(): data loading, compiling) and those that
 * span a pause (the first after any status change, and a step_once's); the median once
 * CADENCE_MIN_SAMPLES are in, the fastest before (a few slow ones would set the median),
 * and while there is none STALL_CADENCE × the last step time left out (step 1's, which
 * spans the setup too: an upper bound) or FIRST_STEP_S. The longest
 * healthy gap (the server's step_gap_max_s, then the live rows') is a validation or a
 * checkpoint seen before: it does not warn again at each one. A slow but healthy run, a
 * step every few minutes, never trips it. Before the run's first step it takes
 * FIRST_STEP_S and says "no step yet" instead. For RECONNECT_GRACE_MS after its trainer
 * reconnects nothing shows: it says "running" before resending the frames it held.
 *
 * The clock is this page's, from the frames it receives; it starts when the run starts
 * or is resumed (a status change to running; the trainer's own status event "running",
 * sent by each watch() and each resume), not when the trainer merely reconnects (a link
 * that reconnected more often than the threshold hid a stuck loop for good) or this
 * page's socket does. A snapshot or a catch-up carries the server's count (step_quiet_s:
 * since the later of the last change of the step the trainer's heartbeats say and the
 * run's last start or resume): when it brought a new step the clock is the server's (a
 * catch-up's frames arrive at once, and would look fresh); when not, the older of the
 * two (a server restarted since cannot know how long the loop was stuck before). So a
 * page reloaded on a stuck run says so at once, not a threshold later. `?stall_s=N` on
 * the page's address sets STALL_MIN_S and FIRST_STEP_S to N seconds (the tests' short
 * threshold).
 */
const STALL_MIN_S = 60;
const STALL_CADENCE = 20;
const STALL_GAP = 1.5;
const FIRST_STEP_S = 300;
const CADENCE_SAMPLES = 64;
const CADENCE_MIN_SAMPLES = 8;
const STALL_CHECK_MS = 1000;
const RECONNECT_GRACE_MS = 3000;
/** The shown "for over N" moves on only at these (minutes; then every hour): the banner
 * is role=alert, and a text that changed every second would be read out every second. */
const STALL_MARKS_MIN = [1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 90, 120];

const stall = {
  /** performance.now() the quiet time counts from; null while the run is not running */
  from: null,
  /** the highest step seen (null: the run has no step yet), and what it was when the socket last opened */
  step: null,
  stepAtOpen: null,
  /** the latest healthy wall times between steps, in seconds, and the longest seen */
  times: [],
  gapMax: 0,
  /** the next row's time spans a start or a pause (see the rule above); the status and
   * trainer it was last checked against */
  skipNext: true,
  status: null,
  connected: null,
  /** the last live row's [step, time_s], for a trainer that sends no step_time_s */
  lastRow: null,
  /** the clock time the quiet time counts from, as shown, and the `from` it is for */
  since: "",
  sinceFrom: null,
  /** the banner's text for it (null: none; undefined: not set yet) */
  message: undefined,
  /** the latest step time left out for spanning a start or a pause (null: none yet) */
  skipped: null,
  /** performance.now() before which no warning shows (a trainer just reconnected) */
  graceUntil: 0,
  minS: (() => {
    const raw = new URLSearchParams(location.search).get("stall_s");
    const n = raw === null || raw.trim() === "" ? NaN : Number(raw);
    return Number.isFinite(n) && n > 0 ? n : null;
  })(),
};

/** The warning may show: running with its trainer connected, and this page's socket open. */
const isLive = () => page.status === "running" && page.trainerConnected && !page.uploading
  && !page.replaying && page.socketOpen;

/** A status (each status message, a snapshot's): the clock starts when the run becomes
 * running; a paused, starting or ended run has none; a trainer coming and going (and a
 * "lost" one back) keeps it. */
function noteLive() {
  if (page.status === "running") {
    if (stall.from === null) stall.from = performance.now();
  } else if (page.status !== "lost") stall.from = null;
  if (page.status !== stall.status || page.trainerConnected !== stall.connected) stall.skipNext = true;
  // A trainer back after an outage says "running" before it resends the frames it held:
  // its loop may have moved meanwhile, so no warning until they (or a heartbeat's pace) can come.
  if (page.trainerConnected && stall.connected === false) stall.graceUntil = performance.now() + RECONNECT_GRACE_MS;
  stall.status = page.status;
  stall.connected = page.trainerConnected;
  checkStall();
}

function noteStepTime(step, seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return;
  if (page.status === "paused") stall.skipNext = true; // a step_once: this and the next
  else if (stall.skipNext || step <= 1) {
    stall.skipNext = false;
    stall.skipped = seconds; // spans a start or a pause: an upper bound while there is no other
  } else {
    stall.times.push(seconds);
    if (stall.times.length > CADENCE_SAMPLES) stall.times.splice(0, stall.times.length - CADENCE_SAMPLES);
    stall.gapMax = Math.max(stall.gapMax, seconds);
  }
}

/** A frame as it arrives (before the history is in, too): a new step restarts the clock. */
function noteStepFrame(frame) {
  if (frame.type === "event" && frame.kind === "status" && frame.data?.status === "running") {
    stall.from = performance.now(); // the trainer (re)starts: a watch(), a resume
    stall.skipNext = true;
    checkStall();
    return;
  }
  let step = null;
  if (frame.type === "probe" && typeof frame.step === "number") step = frame.step;
  else if (frame.type === "metrics") {
    for (const row of frame.rows || []) {
      if (typeof row.step !== "number") continue;
      step = step === null ? row.step : Math.max(step, row.step);
      const last = stall.lastRow;
      if (typeof row.values?.step_time_s === "number") noteStepTime(row.step, row.values.step_time_s);
      else if (last && row.step > last[0] && typeof row.time_s === "number" && row.time_s > last[1]) {
        noteStepTime(row.step, (row.time_s - last[1]) / (row.step - last[0]));
      }
      if (typeof row.time_s === "number" && (!last || row.step > last[0])) stall.lastRow = [row.step, row.time_s];
    }
  }
  if (step === null || (stall.step !== null && step <= stall.step)) return;
  stall.step = step;
  if (stall.from !== null) stall.from = performance.now();
  checkStall();
}

/** A snapshot's or catch-up's pace, the server's (hub.pace): its step times, its longest
 * healthy gap, its quiet time. `series`: a snapshot's chart series, for the step times of
 * a server that has none yet (restarted since: biased slow, so late rather than false). */
function noteServerPace(msg, series) {
  if (Array.isArray(msg.step_times_s) && msg.step_times_s.length) {
    stall.times = msg.step_times_s.filter((t) => typeof t === "number").slice(-CADENCE_SAMPLES);
  } else if (series?.values?.length && !stall.times.length) {
    stall.times = series.values.filter((t) => typeof t === "number" && t >= 0).slice(-CADENCE_SAMPLES);
  }
  if (typeof msg.step_gap_max_s === "number") stall.gapMax = Math.max(stall.gapMax, msg.step_gap_max_s);
  const quiet = msg.step_quiet_s;
  if (stall.from !== null && typeof quiet === "number" && quiet >= 0) {
    const server = performance.now() - quiet * 1000;
    // a new step since the socket opened: the server's (the catch-up's frames looked fresh);
    // none: the older (a restarted server counts only from its restart)
    stall.from = stall.step !== stall.stepAtOpen ? server : Math.min(stall.from, server);
  }
  checkStall();
}

/** A snapshot: the steps it holds, and the server's pace. */
function noteStallSnapshot(msg) {
  const steps = [];
  for (const points of Object.values(msg.series || {})) {
    if (points?.steps?.length) steps.push(points.steps[points.steps.length - 1]);
  }
  for (const probe of msg.probes || []) if (typeof probe.step === "number") steps.push(probe.step);
  if (steps.length) stall.step = Math.max(stall.step ?? -Infinity, ...steps);
  noteServerPace(msg, msg.series?.step_time_s);
}

/** Seconds of no new step that make the warning (see the rule above). */
function stallThreshold() {
  if (stall.step === null) return stall.minS ?? FIRST_STEP_S;
  const sorted = [...stall.times].sort((a, b) => a - b);
  const n = sorted.length;
  // No healthy step time yet: STALL_CADENCE x the last one that spans a start or a pause
  // (step 1's counts the setup too: an upper bound), else as before the first step. With
  // the floor alone a run stepping every 2 min was "stuck" a minute into its second step.
  if (n === 0) {
    const bound = stall.skipped === null ? stall.minS ?? FIRST_STEP_S : STALL_CADENCE * stall.skipped;
    return Math.max(stall.minS ?? STALL_MIN_S, bound);
  }
  // Fewer than CADENCE_MIN_SAMPLES: the fastest, which a compile step or a validation
  // cannot pull slow; then the median.
  let cadence = sorted[0];
  if (n >= CADENCE_MIN_SAMPLES) cadence = n % 2 ? sorted[(n - 1) / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
  return Math.max(stall.minS ?? STALL_MIN_S, STALL_CADENCE * cadence, STALL_GAP * stall.gapMax);
}

/** "45 s", "2 min 10 s", "3 min", "1 h 5 min". */
function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return s % 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s / 60} min`;
  const m = Math.floor(s / 60) % 60;
  return `${Math.floor(s / 3600)} h${m ? ` ${m} min` : ""}`;
}

/** The quiet time as shown: the threshold, then the latest mark passed (STALL_MARKS_MIN, then hours). */
function shownQuiet(quiet, threshold) {
  const minutes = quiet / 60;
  const last = STALL_MARKS_MIN[STALL_MARKS_MIN.length - 1];
  const mark = minutes >= last ? Math.floor(minutes / 60) * 60 : STALL_MARKS_MIN.filter((m) => m <= minutes).pop() ?? 0;
  return Math.max(threshold, mark * 60);
}

function checkStall() {
  let message = null;
  let kind = "";
  if (stall.from !== null && isLive() && performance.now() >= stall.graceUntil) {
    const quiet = (performance.now() - stall.from) / 1000;
    const threshold = stallThreshold();
    if (quiet >= threshold) {
      if (stall.sinceFrom !== stall.from) {
        // once a clock start: recomputed each second, it could flip a second and be read out again
        stall.sinceFrom = stall.from;
        stall.since = new Date(Date.now() - quiet * 1000).toLocaleTimeString();
      }
      const since = stall.since;
      const over = duration(shownQuiet(quiet, threshold));
      kind = stall.step === null ? "first" : "step";
      // "first": counted from the run's start or resume (a trainer that reconnected meanwhile
      // does not restart it), so it says running, not connected
      message = kind === "first"
        ? `No step yet: the run has been running for over ${over} (since ${since}, its start or resume) `
          + "with the trainer connected: it may still be loading data or the model, or compiling; or the "
          + "training loop is stuck before its first step."
        : `No new step for over ${over} (since ${since}) while the trainer is connected: the training loop may be `
          + "stuck (a hung data loader, a deadlock, a blocked collective) or busy between steps (a long evaluation, "
          + "a checkpoint).";
    }
  }
  if (message === stall.message) return; // checked every second: the banner is touched on a change only
  stall.message = message;
  setCondition("stall", message, "warn");
  document.body.dataset.stall = kind;
}
setInterval(checkStall, STALL_CHECK_MS);

function setStep(step) {
  if (step === null || step === undefined || (page.lastStep !== null && step <= page.lastStep)) return;
  page.lastStep = step;
  $("step").textContent = String(step);
  document.body.dataset.lastStep = String(step);
}

function setLayers(layers) {
  page.layers = layers;
  const note = deadUnitsNote(layers);
  if (charts.dead.empty !== note) {
    charts.dead.empty = note;
    charts.dead.dataDirty = true; // an empty card drawn before the layers were known says why anew
    scheduler.mark(charts.dead);
  }
  controls.setLayers(layers);
  const select = $("hist-layer");
  select.replaceChildren(...layers.map((l) => new Option(`${l.name} (${l.kind})`, l.name)));
  const act = layers.find((l) => /relu|tanh|sigmoid|gelu|silu|elu|mish|softplus|hard|softsign/i.test(l.kind));
  page.histLayer = (act || layers[0] || {}).name ?? null;
  if (page.histLayer) select.value = page.histLayer;
}

/** A run opened before its trainer said hello learns its layers from the first probe frame. */
async function refreshLayers() {
  page.refreshingLayers = true;
  try {
    const d = await getJSON(runUrl(runId));
    if (!page.layers.length && d.layers?.length) {
      setLayers(d.layers);
      charts.hist.clear(page.histLayer);
      await loadHistogramOverTime(page.histLayer);
    }
  } finally {
    page.refreshingLayers = false;
  }
}

function applyDetail(d) {
  $("run-name").textContent = d.name || d.id;
  document.title = `${d.name || d.id} · layerscope`;
  page.firstStep = d.first_step ?? 0;
  // a distributed run's ranks: its per-rank series are charted together in "Other scalars"
  $("world").hidden = !(d.world_size > 1);
  $("world-size").textContent = d.world_size > 1 ? String(d.world_size) : "";
  setLayers(d.layers || []);
  controls.setConfig(d.config);
  controls.setState(d.control);
  const config = $("config");
  const flat = flatConfig(d.config);
  events.setZeroInit((flat["model.init"] ?? flat.init) === "zero");
  // init_std is the normal init's alone: He and Xavier take their scale from the layer
  if ("model.init" in flat && flat["model.init"] !== "normal") delete flat["model.init_std"];
  // watch()'s own keys repeat a built-in experiment's ("lr 0.05" beside "solver.lr 0.05"),
  // and "name" the title: each shown once
  for (const key of Object.keys(flat)) {
    if (key.includes(".")) continue;
    if (key === "name" ? flat[key] === (d.name || d.id)
      : Object.keys(flat).some((k) => k.endsWith(`.${key}`) && flat[k] === flat[key])) delete flat[key];
  }
  config.replaceChildren(...Object.entries(flat)
    .filter(([, v]) => v !== null && typeof v !== "object")
    .map(([k, v]) => {
      const span = document.createElement("span");
      const b = document.createElement("b");
      span.className = "kv";
      b.textContent = String(v);
      span.append(`${k} `, b);
      return span;
    }));
  for (const name of d.series_names || []) route(name);
  // a choice kept from an earlier visit, else the default, else the first
  const kept = storedOther();
  const first = other.names.includes(kept) ? kept : other.names.includes(OTHER_DEFAULT) ? OTHER_DEFAULT : other.names[0];
  if (first !== undefined && first !== other.selected) selectOther(first, { picked: first === kept, load: false });
  setLast(d.last || {});
  setStep(d.last_step);
  setStatus(d.status, d.trainer_connected);
}

function setLast(last) {
  if ("loss" in last) $("last-loss").textContent = formatNumber(last.loss);
  if ("val_loss" in last) $("last-val-loss").textContent = formatNumber(last.val_loss);
}

// ---- history over REST ----

/**
 * Sends every history request, the line charts' first, the small multiples' step
 * included (the server snaps it). Returns `lines`, resolved once the line charts'
 * series are applied (what the preview needs), and `all`, once everything is.
 */
function loadHistory(detail) {
  const names = [...routes.keys(), ...other.members].join(",");
  const matrix = (stat) => getJSON(runUrl(runId, "probes/matrix", { stat, max_steps: MATRIX_STEPS }));
  const ended = ENDED.has(page.status);
  const at = (ended ? stepFromUrl() : null) ?? detail.last_step ?? 0;
  const series = getJSON(runUrl(runId, "series", { names, max_points: SERIES_POINTS }));
  const cmds = getJSON(runUrl(runId, "commands"));
  // The rest is asked for once the series is in (or after PREVIEW_WAIT_MS): answered at
  // the same time on a busy server they delay it, and the preview and Plotly with it;
  // Plotly's run (seconds) leaves them the time they need.
  const gate = Promise.race([series.then(() => {}, () => {}),
    new Promise((resolve) => setTimeout(resolve, PREVIEW_WAIT_MS))]);
  const later = (request) => gate.then(request);
  const rest = [later(() => matrix("dead_ratio")), later(() => matrix("saturated_ratio")),
    later(() => matrix("grad_norm")), later(() => matrix("update_ratio")),
    later(() => getJSON(runUrl(runId, "probe_steps"))),
    later(() => readEvents())];
  const shownReq = later(() => getJSON(runUrl(runId, "histogram", { step: at })))
    .catch((e) => (e instanceof ApiError && e.status === 404 ? null : Promise.reject(e)));
  const hist = later(() => loadHistogramOverTime(page.histLayer));
  // The preview waits for the series alone; the commands add their markers to it when
  // they come first.
  const marked = cmds.then((c) => {
    for (const command of c) markers.fromCommand(command);
    drawMarkers();
    controls.historyFrom(c);
  });
  const lines = series.then((s) => {
    for (const [name, points] of Object.entries(s)) {
      const r = route(name);
      if (r) r[0].setSeries(r[1], points.steps, points.values);
      else if (otherIndex(name) >= 0) charts.other.setSeries(otherIndex(name), points.steps, points.values);
      noteFirstStep(points.steps[0]);
    }
  });
  const all = Promise.all([...rest, shownReq, lines, marked, hist]).then(([dead, sat, grad, update, steps, evs, shown]) => {
    charts.dead.set(dead.layers, dead.steps, dead.z);
    charts.sat.set(sat.layers, sat.steps, sat.z);
    // a layer with a gradient has parameters: the freeze picker lists those
    controls.addParamLayers(grad.layers.filter((_, i) => grad.z[i].some((v) => v !== null)));
    for (const [chart, m] of [[charts.grad, grad], [charts.update, update]]) {
      m.layers.forEach((name, i) => {
        if (m.z[i].some((v) => v !== null)) chart.setSeries(layerTrace(chart, name), m.steps, m.z[i]);
      });
    }
    snapshots.setSteps(steps.steps);
    noteFirstStep(steps.steps[0]);
    if (shown && steps.steps.length) snapshots.prime(at, shown);
    addEvents(evs.log, evs.more); // oldest first, as stored
    for (const ev of evs.log) if (ev.kind === "sanity") noteSanity(ev);
    for (const ev of evs.sanity) noteSanity(ev);
    addAlerts(evs.alerts);
  });
  return { lines, all };
}

/**
 * The run's first step with data (a scalar row or a probe): the replay starts there. The
 * detail's first_step counts events too, and watch() records its "running" status at step 0
 * while its first row is step 1 (a run uploaded by sync, too, started its scrubber at 0).
 */
function noteFirstStep(step) {
  if (typeof step !== "number") return;
  page.dataFirstStep = page.dataFirstStep === null ? step : Math.min(page.dataFirstStep, step);
}

/**
 * The log's events: the newest EVENTS_READ (`log`, oldest first; `more`: the run has older
 * ones), and when there are older ones, every alert and sanity verdict apart (`alerts`,
 * `sanity`): the replay shows those of the cursor's step, whatever the log lists.
 */
async function readEvents() {
  const read = await getJSON(runUrl(runId, "events", { limit: EVENTS_READ + 1 }));
  const more = read.length > EVENTS_READ;
  const log = more ? read.slice(1) : read;
  if (!more) return { log, more, alerts: [], sanity: [] };
  const [alerts, sanity] = await Promise.all([
    getJSON(runUrl(runId, "events", { kind: "alert", limit: ALERTS_READ })),
    getJSON(runUrl(runId, "events", { kind: "sanity", limit: ALERTS_READ })),
  ]);
  return { log, more, alerts, sanity };
}

/** The log's "Load older": the next EVENTS_READ older events at its foot. */
async function loadOlderEvents() {
  // the server lists the newest N (no offset): N is what the log lists and EVENTS_READ more
  const want = Math.min(events.lines().length + EVENTS_READ, ALERTS_READ - 1);
  const read = await getJSON(runUrl(runId, "events", { limit: want + 1 }));
  const more = read.length > want;
  events.addOlder(more ? read.slice(1) : read, more);
  markAlerts();
}

/** The loss chart's alert markers: the steps alerts fired at (the latest MAX_ALERT_MARKS). */
function markAlerts(before = -1) {
  if (events.alertSteps.size === before) return;
  charts.loss.setAlertSteps([...events.alertSteps].sort((a, b) => a - b).slice(-MAX_ALERT_MARKS));
}

/** Adds events to the log and alerts list (`older`: the run has events before them); new alerts' steps become the loss chart's alert markers. */
function addEvents(evs, older = false) {
  const before = events.alertSteps.size;
  events.add(evs);
  if (older) events.setOlder(true);
  markAlerts(before);
}

/** Alerts read apart from the log: the alerts panel and the markers. */
function addAlerts(evs) {
  const before = events.alertSteps.size;
  events.addAlerts(evs);
  markAlerts(before);
}

/** A chart's history that could not load (page.reload marks it, read again once the
 * socket is back): a banner condition, cleared when every such chart has loaded, not an
 * error toast, which stays until dismissed and, in an outage, pushed out real errors. */
function loadFailed(message) {
  if (page.reload.size) setCondition("load", `${message}; it is read again once the server answers.`);
  else toast(message, "error");
}

function reloaded(what) {
  page.reload.delete(what);
  if (!page.reload.size) setCondition("load", null);
}

async function loadHistogramOverTime(layer) {
  if (!layer) return;
  let h;
  try {
    h = await getJSON(runUrl(runId, "histograms", { layer, max_steps: HIST_STEPS }));
  } catch (e) {
    if (layer === page.histLayer) page.reload.add("hist");
    throw e;
  }
  if (layer !== page.histLayer) return;
  reloaded("hist");
  charts.hist.set(layer, h.steps, h.edges, h.z);
}

function regrid(layer) {
  const now = performance.now();
  if (now - page.lastRegrid < REGRID_MIN_MS) return;
  page.lastRegrid = now;
  loadHistogramOverTime(layer).catch((e) => loadFailed(`Histogram reload failed: ${e.message}`));
}

function drawMarkers() {
  const list = markers.list();
  for (const c of [charts.loss, charts.lr, charts.wd]) c.setMarkers(list);
  // after the step each was applied at (markerX); dense ones a band (groupMarkers), as the line charts draw them
  const lo = Math.min(page.dataFirstStep ?? page.firstStep, list[0]?.x ?? Infinity); // list: by step
  const hi = Math.max(page.lastStep ?? lo, list[list.length - 1]?.x ?? -Infinity);
  for (const c of [charts.dead, charts.sat]) {
    c.setMarkers(groupMarkers(list, stepsPerPixels(c.div, lo, hi)).map((k) => ({ x0: k.x, x1: k.x1 ?? k.x })));
  }
}

// ---- live frames ----

/** Resolves once the viewer socket is subscribed (its snapshot came) or has failed. */
let socketSettled;
const subscribed = new Promise((resolve) => { socketSettled = resolve; });
const SUBSCRIBE_WAIT_MS = 5000;

function onSnapshot(msg) {
  socketSettled();
  if (msg.control) controls.setState(msg.control);
  if (msg.run) {
    setLast(msg.run.last || {});
    setStep(msg.run.last_step);
  }
  setStatus(msg.run?.status, msg.trainer_connected, msg.uploading);
  noteStore(msg.store_problem ?? null);
  noteStallSnapshot(msg);
  if (!page.historyLoaded && msg.probes?.length) page.buffer.push(...msg.probes.map((p) => ({ type: "probe", ...p })));
  else if (page.historyLoaded) {
    // A reconnect too far behind for a catch-up gets a snapshot instead of the frames it
    // missed (the server's catch-up cap): read the history again, so the curves keep no gap.
    const detail = { ...page.detail, last_step: msg.run?.last_step ?? page.detail.last_step };
    loadHistory(detail).all.catch((e) => toast(`History reload failed: ${e.message}`, "error"));
  }
}

/** After a catch-up's frames (each went to onFrame): the server's pace. */
function onCatchup(msg) {
  noteServerPace(msg, null);
}

function onFrame(frame) {
  noteStepFrame(frame); // as it arrives: a stuck loop is timed by arrivals, not by drawing
  // Frames and events wait for the history (a server event has no seq; the history's
  // events hold it too and the log shows it once); status and replies apply at once.
  if (!page.historyLoaded && (frame.seq !== undefined || frame.type === "event")) {
    page.buffer.push(frame);
    return;
  }
  apply(frame);
}

function apply(frame) {
  switch (frame.type) {
    case "metrics": return applyMetrics(frame);
    case "probe": return applyProbe(frame);
    case "event": return applyEvent(frame);
    case "status": page.statusFrames++; return setStatus(frame.status, frame.trainer_connected, frame.uploading);
    case "heartbeat": setStep(frame.step); return setStatus(frame.status);
    case "command_result": controls.serverResult(frame); return rules.serverResult(frame);
    case "error": return toast(`Server: ${frame.message}`, "error");
    default: return undefined;
  }
}

function applyMetrics(frame) {
  for (const row of frame.rows || []) {
    for (const [name, value] of Object.entries(row.values || {})) {
      const r = route(name);
      if (r) r[0].append(r[1], row.step, value);
      else if (otherIndex(name) >= 0) appendOther(name, row.step, value);
    }
    setLast(row.values || {});
    setStep(row.step);
    noteFirstStep(row.step);
  }
}

function applyProbe(frame) {
  if (!page.layers.length && !page.refreshingLayers) {
    refreshLayers().catch((e) => toast(`Could not load the run's layers: ${e.message}`, "error"));
  }
  const dead = new Map();
  const sat = new Map();
  const withParams = [];
  for (const layer of frame.layers || []) {
    if ((layer.weight_norm ?? layer.grad_norm ?? null) !== null) withParams.push(layer.name);
    dead.set(layer.name, layer.dead_ratio);
    sat.set(layer.name, layer.saturated_ratio);
    for (const [chart, value] of [[charts.grad, layer.grad_norm], [charts.update, layer.update_ratio]]) {
      // Layers without parameters (activations) have no gradient: no line at all.
      if (value !== null || chart.traces.some((t) => t.name === layer.name)) {
        chart.append(layerTrace(chart, layer.name), frame.step, value);
      }
    }
    if (layer.name === page.histLayer) charts.hist.append(frame.step, layer.hist);
  }
  controls.addParamLayers(withParams);
  charts.dead.appendColumn(frame.step, dead);
  charts.sat.appendColumn(frame.step, sat);
  snapshots.live(frame);
  setStep(frame.step);
  noteFirstStep(frame.step);
}

/** The run's sanity verdicts (events of kind "sanity", by key), oldest first. */
const verdicts = new Map();
/** Replay: the badge shows the verdict given by this step (null: the latest). */
let sanityCursor = null;

function noteSanity(ev) {
  verdicts.set(eventKey(ev), ev);
  showSanity();
}

/**
 * The overfit sanity check's verdict as a PASS/FAIL badge next to the status; in replay,
 * the verdict given by the cursor's step, and "no verdict yet" before it came.
 */
function showSanity(step = sanityCursor) {
  sanityCursor = step;
  const badge = $("sanity");
  const at = (ev) => (typeof ev.step === "number" ? ev.step : -1);
  const all = [...verdicts.values()].sort((a, b) => at(a) - at(b));
  if (!all.length) return;
  const given = all.filter((ev) => step === null || typeof ev.step !== "number" || ev.step <= step);
  const ev = given[given.length - 1];
  badge.hidden = false;
  if (!ev) {
    badge.className = "badge";
    badge.textContent = "sanity: no verdict yet";
    badge.title = `no sanity verdict by step ${step}: it came at step ${all[0].step}`;
    return;
  }
  const d = ev.data || {};
  badge.className = `badge ${d.passed ? "pass" : "fail"}`;
  badge.textContent = `sanity ${d.passed ? "PASS" : "FAIL"}`;
  badge.title = d.message || "";
}

/** New alerts not said yet: said together once the frames at hand are applied. */
const unsaid = [];

/** An alert in words, as it is said: "Alert: ExplodingTensor on fc1 at step 3 — run paused". */
function alertWords(ev) {
  const d = ev.data || {};
  const action = d.action?.name === "pause" ? " — run paused" : d.action ? ` — ${actionText(d.action)}` : "";
  return `Alert: ${d.rule || "alert"}${d.layer ? ` on ${d.layer}` : ""} at step ${ev.step ?? "—"}${action}`;
}

/**
 * Says new alerts aloud (the visually hidden live regions): assertively when a rule paused
 * the run, politely otherwise; a burst (a reconnect's catch-up) as one line. The alerts
 * list itself is re-rendered whole and is no live region; acknowledgements are heard from
 * #acked, statuses from #status.
 */
function announce(ev) {
  unsaid.push(ev);
  if (unsaid.length === 1) setTimeout(sayAlerts, 0);
}

function sayAlerts() {
  const alerts = unsaid.splice(0);
  if (!alerts.length) return;
  const pauses = alerts.some((ev) => ev.data?.action?.name === "pause");
  const last = alerts[alerts.length - 1];
  const text = alerts.length > 3 ? `${alerts.length} new alerts; the latest: ${alertWords(last)}`
    : alerts.map(alertWords).join(". ");
  const region = $(pauses ? "announce-urgent" : "announce");
  const line = document.createElement("p");
  line.textContent = text;
  region.append(line); // an addition is read out; the oldest lines go quietly
  while (region.children.length > 3) region.firstElementChild.remove();
}

/**
 * Why the server cannot store what trainers send right now (a full disk, a damaged
 * database: the snapshot's store_problem, then the server's live "store" events, which
 * are not stored and not for the log), or null. Said above "the trainer is not connected",
 * which is what follows from it: the server closes the trainer's connection.
 */
function noteStore(problem) {
  setCondition("store", problem
    ? `The server cannot store this run's data: ${problem}. The trainer keeps its frames and resends them once the server can store them.`
    : null);
}

function applyEvent(frame) {
  if (frame.kind === "store") return noteStore(frame.data?.problem ?? null);
  const fresh = frame.kind === "alert" && !events.alertSeen.has(eventKey(frame));
  addEvents([frame]);
  if (fresh && page.historyLoaded && !page.replaying) announce(frame);
  if (frame.kind === "sanity") noteSanity(frame);
  if (frame.kind === "status" && frame.data?.control) controls.setState(frame.data.control);
  if (frame.kind === "command_result") {
    controls.acknowledged(frame);
    rules.acknowledged(frame);
    markers.fromEvent(frame, controls.sent);
    drawMarkers();
  } else if (frame.kind === "status" && typeof frame.seq === "number") {
    // The trainer's; a server's status event (no seq) is for the log: its status frame,
    // sent with it, says the same, and a server event held until the history is in is older.
    page.statusEvents++;
    setStatus(frame.data?.status);
  }
}

/**
 * After a reconnect the socket's catch-up (?after_seq) carries frames, not the trainer's
 * state: the server may have restarted without it. The run's detail says whether a
 * trainer is connected now; a status frame or event that came while it was asked for may be
 * newer, and wins. Nor does it carry the server's own events (commands sent, statuses it
 * set) from while the socket was down: the log reads them (what it has is not added twice).
 */
async function refreshRunState() {
  const frames = page.statusFrames;
  const statusEvents = page.statusEvents;
  const [d, logged] = await Promise.all([getJSON(runUrl(runId)),
    page.historyLoaded ? getJSON(runUrl(runId, "events", { limit: EVENTS_READ })) : []]);
  // The control state is left to the acknowledgements: the detail's may predate one.
  const quiet = page.statusFrames === frames;
  setStatus(quiet && page.statusEvents === statusEvents ? d.status : undefined, quiet ? d.trainer_connected : undefined);
  addEvents(logged.filter((ev) => ev.seq === null)); // the trainer's came in the catch-up
  // a layer or series picked while the server was down: its chart held only what came live
  if (page.reload.has("hist")) {
    loadHistogramOverTime(page.histLayer).catch((e) => loadFailed(`Histogram load failed: ${e.message}`));
  }
  if (page.reload.has("other") && other.selected) {
    loadOther(other.selected).catch((e) => loadFailed(`Could not load ${otherLabel(other.selected)}: ${e.message}`));
  }
}

function onConnection(state, detail, info = {}) {
  if (state === "lost") socketSettled();
  if (state === "lost") controls.socketLost();
  if (state === "open" && !page.socketOpen && page.wasOpen) {
    refreshRunState().catch((e) => toast(`Could not refresh the run's state: ${e.message}`, "error"));
  }
  if (state === "open") page.wasOpen = true;
  if (state === "open") stall.stepAtOpen = stall.step; // before its snapshot's or catch-up's frames
  page.socketOpen = state === "open";
  document.body.dataset.socket = state;
  setCondition("socket", page.socketOpen ? null : connectionLost(detail, info));
  controls.setRun({ socketOpen: page.socketOpen });
  checkStall();
}

/** The banner for a socket that is down: a deleted run and a refused tab will not come
 * back by waiting, so neither is said to be reconnecting (socket.js says why in `detail`). */
function connectionLost(detail, info) {
  if (info.gone || info.refused) return `Live updates stopped: ${detail}.`;
  return `Connection to the server lost (${detail}); reconnecting — live updates resume where they stopped.`;
}

// ---- replay ----

function startReplay() {
  page.replaying = true;
  $("replay").style.visibility = "";
  const first = page.dataFirstStep ?? page.firstStep;
  const last = Math.max(page.lastStep ?? 0, first);
  replay.show(first, last, recordedPace(page.detail, first, last));
  snapshots.following = false;
  const wanted = stepFromUrl();
  replay.seek(wanted ?? last, { updateUrl: false });
  if (page.detail && !ENDED.has(page.detail.status)) {
    // It ended while shown: the detail read at load time had its clock only that far.
    getJSON(runUrl(runId)).then((d) => {
      const pace = recordedPace(d, first, last);
      if (pace > 0) replay.setPace(pace);
    }).catch((e) => toast(`Could not read the run's pace: ${e.message}`, "error"));
  }
}

/**
 * Steps per second at ×1: the pace training went at, by the trainer's own clock (the
 * detail's clock: its rows' time_s at the first and last step of a series). A run uploaded
 * by layerscope sync was created and last updated during the upload, so updated_at -
 * created_at (the fallback, for rows with no time_s) timed the upload, not the training.
 */
function recordedPace(d, first, last) {
  const c = d?.clock;
  if (c && c.last_step > c.first_step && c.last_time_s > c.first_time_s) {
    return (c.last_step - c.first_step) / (c.last_time_s - c.first_time_s);
  }
  const t = (v) => (typeof v === "number" ? v * (v < 1e11 ? 1000 : 1) : Date.parse(v));
  const seconds = d ? (t(d.updated_at) - t(d.created_at)) / 1000 : NaN;
  return Number.isFinite(seconds) && seconds > 0 ? (last - first) / seconds : 0;
}

/** The header's loss and val loss: the series they are read from, the element each is shown in. */
const HEADER_LOSSES = [["loss", "last-loss", 0], ["val_loss", "last-val-loss", 1]];
/** The most cursor steps whose stored losses the page keeps (a scrub back reads none again). */
const CURSOR_LOSS_CACHE = 500;
/**
 * Replay's header losses, as stored at the cursor's step: step -> {loss, val_loss}, each
 * {step, value} of the last stored row at or before it (null: none). The loss chart's
 * traces are downsampled (each bucket's lowest and highest point), so the value drawn at
 * or before the cursor was often another step's: "step 5000 · loss 0.09053", step 4998's,
 * where step 5000 stored 0.04021. One request at a time: a scrub asks for the step the
 * cursor is at once the last answer is in, not for every step it passed.
 */
const cursorLoss = { cache: new Map(), wanted: null, busy: false };

/** A stored {step, value} as the header writes it at cursor `step`: its step named when it is another. */
function cursorLossText(point, step) {
  if (!point) return formatNumber(null);
  return point.step === step ? formatNumber(point.value) : `${formatNumber(point.value)} (step ${point.step})`;
}

function showCursorLoss(step, at) {
  for (const [name, id] of HEADER_LOSSES) {
    const el = $(id);
    el.textContent = cursorLossText(at[name], step);
    el.title = at[name] ? `as stored at step ${at[name].step}` : `no ${name} stored by step ${step}`;
    el.classList.remove("stale");
  }
  document.body.dataset.lossStep = String(step);
}

/**
 * The losses at `step` without asking the server, when the chart holds them: a trace with
 * a point at that very step (downsampling keeps stored points as they are), or a series
 * the run never logged (the history read all of it). Else null.
 */
function chartLossAt(step) {
  const at = {};
  for (const [name, , i] of HEADER_LOSSES) {
    const m = charts.loss.model[i];
    if (!m || !m.x.length) { at[name] = null; continue; }
    const k = charts.loss.indexAtOrBefore(i, step);
    if (k < 0 || m.x[k] !== step) return null;
    at[name] = { step, value: m.y[k] };
  }
  return at;
}

async function readCursorLoss() {
  cursorLoss.busy = true;
  try {
    while (cursorLoss.wanted !== null) {
      const step = cursorLoss.wanted;
      cursorLoss.wanted = null;
      if (cursorLoss.cache.has(step)) continue;
      // max_points=2: the series' first and last stored rows up to `end`, two index reads
      const names = HEADER_LOSSES.map(([name]) => name).join(",");
      const s = await getJSON(runUrl(runId, "series", { names, end: step, max_points: 2 }));
      const at = {};
      for (const [name] of HEADER_LOSSES) {
        const k = (s[name]?.steps?.length ?? 0) - 1;
        at[name] = k < 0 ? null : { step: s[name].steps[k], value: s[name].values[k] };
      }
      cursorLoss.cache.set(step, at);
      if (cursorLoss.cache.size > CURSOR_LOSS_CACHE) cursorLoss.cache.delete(cursorLoss.cache.keys().next().value);
      if (document.body.dataset.factsStep === String(step)) showCursorLoss(step, at);
    }
  } catch (e) {
    toast(`Could not read the loss at the cursor: ${e.message}`, "error");
  } finally {
    cursorLoss.busy = false;
  }
}

/** In replay the header's step and losses are the cursor's, with the last step beside them. */
function showCursorFacts(step) {
  $("step").textContent = `${step} of ${page.lastStep ?? step}`;
  $("step").title = "the replay cursor's step, of the run's last";
  document.body.dataset.factsStep = String(step);
  const known = cursorLoss.cache.get(step) ?? chartLossAt(step);
  if (known) {
    showCursorLoss(step, known);
    return;
  }
  // the previous step's values, dimmed, until the stored ones are in
  for (const [, id] of HEADER_LOSSES) $(id).classList.add("stale");
  cursorLoss.wanted = step;
  if (!cursorLoss.busy) readCursorLoss();
}

function moveCursor(step) {
  if (page.replaying) {
    showCursorFacts(step);
    // the run as it stood at the cursor: the alerts raised by then, the control state acknowledged by then
    // (the log marks the lines after it; an applied command counts from the step after it)
    events.setCursor(step, page.lastStep);
    showSanity(step);
    controls.showAt(step < (page.lastStep ?? step) ? step : null);
  }
  for (const c of Object.values(charts)) c.setCursor(step);
  snapshots.request(step).catch((e) => toast(`Histogram load failed: ${e.message}`, "error"));
}

// ---- page wiring ----

$("loss-log").addEventListener("change", (ev) => charts.loss.setLogY(ev.target.checked));
$("loss-smooth").addEventListener("input", (ev) => charts.loss.setSmoothing(Number(ev.target.value)));
$("hist-layer").addEventListener("change", (ev) => {
  page.histLayer = ev.target.value;
  charts.hist.clear(page.histLayer);
  loadHistogramOverTime(page.histLayer).catch((e) => loadFailed(`Histogram load failed: ${e.message}`));
});

/** Every chart and the small multiples, as the scheduler knows them. */
const drawables = [...Object.values(charts), multiples];
/** The charts preview.js draws before Plotly has run (their data is the first to come). */
const PREVIEWED = [charts.loss, charts.acc, charts.lr, charts.wd];
const element = (chart) => chart.div || chart.container;

const afterPaint = () => new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));

/** The window's charts are visible with their data: body data-painted-ms, mark "layerscope:painted". */
function markPainted(shown, by) {
  performance.mark("layerscope:painted");
  document.body.dataset.paintedMs = String(Math.round(performance.now()));
  document.body.dataset.paintedBy = by;
  document.body.dataset.paintedCharts = shown.map((c) => element(c).id).join(" ");
}

/**
 * The line charts in the window drawn on canvas (preview.js) as soon as their series
 * and commands are in, and painted, before Plotly runs: its bundle holds the main thread
 * for seconds here. Returns whether that painted the window (every chart in it is one
 * of those). No preview when the data takes longer than PREVIEW_WAIT_MS (Plotly is
 * then run rather than kept waiting) or Plotly has already run.
 */
async function preview(lines, ended) {
  const wait = new Promise((resolve) => setTimeout(() => resolve(false), PREVIEW_WAIT_MS));
  const arrived = await Promise.race([lines.then(() => true, () => false), wait]);
  if (!arrived || window.Plotly) return false;
  // The scrubber appears once the history is in; its room is kept now so that the
  // charts do not move between the preview and Plotly's charts.
  if (ended) {
    $("replay").style.visibility = "hidden";
    $("replay").hidden = false;
  }
  const shown = drawables.filter((c) => inViewport(element(c)));
  const previewed = shown.filter((c) => PREVIEWED.includes(c));
  const title = (c) => c.div.closest(".card")?.querySelector("h2")?.textContent ?? c.yTitle;
  for (const c of previewed) drawPreview(c, title(c));
  if (!previewed.length) return false;
  await afterPaint();
  if (previewed.length < shown.length) return false;
  markPainted(shown, "preview");
  return true;
}

/**
 * Plotly's first paint: the charts in the window are drawn first (body
 * data-plotly-painted-ms, mark "layerscope:plotly-painted"; also data-painted-ms and
 * "layerscope:painted" unless the preview painted them), the ones below the fold right
 * after (data-ready-ms, "layerscope:drawn", data-ready="1").
 */
async function paint(previewed) {
  const shown = drawables.filter((c) => inViewport(element(c)));
  await scheduler.flush(undefined, (c) => shown.includes(c));
  await new Promise((resolve) => setTimeout(resolve, 0)); // after that frame's paint
  performance.mark("layerscope:plotly-painted");
  document.body.dataset.plotlyPaintedMs = String(Math.round(performance.now()));
  if (!previewed) markPainted(shown, "plotly");
  await new Promise((resolve) => setTimeout(resolve, 0)); // input and scrolling go first
  await scheduler.flush();
  scheduler.release();
  await new Promise((resolve) => setTimeout(resolve, 0));
  performance.mark("layerscope:drawn");
}

async function main() {
  scheduler.hold();
  let detail;
  try {
    detail = await getJSON(runUrl(runId));
  } catch (e) {
    const msg = e instanceof ApiError && e.status === 404 ? `Run “${runId}” not found.` : `Could not load the run: ${e.message}`;
    setCondition("run", msg);
    document.body.dataset.ready = "error";
    return;
  }
  page.detail = detail;
  applyDetail(detail);
  socket.start();
  snapshots.following = !ENDED.has(page.status);
  // A live run's frames from before the subscription are in the history only if it is
  // read after it (a round trip; Plotly's download takes longer). An ended run has none.
  if (!ENDED.has(page.status)) {
    await Promise.race([subscribed, new Promise((resolve) => setTimeout(resolve, SUBSCRIBE_WAIT_MS))]);
  }
  // The requests go out before Plotly runs: it holds the main thread for seconds here,
  // and runs only once the preview of the window's line charts is painted.
  const { lines, all } = loadHistory(detail);
  const history = all.then(() => performance.mark("layerscope:history"));
  history.catch(() => {}); // a failure is thrown by the await below, not reported while the preview waits
  // A failed preview leaves the page to Plotly (and says so: tests fail on console errors).
  const previewed = await preview(lines, ENDED.has(page.status)).catch((e) => {
    console.error("layerscope: the chart preview failed", e);
    return false;
  });
  await Promise.all([history, plotlyReady()]);
  page.historyLoaded = true;
  for (const frame of page.buffer.splice(0)) apply(frame);
  setStatus();
  await paint(previewed);
  document.body.dataset.readyMs = String(Math.round(performance.now()));
  document.body.dataset.ready = "1";
}

main().catch((e) => {
  scheduler.release();
  setCondition("run", `The page failed to load: ${e.message}`);
  document.body.dataset.ready = "error";
  throw e;
});
