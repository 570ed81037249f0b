/**
 * charts.js — the redraw scheduler, the shared Plotly theme and line charts.
 *
 * Owns: one requestAnimationFrame loop that redraws dirty charts at most ~10
 * times a second however fast frames arrive (a chart outside the window at most
 * every OFFSCREEN_INTERVAL_MS, and drawing never takes more than about half the
 * main thread); LineChart, which keeps its own
 * bounded copy of every trace (decimated past maxPoints, the last point always
 * kept) and updates Plotly in place (extendTraces for appends, react otherwise);
 * the replay cursor and command markers drawn on every time axis; removing a
 * chart's canvas preview (preview.js) when Plotly first draws it; every chart's text
 * alternative (describeChart: a named figure with a short summary of its data, rewritten
 * when the data change, at most once a second a chart).
 * Never: fetches data, hands Plotly an array it also mutates itself, or hands it a
 * user's string (a trace, layer or run name, a command label) unescaped: plotlyText.
 */

export const REDRAW_INTERVAL_MS = 100;
const MAX_REDRAW_INTERVAL_MS = 500; // the live lag's bound; see Scheduler.flush
/**
 * A dirty chart outside the window is redrawn at most this often (at once when it scrolls
 * in). A fast deep run (45 probed layers, a probe frame every 30 ms) had every chart
 * redrawn on every flush, those below the fold included (the per-layer line charts, the
 * histogram heatmap, 45 small multiples): the tab's main thread was 95-105% busy on a
 * 2-core machine, its socket fell behind the run and a command's acknowledgement showed
 * seconds late.
 */
export const OFFSCREEN_INTERVAL_MS = 5000;
/** A tick draws charts until it has spent this long (one chart at least); the rest go on next frame. */
const ROUND_BUDGET_MS = 40;
/** A chart is redrawn no sooner than this many times its last draw's cost after it. */
const COST_FACTOR = 4;
export const MAX_POINTS = 4000;
/**
 * A trace of at most this many points is drawn with a marker on each: drawn as lines alone,
 * a single point (a run probed every 100 steps has one probe step for its first 100) is
 * invisible, and a few look like an empty chart.
 */
export const FEW_POINTS = 12;
/** A trace with its own symbol (LineChart's trace.symbol) shows it on at most this many of its points. */
export const SYMBOL_POINTS = 10;
export const COLORS = ["#4aa3ff", "#f5a623", "#3fb970", "#e0609a", "#a98bff", "#36c5c5",
  "#f0564a", "#c2d94c", "#ff8a5c", "#8fa7c4"];

/**
 * Layers in depth order, first (input side) to last: a sequential scale (Viridis), so a
 * chart with a line per layer reads shallow from deep at a glance.
 */
// Blue (first layer) to yellow (last), every colour light enough to read on the dark
// theme: Viridis's own first colours (#440154, #3b528b) all but vanished into it.
export const DEPTH_SCALE = [[0, "#5b8ff9"], [0.35, "#2ec4b6"], [0.7, "#9bd65a"], [1, "#fde725"]];

/** The DEPTH_SCALE colour of layer i of n (0: the first layer), as "rgb(r, g, b)". */
export function depthColor(i, n) {
  const t = n > 1 ? Math.min(1, Math.max(0, i / (n - 1))) : 0;
  let k = 1;
  while (k < DEPTH_SCALE.length - 1 && DEPTH_SCALE[k][0] < t) k++;
  const [t0, c0] = DEPTH_SCALE[k - 1];
  const [t1, c1] = DEPTH_SCALE[k];
  const f = t1 > t0 ? (t - t0) / (t1 - t0) : 0;
  const rgb = [1, 3, 5].map((o) => {
    const a = parseInt(c0.slice(o, o + 2), 16);
    const b = parseInt(c1.slice(o, o + 2), 16);
    return Math.round(a + (b - a) * f);
  });
  return `rgb(${rgb.join(", ")})`;
}

const Plotly = () => window.Plotly;
const USER_MARKER_COLOR = "#e3a52b";
const RULE_MARKER_COLOR = "#e0609a";

/**
 * Resolves once Plotly is loaded. Pages load their module before the Plotly bundle,
 * so their requests run while the browser parses it; nothing draws before this.
 * A page that only preloads the bundle (`<link rel="preload" as="script">`) has it
 * run here, on the first call: the run page calls this after issuing its requests,
 * because running Plotly takes the main thread for a second or more (4.7 MB), and
 * a request's continuation queued behind it would start only after it.
 */
export function plotlyReady() {
  if (window.Plotly) return Promise.resolve();
  let script = document.querySelector("script[src*='plotly.min.js']");
  if (!script) {
    const preload = document.querySelector("link[rel='preload'][href*='plotly.min.js']");
    if (preload) {
      script = document.createElement("script");
      script.src = preload.href;
      document.head.append(script);
    }
  }
  return new Promise((resolve, reject) => {
    if (!script) { reject(new Error("the page has no Plotly script")); return; }
    script.addEventListener("load", () => { performance.mark("layerscope:plotly"); resolve(); }, { once: true });
    script.addEventListener("error", () => reject(new Error("Plotly failed to load")), { once: true });
  });
}

/**
 * Redraws dirty charts on animation frames, no more often than REDRAW_INTERVAL_MS;
 * a chart with a `due(now)` method (heatmaps: a summary of many steps, repainted
 * as an image, so once a second is plenty) waits until it says so, and a chart
 * outside the window (an IntersectionObserver says which are in it) waits
 * OFFSCREEN_INTERVAL_MS since its last draw, or until it scrolls in. While held
 * (a page loading its history) nothing draws on its own: drawing empty charts
 * first and again once the data arrive would cost the first paint a second here.
 * `stats` counts what was drawn (draws, offscreen draws, ms spent drawing): the
 * page's cost, read by tests and benchmarks.
 */
class Scheduler {
  constructor() {
    this.dirty = new Set();
    this.lastDraw = 0;
    this.frame = null;
    this.interval = REDRAW_INTERVAL_MS;
    this.held = false;
    this.visible = new WeakMap(); // element -> in the window (absent: not known yet, taken as in it)
    this.drawnAt = new WeakMap(); // chart -> performance.now() of its last draw
    this.cost = new WeakMap(); // chart -> ms its last draw took
    this.round = null; // a round of draws spread over animation frames: {started, drawn}
    this.byElement = new WeakMap(); // element -> chart, for the observer's callback
    this.observer = typeof IntersectionObserver === "function"
      ? new IntersectionObserver((entries) => this.seen(entries)) : null;
    this.stats = { flushes: 0, draws: 0, offscreenDraws: 0, drawMs: 0, byChart: {} };
  }

  mark(chart) {
    this.observe(chart);
    this.dirty.add(chart);
    summaries.changed(chart);
    this.schedule();
  }

  schedule() {
    if (this.frame === null && !this.held) this.frame = requestAnimationFrame((t) => this.tick(t));
  }

  observe(chart) {
    const el = chart.div || chart.container;
    if (!this.observer || !el || this.byElement.has(el)) return;
    this.byElement.set(el, chart);
    this.observer.observe(el);
  }

  seen(entries) {
    for (const e of entries) {
      this.visible.set(e.target, e.isIntersecting);
      // scrolled in with changes not drawn yet: draw them now, not at the offscreen pace
      if (e.isIntersecting && this.dirty.has(this.byElement.get(e.target))) this.schedule();
    }
  }

  /** False only for a chart known to be outside the window. */
  inWindow(chart) {
    const el = chart.div || chart.container;
    return !el || this.visible.get(el) !== false;
  }

  hold() { this.held = true; }

  release() {
    this.held = false;
    if (this.dirty.size) this.schedule();
  }

  tick(now) {
    this.frame = null;
    if (this.held) return;
    if (window.Plotly && (this.round || now - this.lastDraw >= this.interval)) {
      if (!this.round) {
        this.lastDraw = now;
        this.round = { started: performance.now(), drawn: 0 };
        this.stats.flushes++;
      }
      if (!this.drawSome(now)) {
        const { started, drawn } = this.round;
        this.round = null;
        const spent = performance.now() - started;
        this.interval = Math.max(Math.min(MAX_REDRAW_INTERVAL_MS, Math.max(REDRAW_INTERVAL_MS, 4 * spent)), 2 * drawn);
      }
    }
    if (this.dirty.size) this.frame = requestAnimationFrame((t) => this.tick(t));
  }

  /**
   * One animation frame's share of a round: the due charts, least recently drawn first,
   * until ROUND_BUDGET_MS is spent (one at least); true when due ones are left for the
   * next frame. A round of ten charts drawn in one task held the main thread for a second
   * and more, and the socket's frames (a command's acknowledgement among them) waited.
   */
  drawSome(now) {
    const due = [...this.dirty].filter((c) => this.due(c, now))
      .sort((a, b) => (this.drawnAt.get(a) ?? -Infinity) - (this.drawnAt.get(b) ?? -Infinity));
    const started = performance.now();
    let i = 0;
    for (; i < due.length && (i === 0 || performance.now() - started < ROUND_BUDGET_MS); i++) {
      this.drawOne(due[i]).catch((e) => console.error("layerscope: a chart failed to draw", e));
    }
    this.round.drawn += performance.now() - started;
    return i < due.length;
  }

  /** Draws one chart now, keeping its cost (see `due`) and the stats. */
  drawOne(chart) {
    this.dirty.delete(chart);
    const t0 = performance.now();
    this.drawnAt.set(chart, t0);
    if (!this.inWindow(chart)) this.stats.offscreenDraws++;
    const done = chart.draw();
    const cost = performance.now() - t0; // Plotly draws synchronously, mostly
    this.cost.set(chart, cost);
    this.stats.draws++;
    this.stats.drawMs += cost;
    const id = (chart.div || chart.container)?.id || "?";
    this.stats.byChart[id] = (this.stats.byChart[id] || 0) + cost;
    return Promise.resolve(done);
  }

  /**
   * At time `now` (a tick's): the chart's changes may be drawn: its own `due` agrees, it
   * was drawn at least COST_FACTOR times its last draw's cost ago (a chart of 44 lines
   * that takes 250 ms is redrawn every second or so, the loss curve as often as ever),
   * and it is in the window or was last drawn OFFSCREEN_INTERVAL_MS ago.
   */
  due(chart, now) {
    if (chart.due && !chart.due(now)) return false;
    const since = now - (this.drawnAt.get(chart) ?? -Infinity);
    if (since < COST_FACTOR * (this.cost.get(chart) ?? 0)) return false;
    return this.inWindow(chart) || since >= OFFSCREEN_INTERVAL_MS;
  }

  /**
   * Draws the dirty charts that are due (all of them when `now` is omitted) and,
   * given `only`, those it accepts; resolves in the animation frame that paints
   * them (a task queued from there runs after the paint). The next flush waits at
   * least REDRAW_INTERVAL_MS, longer when drawing was slow (4x the last draw), so a
   * slow machine gets fewer frames and input and the socket stay responsive; but at
   * most MAX_REDRAW_INTERVAL_MS, since the wait is lag a viewer sees: with a 1 s cap
   * a loaded 2-core machine showed a live run up to 1.04 s late, with 0.5 s at most
   * 0.52 s (benchmarks/browser.py --skip-paint --minutes 3, side by side). Unless
   * a draw took longer than half that cap: then the wait is twice the draw, so that
   * drawing holds at most half the main thread (the interval runs from the start of a
   * flush: with the cap alone, draws of 500 ms or more followed each other back to
   * back, and the socket's frames, input and acknowledgements queued behind them).
   */
  flush(now, only = () => true) {
    const charts = [...this.dirty].filter((c) => (now === undefined || this.due(c, now)) && only(c));
    const started = performance.now();
    this.stats.flushes++;
    const work = Promise.all(charts.map((c) => this.drawOne(c)));
    const drawn = performance.now() - started;
    return work
      .then(() => new Promise((resolve) => requestAnimationFrame(() => resolve())))
      .then(() => {
        const spent = performance.now() - started;
        this.interval = Math.max(Math.min(MAX_REDRAW_INTERVAL_MS, Math.max(REDRAW_INTERVAL_MS, 4 * spent)), 2 * drawn);
      });
  }
}

/** True when any part of `el` is inside the window's visible area. */
export function inViewport(el) {
  const r = el.getBoundingClientRect();
  return r.bottom > 0 && r.right > 0 && r.top < window.innerHeight && r.left < window.innerWidth && r.width > 0;
}

export const scheduler = new Scheduler();

export function baseLayout(extra = {}) {
  return {
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    font: { color: "#c5cdd8", size: 11, family: "system-ui, sans-serif" },
    margin: { l: 52, r: 12, t: 8, b: 32 },
    showlegend: true,
    legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom", bgcolor: "rgba(0,0,0,0)" },
    xaxis: { gridcolor: "#232b35", zerolinecolor: "#2a323d", title: { text: "" } },
    yaxis: { gridcolor: "#232b35", zerolinecolor: "#2a323d", exponentformat: "e", automargin: true },
    hovermode: "x",
    hoverlabel: { bgcolor: "#1c232c", bordercolor: "#2a323d", font: { color: "#d7dde5" } },
    uirevision: "keep",
    ...extra,
  };
}

/**
 * A log y axis: its labels the powers of ten alone (10⁻², 10⁻¹), the decade's other
 * gridlines unlabelled. Plotly's default labelled them with bare digits ("9 8 7 6 5 4 3 2
 * 0.1 9 8"): a "5" read as 0.05 or 0.5. A chart's axis with fewer than three powers of ten
 * in range takes logAxis's labels instead (2×10⁻³, 5×10⁻³, ...).
 */
export const LOG_AXIS = { type: "log", exponentformat: "power", minorloglabels: "none" };
// (An axis showing fewer than three powers of ten gets more labels: see logAxis.)

/**
 * A heatmap's step (x) axis: its title kept clear of the tick labels ("10k"), which it
 * overlapped by 5 px at any width (Plotly placed it by the fixed bottom margin); automargin
 * grows the margin for it instead. (A LineChart keeps its fixed margin, which preview.js
 * draws the same: its title clears the labels by 2 px.)
 */
export function stepAxis() {
  return { ...baseLayout().xaxis, title: { text: "step", standoff: 6 }, automargin: true };
}

/**
 * Every chart's Plotly config. The toolbar keeps what a keyboard can use (download, zoom
 * in/out, reset): its 8 buttons a chart were 80 of the run page's 115 tab stops. Dragging
 * still zooms (Plotly's default drag mode), a double click resets. Never "Share chart...":
 * an offline tool offered an upload to Plotly's cloud.
 */
export const PLOT_CONFIG = { displaylogo: false, responsive: true, showSendToCloud: false, showEditInChartStudio: false,
  modeBarButtonsToRemove: ["lasso2d", "select2d", "zoom2d", "pan2d", "autoScale2d", "sendChartToCloud",
    "toggleSpikelines", "hoverClosestCartesian", "hoverCompareCartesian"] };

/**
 * Plotly.react, then the chart's toolbar made one tab stop: a role=toolbar whose buttons
 * the arrow keys (Home, End) move along, Tab going on to the next control. Four buttons a
 * chart were still 40 of the run page's tab stops. Plotly keeps its toolbar across draws
 * and builds new buttons when they change: those are set up anew.
 */
export function plotReact(P, div, data, layout, config) {
  return P.react(div, data, layout, config).then((gd) => {
    toolbarKeys(div);
    hideDrawing(div);
    return gd;
  });
}

const TOOLBAR_KEYS = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 };

export function toolbarKeys(div) {
  const bar = div.querySelector(".modebar");
  const buttons = () => (bar ? [...bar.querySelectorAll(".modebar-btn")] : []);
  const all = buttons();
  if (!all.length) return;
  if (!bar.dataset.keys) {
    bar.dataset.keys = "1";
    bar.setAttribute("role", "toolbar");
    const title = div.closest(".card")?.querySelector("h2")?.textContent.trim();
    bar.setAttribute("aria-label", title ? `Chart tools: ${title}` : "Chart tools");
    bar.addEventListener("keydown", (ev) => {
      const list = buttons();
      const at = list.indexOf(document.activeElement);
      if (at < 0) return;
      const n = list.length;
      const to = ev.key in TOOLBAR_KEYS ? (at + TOOLBAR_KEYS[ev.key] + n) % n
        : ev.key === "Home" ? 0 : ev.key === "End" ? n - 1 : -1;
      if (to < 0) return;
      ev.preventDefault();
      list.forEach((b, i) => { b.tabIndex = i === to ? 0 : -1; });
      list[to].focus();
    });
  }
  // buttons new to the toolbar (its first draw, or Plotly rebuilt them): one tab stop again
  if (all.some((b) => !b.dataset.roving)) {
    const keep = all.find((b) => b.dataset.roving && b.tabIndex === 0) ?? all[0];
    for (const b of all) {
      b.dataset.roving = "1";
      b.tabIndex = b === keep ? 0 : -1;
    }
  }
}

export function formatNumber(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return Number(v.toPrecision(4)).toString();
}

/**
 * A chart's summary is rewritten at most this often (a live run redraws its charts up to
 * ten times a second, a replay on every frame): on the first draw at once, then once this
 * long has passed since the last rewrite, the last change always written (a timer).
 */
export const SUMMARY_INTERVAL_MS = 1000;
const SUMMARY_CLASS = "chart-summary";

/**
 * Gives a chart's element (`el`, a Plotly div or the small multiples' grid) a text
 * alternative: role=figure, named `name` (by default its card's heading: "Loss"), and
 * described by a hidden paragraph inside it that `summaries` keeps current from the chart's
 * summary(): "2 series, steps 0 to 5,000. Latest: train 0.123 at step 5,000".
 * A screen reader heard nothing of a chart but its axes' tick labels ("0 50 100 150").
 * The paragraph is `hidden`: aria-describedby reads a hidden element's text all the same,
 * and a visually hidden one was read twice, as the figure's description and again as a
 * paragraph inside it (browse mode). No live region: read on demand, never announced as
 * the data change. Returns the paragraph; a second call returns the first's.
 */
export function describeChart(el, name = "") {
  if (!el) return null;
  let p = el.querySelector(`:scope > .${SUMMARY_CLASS}`);
  if (p) return p;
  const title = name || el.closest(".card")?.querySelector("h2")?.textContent.trim() || el.id;
  el.setAttribute("role", "figure");
  el.setAttribute("aria-label", title);
  p = document.createElement("p");
  p.className = SUMMARY_CLASS;
  p.hidden = true;
  p.id = `${el.id || `chart-${Math.random().toString(36).slice(2)}`}-summary`;
  el.append(p);
  el.setAttribute("aria-describedby", p.id);
  return p;
}

/**
 * Plotly's drawing (its SVG: tick labels, legend, hover layer) hidden from screen readers in
 * a described figure (describeChart), whose summary says what it shows: the run page's
 * charts read as a dozen images named by their tick labels ("img: 0 50 100 150 200 250
 * layer0 layer1 layer2"). The toolbar is not in it and stays reachable.
 */
function hideDrawing(div) {
  if (div.getAttribute("role") !== "figure") return;
  for (const svg of div.querySelectorAll(".main-svg:not([aria-hidden])")) svg.setAttribute("aria-hidden", "true");
}

/**
 * Keeps each described chart's summary paragraph current from its data: a change (every
 * Scheduler.mark: new points, a cursor move) queues a rewrite from chart.summary(), by a
 * timer that fires once the calls of the current task are done and SUMMARY_INTERVAL_MS have
 * passed since the last rewrite (one timer at a time a chart: a change while one is pending
 * costs a map lookup). It followed the chart's draws: a chart below the fold is drawn every
 * OFFSCREEN_INTERVAL_MS, and its summary said the replay cursor's old step for 5 s. A chart
 * without a summary() or an element described by describeChart is left alone.
 */
class Summaries {
  constructor() {
    this.at = new WeakMap(); // chart -> performance.now() of its last rewrite
    this.timers = new WeakMap(); // chart -> a rewrite's timer, pending
  }

  /** `chart`'s data changed: its summary is rewritten soon (see the class). */
  changed(chart) {
    if (this.timers.has(chart) || typeof chart.summary !== "function") return;
    const wait = Math.max(0, (this.at.get(chart) ?? -Infinity) + SUMMARY_INTERVAL_MS - performance.now());
    this.timers.set(chart, setTimeout(() => {
      this.timers.delete(chart);
      this.write(chart);
    }, wait));
  }

  /** Rewrites `chart`'s summary now. */
  write(chart) {
    const el = chart.div || chart.container;
    const p = el?.querySelector(`:scope > .${SUMMARY_CLASS}`);
    if (!p) return;
    this.at.set(chart, performance.now());
    let text;
    try {
      text = chart.summary();
    } catch (e) {
      console.error("layerscope: a chart's summary failed", e);
      return;
    }
    if (p.textContent !== text) p.textContent = text;
  }
}

export const summaries = new Summaries();

/** A step as a summary writes it: 5,000. */
export function stepText(s) {
  return Number.isFinite(s) ? s.toLocaleString("en-US") : String(s);
}

/** "steps 0 to 5,000", or "step 7" when `first` is `last`. */
export function stepSpan(first, last) {
  return first === last ? `step ${stepText(first)}` : `steps ${stepText(first)} to ${stepText(last)}`;
}

const NOTE_CLASS = "chart-note";

/**
 * The layout of a chart that has nothing to show: no axes; `text` is shown in the middle
 * of `div` as an HTML note (showNote) that wraps to the chart's width. Its own uirevision:
 * under the charts' "keep", the axes Plotly worked out for the note were kept when the data
 * came, and a heatmap's `autorange: "reversed"` was dropped (a page opened as its run
 * started drew the first layer at the bottom; reloaded, at the top). The first layout with
 * data changes the revision, so it is drawn as given.
 */
export function noteLayout(div, text) {
  showNote(div, text);
  const hidden = { visible: false };
  return baseLayout({ showlegend: false, xaxis: hidden, yaxis: hidden, shapes: [], uirevision: "note" });
}

/**
 * `text` over `div`, centred and wrapped inside it. It was a Plotly annotation, one line
 * that ran past the chart's edges (the saturated-units note at 1280 px, every note at 390).
 */
export function showNote(div, text) {
  let note = div.querySelector(`:scope > .${NOTE_CLASS}`);
  if (!note) {
    note = document.createElement("div");
    note.className = NOTE_CLASS;
    Object.assign(note.style, {
      position: "absolute", inset: "0", display: "flex", alignItems: "center", justifyContent: "center",
      padding: "0 16px", textAlign: "center", color: "#9aa4b2", fontSize: "12px", lineHeight: "1.4",
      overflowWrap: "anywhere", pointerEvents: "none", zIndex: "1",
    });
    if (getComputedStyle(div).position === "static") div.style.position = "relative";
    // a described chart's summary says it (describeChart): not read twice
    if (div.getAttribute("role") === "figure") note.setAttribute("aria-hidden", "true");
    div.append(note);
  }
  note.textContent = text;
  note.hidden = false;
  note.style.display = "flex";
}

/** Removes showNote's note, if any (the chart has data to draw). */
export function hideNote(div) {
  const note = div.querySelector(`:scope > .${NOTE_CLASS}`);
  if (note) {
    note.hidden = true;
    note.style.display = "none";
  }
}

const ZERO_NOTE_CLASS = "log-zero-note";

/**
 * `text` in a strip along the top of `div`'s plot (null: none): a log chart's series at 0,
 * which it cannot draw (see LineChart.zeroNote). Hidden from screen readers: the chart's
 * summary says it.
 */
function showZeroNote(div, text) {
  let note = div.querySelector(`:scope > .${ZERO_NOTE_CLASS}`);
  if (!text) {
    if (note) note.hidden = true;
    return;
  }
  if (!note) {
    note = document.createElement("div");
    note.className = ZERO_NOTE_CLASS;
    note.setAttribute("aria-hidden", "true");
    if (getComputedStyle(div).position === "static") div.style.position = "relative";
    div.append(note);
  }
  if (note.textContent !== text) note.textContent = text;
  note.hidden = false;
}

/**
 * `s` as text for Plotly, which renders a subset of HTML (<a href>, <b>, <br>, ...) in trace
 * names, axis and category labels, hover text and annotations: a layer named
 * an anchor tag with an off-site address became a real, clickable link in the run page's charts.
 * Every user-controlled string (layer, run and scalar names, command labels) goes through
 * this before it reaches Plotly. Plotly turns the entities back into the characters, so the
 * name reads as written; "%" is escaped too, so a name holding "%{y}" is not taken for a
 * hover template's variable.
 */
export function plotlyText(s) {
  return String(s ?? "").replace(/[&<>"'%]/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** The median gap between consecutive steps of `xs` (null with fewer than two). */
function medianGap(xs) {
  if (xs.length < 2) return null;
  const gaps = [];
  for (let i = 1; i < xs.length; i++) gaps.push(xs[i] - xs[i - 1]);
  gaps.sort((a, b) => a - b);
  return gaps[gaps.length >> 1];
}

/**
 * Exponential moving average over steps, debiased, that carries over null points. Given
 * `steps`, a point's weight decays with its distance in steps, not in points: each `unit`
 * steps multiply it by `alpha` (unit: the densest series' usual step gap, so the training
 * loss logged every step is smoothed as before). A sparse series is smoothed over the same
 * window of steps: a validation loss logged every 50 steps was smoothed over its last ~10
 * points, ~500 steps, and at step 2000 the chart read 0.10 against a real 0.052. Without
 * `steps`, every point is one unit from the last. Debiased (each point the weighted mean
 * of those before it, weights summing to 1): the first point is not held for ~1/(1-alpha)
 * points.
 */
export function smooth(values, alpha, steps = null, unit = 1) {
  if (!alpha) return values;
  const out = new Array(values.length);
  let acc = 0;
  let norm = 0;
  let last = null;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || v === undefined) { out[i] = null; continue; }
    const gap = steps && last !== null ? (steps[i] - last) / unit : 1;
    const decay = Math.pow(alpha, Math.max(0, gap));
    acc = decay * acc + v;
    norm = decay * norm + 1;
    out[i] = acc / norm;
    last = steps ? steps[i] : i;
  }
  return out;
}

const SUPERSCRIPT = { "-": "⁻", 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸", 9: "⁹" };

/**
 * m × 10^k written out: "10⁻³", "2×10⁻³", "2.5×10⁻³"; from 1 to 9999 as plain numbers
 * ("2", "50", "200"), which cannot be misread either.
 */
function powerLabel(m, k) {
  const mant = Number(m.toPrecision(3));
  if (k >= 0 && k <= 3) return String(Number((mant * 10 ** k).toPrecision(3)));
  const power = `10${String(k).split("").map((c) => SUPERSCRIPT[c]).join("")}`;
  return mant === 1 ? power : `${mant}×${power}`;
}

/**
 * A log axis's labels for data from `lo` to `hi` (both > 0) when its powers of ten alone
 * are too few to read values by: null when at least three powers of ten fall in the range
 * (LOG_AXIS's labels do), else {tickvals, ticktext} with at least two labels, written
 * unambiguously ("2×10⁻³", never a bare "2"): 1, 2 and 5 times each power, else 1, 2, 3 and
 * 5, else every digit (thinned so labels do not crowd), else evenly spaced values. An update
 * ratio of 3e-4 to 3e-3 was labelled "10⁻³" alone and nothing on it could be read.
 */
export function logTicks(lo, hi) {
  if (!(lo > 0) || !(hi > 0) || !Number.isFinite(lo) || !Number.isFinite(hi)) return null;
  if (hi / lo < 1.05) { lo /= 1.05; hi *= 1.05; } // a flat line: Plotly pads it too
  const span = Math.log10(hi / lo);
  const k0 = Math.floor(Math.log10(lo));
  const k1 = Math.ceil(Math.log10(hi));
  const inRange = (v) => v >= lo * (1 - 1e-9) && v <= hi * (1 + 1e-9);
  let powers = 0;
  for (let k = k0; k <= k1; k++) if (inRange(10 ** k)) powers++;
  if (powers >= 3) return null;
  const sets = [[1, 2, 5], [1, 2, 3, 5], [1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9]];
  let best = [];
  for (const set of sets) {
    const ticks = [];
    for (let k = k0 - 1; k <= k1; k++) {
      for (const m of set) {
        const v = m * 10 ** k;
        // at least a seventh of the axis apart: labels 11 px high on a ~200 px plot
        if (inRange(v) && (!ticks.length || Math.log10(v / ticks[ticks.length - 1][0]) >= span / 7)) ticks.push([v, m, k]);
      }
    }
    if (ticks.length > best.length) best = ticks;
    if (ticks.length >= 3) break;
  }
  if (best.length < 2) {
    // within one digit's step (2.1e-3 to 2.9e-3): evenly spaced round values
    const raw = (hi - lo) / 4;
    const p = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((f) => f * p).find((x) => x >= raw) ?? 10 * p;
    best = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi * (1 + 1e-9); v += step) {
      const k = Math.floor(Math.log10(v) + 1e-9);
      best.push([v, v / 10 ** k, k]);
    }
  }
  return { tickvals: best.map(([v]) => v), ticktext: best.map(([, m, k]) => powerLabel(m, k)) };
}

/** The smallest and largest value above 0 among `ys` arrays ([Infinity, -Infinity] with none). */
function positiveRange(ys) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const y of ys) {
    for (const v of y) {
      if (v === null || v === undefined || !(v > 0) || !Number.isFinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  return [lo, hi];
}

/**
 * A log y axis for values from `lo` to `hi`: LOG_AXIS, with logTicks' labels where too few
 * powers of ten are in range.
 */
export function logAxis(lo, hi) {
  const ticks = logTicks(lo, hi);
  return ticks ? { ...LOG_AXIS, tickmode: "array", ...ticks } : { ...LOG_AXIS, tickmode: "auto" };
}

/** Halves a trace: min and max of every 4 points, in step order; the last point kept. */
export function decimate(xs, ys) {
  const nx = [];
  const ny = [];
  const last = xs.length - 1;
  for (let i = 0; i < last; i += 4) {
    const end = Math.min(i + 4, last);
    let lo = i;
    let hi = i;
    for (let j = i; j < end; j++) {
      if (ys[j] === null) continue;
      if (ys[lo] === null || ys[j] < ys[lo]) lo = j;
      if (ys[hi] === null || ys[j] > ys[hi]) hi = j;
    }
    for (const k of lo <= hi ? [lo, hi] : [hi, lo]) {
      if (nx.length && nx[nx.length - 1] === xs[k]) continue;
      nx.push(xs[k]);
      ny.push(ys[k]);
    }
  }
  nx.push(xs[last]);
  ny.push(ys[last]);
  return [nx, ny];
}

/**
 * Command markers closer together than this many pixels of x are drawn as one group: 300
 * set_lr_scale results over 150 steps drew a solid band of dotted lines and diamonds over the
 * loss and lr lines, hiding them.
 */
export const MARKER_MIN_PX = 6;
/**
 * A group of fewer markers than this is drawn a marker each, as sparse ones: a pause, a few
 * step_once and a resume sent within a few steps overlap but hide nothing, and each keeps its
 * own hover.
 */
export const MARKER_MIN_GROUP = 8;

/**
 * Steps per `px` pixels of x on `div`'s plot drawing steps lo..hi (its plot's width as Plotly
 * laid it out, else the div's less the margins); 0 when the span is empty.
 */
export function stepsPerPixels(div, lo, hi, px = MARKER_MIN_PX) {
  if (!(hi > lo)) return 0;
  const laid = div?._fullLayout?.xaxis?._length;
  const width = laid > 0 ? laid : Math.max(200, (div?.clientWidth || 600) - 64);
  return ((hi - lo) * px) / width;
}

/**
 * Markers ([{x, step, label, rule?}]) as drawn: each one closer than `gap` steps to the one
 * before it joins that one's group. A marker of a group of fewer than MARKER_MIN_GROUP is
 * returned as it is; a larger group as one marker at its first one's x (x stays step + 0.5:
 * markerX) with x1 its last's, n, and a label giving the count and the first and last.
 */
export function groupMarkers(markers, gap) {
  const sorted = [...markers].sort((a, b) => (a.x ?? a.step) - (b.x ?? b.step));
  const groups = [];
  for (const m of sorted) {
    const g = groups[groups.length - 1];
    const x = m.x ?? m.step;
    if (g && gap > 0 && x - g.x1 < gap) {
      g.members.push(m);
      g.x1 = x;
    } else groups.push({ x0: x, x1: x, members: [m] });
  }
  return groups.flatMap(({ x0, x1, members }) => {
    if (members.length < MARKER_MIN_GROUP) return members;
    const first = members[0];
    const last = members[members.length - 1];
    const steps = first.step === last.step ? `step ${first.step}` : `steps ${first.step}–${last.step}`;
    return { x: x0, x1, step: first.step, n: members.length, rule: members.every((k) => k.rule),
      label: `${members.length} commands applied after ${steps} · first: ${first.label} · last: ${last.label}` };
  });
}

/**
 * Vertical lines: the replay cursor, dotted command markers and faint dashed alert markers
 * (named "alert"). A marker {x0, x1} wider than a point (a dense group: groupMarkers) is a
 * faint band from x0 to x1 (named "commands") instead of a line per command.
 */
export function stepShapes(cursor, markerSteps = [], alertSteps = []) {
  const shapes = alertSteps.map((s) => ({
    type: "line", name: "alert", xref: "x", yref: "paper", x0: s, x1: s, y0: 0, y1: 1, layer: "below",
    line: { color: "rgba(240, 110, 95, 0.45)", width: 1, dash: "dash" },
  }));
  shapes.push(...markerSteps.map((s) => (typeof s === "object" && s.x1 > s.x0
    ? { type: "rect", name: "commands", xref: "x", yref: "paper", x0: s.x0, x1: s.x1, y0: 0, y1: 1, layer: "below",
      // no outline; dash "dot" all the same: a command marker's, as its lines are
      fillcolor: "rgba(227, 165, 43, 0.16)", line: { width: 0, dash: "dot" } }
    : { type: "line", xref: "x", yref: "paper", x0: s.x0 ?? s, x1: s.x0 ?? s, y0: 0, y1: 1,
      line: { color: "#e3a52b", width: 1, dash: "dot" } })));
  if (cursor !== null && cursor !== undefined) {
    shapes.push({ type: "line", xref: "x", yref: "paper", x0: cursor, x1: cursor, y0: 0, y1: 1,
      line: { color: "#ffffff", width: 1.2 } });
  }
  return shapes;
}

/**
 * A line chart over steps. Traces are [{name, color?, dash?, symbol?}]; markers (command
 * markers) are a separate hover-able trace placed on trace 0.
 * A chart of one line per layer (its div marked data-depth-colors, or depthColors) colours
 * its lines by their order, first layer to last, on DEPTH_SCALE, and draws a colour bar
 * naming the first and last layer: forty lines in ten cycled colours told nobody which
 * line was deep.
 */
export class LineChart {
  /**
   * zeroBased: the y axis runs from 0 to just above the largest value (lr, weight
   * decay: a flat line must not float in an arbitrary range, and 0 must show).
   * The range is recomputed (a full redraw) only when new data leaves it.
   * empty: the note drawn, with no axes, while no trace has a point (empty axes read as
   * a chart that failed to draw).
   */
  constructor(div, traces, { logY = false, yTitle = "", maxPoints = MAX_POINTS, showLegend = true, zeroBased = false,
    depthColors = div?.dataset?.depthColors !== undefined, empty = "" } = {}) {
    this.div = div;
    this.empty = empty || `no ${yTitle || "data"} logged`;
    this.depthColors = depthColors;
    this.zeroBased = zeroBased;
    this.maxPoints = maxPoints;
    this.logY = logY;
    this.yTitle = yTitle;
    this.about = ""; // what summary() says the chart is of, when not its yTitle ("dead ratio of relu1")
    this.showLegend = showLegend;
    this.smoothing = 0;
    this.cursor = null;
    this.markers = [];
    this.alertSteps = [];
    this.revision = 0;
    this.drawn = false;
    describeChart(div);
    this.setTraces(traces);
  }

  setTraces(traces) {
    this.traces = traces;
    this.model = traces.map(() => ({ x: [], y: [] }));
    this.pending = traces.map(() => ({ x: [], y: [] }));
    this.full = true;
    scheduler.mark(this);
  }

  /** Adds a trace (e.g. a param group's lr first seen live); returns its index. */
  addTrace(trace) {
    this.traces.push(trace);
    this.model.push({ x: [], y: [] });
    this.pending.push({ x: [], y: [] });
    this.full = true;
    scheduler.mark(this);
    return this.traces.length - 1;
  }

  /** Replaces one trace's points (steps ascending). */
  setSeries(i, steps, values) {
    const m = this.model[i];
    m.x = steps.slice();
    m.y = values.map((v) => (v === undefined ? null : v));
    while (m.x.length > this.maxPoints) [m.x, m.y] = decimate(m.x, m.y);
    this.full = true;
    scheduler.mark(this);
  }

  /** Appends one point; ignored unless its step is past the trace's last step. */
  append(i, step, value) {
    const m = this.model[i];
    if (m.x.length && step <= m.x[m.x.length - 1]) return;
    m.x.push(step);
    m.y.push(value ?? null);
    if (m.x.length > this.maxPoints) {
      [m.x, m.y] = decimate(m.x, m.y);
      this.full = true;
    } else {
      this.pending[i].x.push(step);
      this.pending[i].y.push(value ?? null);
    }
    scheduler.mark(this);
  }

  lastStep(i) {
    const x = this.model[i].x;
    return x.length ? x[x.length - 1] : -Infinity;
  }

  /** y of trace i at the last point with step <= s, null before its first (or no trace). */
  valueAtOrBefore(i, s) {
    if (!this.model[i]) return null; // a chart with no series yet (e.g. no weight decay logged)
    const { x, y } = this.model[i];
    let lo = 0;
    let hi = x.length - 1;
    let best = null;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (x[mid] <= s) { best = y[mid]; lo = mid + 1; } else hi = mid - 1;
    }
    return best;
  }

  /** y of trace i at the last point with step <= s, else its first (for placing markers). */
  valueAt(i, s) {
    const y = this.model[i]?.y;
    return this.valueAtOrBefore(i, s) ?? (y?.length ? y[0] : null);
  }

  setLogY(on) { this.logY = on; this.full = true; scheduler.mark(this); }
  setSmoothing(alpha) { this.smoothing = alpha; this.full = true; scheduler.mark(this); }
  setCursor(step) { this.cursor = step; this.cursorDirty = true; scheduler.mark(this); }

  /**
   * markers: [{step, x?, label}] — drawn at x (else step) as dotted lines plus hover points on
   * trace 0; dense ones as a band and one hover point a group (drawnMarkers).
   */
  setMarkers(markers) { this.markers = markers; this.markerGroups = null; this.full = true; scheduler.mark(this); }

  /**
   * The markers as drawn (groupMarkers): those closer than MARKER_MIN_PX pixels of x grouped,
   * for the x span the chart draws (its traces' and markers' steps). Regrouped on a full
   * redraw (`regroup`); a cursor-only redraw keeps the groups its data was drawn with.
   */
  drawnMarkers(regroup = false) {
    if (!this.markers.length) return [];
    if (regroup || !this.markerGroups) {
      let lo = Infinity;
      let hi = -Infinity;
      for (const m of this.model) if (m.x.length) { lo = Math.min(lo, m.x[0]); hi = Math.max(hi, m.x[m.x.length - 1]); }
      for (const k of this.markers) { lo = Math.min(lo, k.x ?? k.step); hi = Math.max(hi, k.x ?? k.step); }
      this.markerGroups = groupMarkers(this.markers, stepsPerPixels(this.div, lo, hi));
    }
    return this.markerGroups;
  }

  /** Steps alerts fired at, drawn as faint dashed lines (shapes only: a cursor-sized redraw). */
  setAlertSteps(steps) { this.alertSteps = steps; this.cursorDirty = true; scheduler.mark(this); }

  /**
   * The step gap smoothing counts as one point: the median step gap of the densest
   * smoothable trace (the training loss's, 1 when logged every step), so every trace of the
   * chart is smoothed over the same window of steps (see smooth).
   */
  smoothingUnit() {
    let unit = Infinity;
    this.traces.forEach((t, i) => {
      if (t.smoothable === false) return;
      const gap = medianGap(this.model[i].x);
      if (gap !== null && gap > 0 && gap < unit) unit = gap;
    });
    return Number.isFinite(unit) ? unit : 1;
  }

  /**
   * The traces as drawn, names as given (preview.js draws them on a canvas); drawnData
   * escapes them for Plotly. Hover text is escaped here (plotlyText).
   */
  plotData() {
    const data = [];
    const n = this.traces.length;
    const unit = this.smoothing > 0 ? this.smoothingUnit() : 1;
    this.traces.forEach((t, i) => {
      const m = this.model[i];
      const color = this.depthColors ? depthColor(i, n) : t.color || COLORS[i % COLORS.length];
      const line = { color, width: 1.5, dash: t.dash || "solid" };
      const smoothed = this.smoothing > 0 && t.smoothable !== false;
      const name = plotlyText(t.name);
      data.push({ type: "scatter", mode: "lines", name: t.name,
        x: m.x.slice(), y: smoothed ? smooth(m.y, this.smoothing, m.x, unit) : m.y.slice(), line,
        connectgaps: false, showlegend: this.showLegend,
        // smoothed: the hover says so and gives the logged value too
        ...(smoothed ? { customdata: m.y.slice(),
          hovertemplate: `${name} (smoothed): %{y:.4g} · logged %{customdata:.4g}<extra>step %{x}</extra>` }
          : { hovertemplate: `${name}: %{y:.4g}<extra>step %{x}</extra>` }) });
    });
    const drawn = this.drawnMarkers(true);
    if (drawn.length) {
      data.push({ type: "scatter", mode: "markers", name: "commands", showlegend: false,
        // k.x: half a step after the boundary it was applied at (eventlog.js markerX); a
        // dense group's marker is its first command's, its hover gives the count
        x: drawn.map((k) => k.x ?? k.step), y: drawn.map((k) => this.valueAt(0, k.x ?? k.step)),
        text: drawn.map((k) => plotlyText(k.label)),
        // A rule's automatic action is drawn apart from a person's command.
        marker: { symbol: drawn.map((k) => (k.rule ? "triangle-up" : "diamond")), size: 9,
          color: drawn.map((k) => (k.rule ? RULE_MARKER_COLOR : USER_MARKER_COLOR)),
          line: { color: "#0f1216", width: 1 } },
        hovertemplate: "%{text}<extra></extra>" });
    }
    if (this.depthColors && n > 1) data.push(this.depthBar());
    return data;
  }

  /**
   * plotData as Plotly draws it: a trace of few points (FEW_POINTS) with a marker on each.
   * (preview.js draws plotData's lines, and takes a "markers" trace for the command markers.)
   */
  drawnData() {
    const data = this.plotData();
    this.traces.forEach((t, i) => { data[i].name = plotlyText(t.name); });
    this.traces.forEach((t, i) => {
      const few = this.fewPoints(i);
      if (!few && !t.symbol) return;
      // a trace's own symbol (a run's on /compare: told apart by more than colour) is drawn
      // on at most SYMBOL_POINTS of its points, as on each point of a trace of few
      const symbol = t.symbol ? { symbol: t.symbol, size: 7, line: { color: "#0f1216", width: 1 } } : {};
      Object.assign(data[i], { mode: "lines+markers",
        marker: { color: data[i].line.color, size: 6, ...symbol, ...(few ? {} : { maxdisplayed: SYMBOL_POINTS }) } });
    });
    return data;
  }

  /**
   * A log chart's series whose latest value is 0 or below, which a log axis cannot draw, in
   * words; null when there are none (or the axis is linear). A zero-initialised net's
   * gradient norms are exactly 0 in every layer but the last: one line was drawn, the
   * colour bar said 5 layers, and nothing said where the other four were.
   * "4 of 5 layers (net.0, net.2, net.4 and 1 more) at 0 at the latest step: a log axis cannot draw 0".
   */
  zeroNote() {
    if (!this.logY) return null;
    const zero = [];
    let n = 0;
    this.traces.forEach((t, i) => {
      const y = this.model[i].y;
      let j = y.length - 1;
      while (j >= 0 && (y[j] === null || !Number.isFinite(y[j]))) j--;
      if (j < 0) return;
      n++;
      if (y[j] <= 0) zero.push(t.name);
    });
    if (!zero.length) return null;
    const noun = this.depthColors ? (n === 1 ? "layer" : "layers") : "series";
    const names = zero.length <= 4 ? zero.join(", ") : `${zero.slice(0, 3).join(", ")} and ${zero.length - 3} more`;
    return `${n === 1 ? names : `${zero.length} of ${n} ${noun} (${names})`} at 0 at the latest step: a log axis cannot draw 0`;
  }

  /**
   * What the chart shows, in words (describeChart's summary), from its own data (not
   * Plotly's: a chart below the fold is drawn seconds after its data change): its series,
   * the steps they span, each one's last value (a line per layer: the highest and lowest of
   * them, with their steps), the replay cursor's values and the command markers. "2 series of
   * loss, steps 0 to 5,000. Latest: train 0.123 at step 5,000, validation 0.2 at step 4,950."
   * With smoothing, the smoothed value drawn and the value logged ("train smoothed 0.13,
   * logged 0.123"). A series whose last points have no value (NaN, sent as null) says so
   * ("train: no value since step 4,000 (last 0.5 at step 3,999)"): it was left out, and the
   * summary read as if the loss were fine.
   */
  summary() {
    if (!this.hasData()) return this.empty;
    const series = [];
    const stale = [];
    let none = 0; // series with no finite value at all
    let first = Infinity;
    let last = -Infinity;
    const unit = this.smoothing > 0 ? this.smoothingUnit() : 1;
    const finite = (v) => v !== null && v !== undefined && Number.isFinite(v);
    // the value drawn at point k of series s: smoothed, the value logged too
    const valueAt = (s, k, value) => (s.smoothed && finite(s.smoothed[k])
      ? `smoothed ${formatNumber(s.smoothed[k])}, logged ${formatNumber(value)}` : formatNumber(value));
    this.traces.forEach((t, i) => {
      const { x, y } = this.model[i];
      if (!x.length) return;
      first = Math.min(first, x[0]);
      last = Math.max(last, x[x.length - 1]);
      let j = y.length - 1;
      while (j >= 0 && !finite(y[j])) j--;
      const smoothed = this.smoothing > 0 && t.smoothable !== false && j >= 0 ? smooth(y, this.smoothing, x, unit) : null;
      const s = { name: t.name, i, j, step: x[j], value: y[j], smoothed };
      if (j >= 0) series.push(s);
      if (j < 0) {
        stale.push(`${t.name}: no finite value logged`);
        none++;
      } else if (j < y.length - 1) {
        stale.push(`${t.name}: no value since step ${stepText(x[j + 1])} (last ${valueAt(s, j, y[j])} at step ${stepText(x[j])})`);
      }
    });
    const n = series.length + none;
    const noun = this.depthColors ? (n === 1 ? "layer" : "layers") : "series";
    const what = this.about || this.yTitle;
    const parts = [`${n} ${noun}${what ? ` of ${what}` : ""}, ${stepSpan(first, last)}${this.logY ? ", log scale" : ""}.`];
    const fresh = series.filter((s) => s.j === this.model[s.i].y.length - 1);
    const latest = (s) => `${s.name} ${valueAt(s, s.j, s.value)} at step ${stepText(s.step)}`;
    const sep = this.smoothing > 0 ? "; " : ", "; // a smoothed value has a comma of its own
    if (series.length <= 4) {
      if (fresh.length) parts.push(`Latest: ${fresh.map(latest).join(sep)}.`);
      if (stale.length) parts.push(`${stale.join("; ")}.`);
    } else {
      const byValue = [...fresh].sort((a, b) => b.value - a.value);
      if (byValue.length) {
        parts.push(byValue.length === 1 ? `Latest: ${latest(byValue[0])}.`
          : `Latest values: highest ${latest(byValue[0])}${sep}lowest ${latest(byValue[byValue.length - 1])}.`);
      }
      if (stale.length) parts.push(stale.length <= 4 ? `${stale.join("; ")}.` : `${stale.length} ${noun} with no value at their last step.`);
    }
    // the replay cursor's values, unless it is past every series' last point (they are the latest)
    if (this.cursor !== null && this.cursor !== undefined && this.cursor < last) {
      const at = series.map((s) => {
        const k = this.indexAtOrBefore(s.i, this.cursor);
        const value = k < 0 ? null : this.model[s.i].y[k];
        return finite(value) ? `${s.name} ${valueAt(s, k, value)}` : null;
      }).filter((v) => v !== null);
      if (at.length && at.length <= 4) parts.push(`At the cursor, step ${stepText(this.cursor)}: ${at.join(sep)}.`);
      else parts.push(`Cursor at step ${stepText(this.cursor)}.`);
    }
    const zero = this.zeroNote();
    if (zero) parts.push(`${zero[0].toUpperCase()}${zero.slice(1)}.`);
    if (this.markers.length) parts.push(`${this.markers.length} command${this.markers.length === 1 ? "" : "s"} marked.`);
    return parts.join(" ");
  }

  /** The index of trace i's last point with step <= s (-1 before its first). */
  indexAtOrBefore(i, s) {
    const x = this.model[i]?.x ?? [];
    let lo = 0;
    let hi = x.length - 1;
    let best = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (x[mid] <= s) { best = mid; lo = mid + 1; } else hi = mid - 1;
    }
    return best;
  }

  /** A trace with no points that draws the depth colour bar: first layer at the bottom, last at the top. */
  depthBar() {
    const n = this.traces.length;
    const first = this.traces[0].name;
    const last = this.traces[n - 1].name;
    // "markers+text": preview.js takes a "markers" trace for the command markers
    return { type: "scatter", mode: "markers+text", name: "depth", showlegend: false, hoverinfo: "skip",
      x: [null], y: [null],
      marker: { color: [0], cmin: 0, cmax: n - 1, colorscale: DEPTH_SCALE, showscale: true,
        colorbar: { thickness: 8, outlinewidth: 0, len: 0.9, x: 1.01, xpad: 4,
          tickvals: [0, n - 1], ticktext: [`first: ${plotlyText(first)}`, `last: ${plotlyText(last)}`], tickfont: { size: 9 },
          title: { text: `depth (${n} layers)`, side: "right", font: { size: 10 } } } } };
  }

  /** Trace i has so few points that they are drawn as markers too (FEW_POINTS). */
  fewPoints(i) {
    return this.model[i].x.length <= FEW_POINTS;
  }

  /** What decides the kind of drawing (not the points): a change takes a full redraw. */
  shape() {
    return `${this.hasData() ? 1 : 0}:${this.model.map((_, i) => (this.fewPoints(i) ? 1 : 0)).join("")}`;
  }

  /** Any trace has a point with a value. */
  hasData() {
    return this.model.some((m) => m.y.some((v) => v !== null));
  }

  yRange() {
    let max = 0;
    for (const m of this.model) for (const v of m.y) if (v !== null && v > max) max = v;
    return [0, max > 0 ? max * 1.15 : 1];
  }

  /**
   * False when a zero-based chart's pending points fall outside its drawn range, or a log
   * chart's would change its labels (logAxis: chosen for the values drawn). A log chart's
   * points that leave its values' range but keep its labels (powers of ten alone, the usual
   * case) widen the range kept and are appended as before.
   */
  inRange() {
    if (this.logY && this.logRange) {
      const [plo, phi] = positiveRange(this.pending.map((p) => p.y));
      const [lo, hi] = this.logRange;
      if (plo < lo || phi > hi) {
        const wider = [Math.min(lo, plo), Math.max(hi, phi)];
        if (JSON.stringify(logTicks(...wider)) !== this.logTicksKey) return false;
        this.logRange = wider;
      }
    }
    if (!this.zeroBased || !this.range) return true;
    const [, top] = this.range;
    const max = Math.max(0, ...this.pending.flatMap((p) => p.y.filter((v) => v !== null)));
    return max <= top;
  }

  layout() {
    if (this.zeroBased) this.range = this.yRange();
    if (!this.hasData()) return noteLayout(this.div, this.empty);
    hideNote(this.div);
    const zero = this.zeroBased && !this.logY ? { range: this.range, autorange: false } : {};
    this.logRange = this.logY ? positiveRange(this.model.map((m) => m.y)) : null;
    this.logTicksKey = this.logY ? JSON.stringify(logTicks(...this.logRange)) : null;
    return baseLayout({
      datarevision: ++this.revision,
      showlegend: this.showLegend && this.traces.length > 1,
      xaxis: { ...baseLayout().xaxis, title: { text: "step" } },
      yaxis: { ...baseLayout().yaxis, ...(this.logY ? logAxis(...this.logRange) : { type: "linear", tickmode: "auto" }),
        title: { text: plotlyText(this.yTitle) }, ...zero },
      shapes: this.shapes(),
    });
  }

  /** The cursor line, command and alert markers: all a cursor-only redraw changes. */
  shapes() {
    if (!this.hasData()) return []; // a note, no axes to draw them on
    return stepShapes(this.cursor, this.drawnMarkers().map((k) => ({ x0: k.x ?? k.step, x1: k.x1 ?? k.x ?? k.step })),
      this.alertSteps);
  }

  draw() {
    const P = Plotly();
    if (!P) return Promise.resolve();
    const pendingAny = this.pending.some((p) => p.x.length);
    const shape = this.shape();
    if (shape !== this.drawnShape) this.full = true; // empty to drawn, markers on or off
    this.drawnShape = shape;
    const extendable = this.drawn && !this.full && pendingAny && !(this.smoothing > 0) && this.inRange();
    let work;
    // preview.js's canvas (PREVIEW_CLASS; not imported: preview.js imports this module)
    // stood in for this chart until Plotly ran.
    if (!this.drawn) this.div.querySelector(":scope > canvas.chart-preview")?.remove();
    if (!this.drawn || this.full || (pendingAny && !extendable)) {
      work = plotReact(P, this.div, this.drawnData(), this.layout(), PLOT_CONFIG);
    } else if (extendable) {
      const idx = [];
      const xs = [];
      const ys = [];
      this.pending.forEach((p, i) => {
        if (!p.x.length) return;
        idx.push(i);
        xs.push(p.x);
        ys.push(p.y);
      });
      work = P.extendTraces(this.div, { x: xs, y: ys }, idx, this.maxPoints);
      if (this.cursorDirty) work = work.then(() => P.relayout(this.div, { shapes: this.shapes() }));
    } else if (this.cursorDirty) {
      work = P.relayout(this.div, { shapes: this.shapes() });
    } else {
      work = Promise.resolve();
    }
    showZeroNote(this.div, this.hasData() ? this.zeroNote() : null);
    this.pending = this.traces.map(() => ({ x: [], y: [] }));
    this.full = false;
    this.cursorDirty = false;
    this.drawn = true;
    return work;
  }
}
