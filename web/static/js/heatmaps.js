/**
 * heatmaps.js — the per-layer views: layers × steps heatmaps (dead and saturated
 * ratios), one layer's activation histogram over time (steps × bins on a common
 * grid), and every layer's histogram at one step as small multiples.
 *
 * Owns: bounded column/row buffers that grow with live probe frames, resampling a
 * live histogram (its own lo..hi) onto the common grid, the columns a heatmap draws
 * (evenGrid: evenly spaced, no more than its plot is pixels wide), and drawing the small
 * multiples on canvases (thirty Plotly subplots would cost more than the frame
 * budget during replay); each view's summary in words (summary(): see describeChart).
 * Never: fetches data; the run page decides what to load.
 */

import { baseLayout, describeChart, hideNote, noteLayout, PLOT_CONFIG, plotReact, plotlyText, scheduler, stepAxis, stepShapes,
  stepSpan, stepText, formatNumber, summaries } from "./charts.js";

export const MAX_COLUMNS = 600;
const HEATMAP_INTERVAL_MS = 1000;
const Plotly = () => window.Plotly;
const ROW_PX = 11; // a heatmap row high enough for its 9 px label
const MAX_GROWN_ROWS = 120;
const HEATMAP_MARGIN_Y = 49; // the layout's top and bottom margins (the bottom's 32 grown to 43 by stepAxis's automargin)
const HEATMAP_MARGIN_X = 160; // left margin (layer names), right margin and colour bar: before the first draw
/**
 * A measured 0 is a slate tint, clearly lighter than the card (a cell with no value, which
 * Plotly leaves transparent): it was #10151c, all but the card's own colour, and a healthy
 * tanh run's saturation chart (0 everywhere) read as empty or broken. Lightness rises with
 * the value from there (CIELAB L* 22, 25, 33, 55, 87).
 */
export const ZERO_COLOR = "#2c3545";
const HEAT_SCALE = [[0, ZERO_COLOR], [0.15, "#45307d"], [0.4, "#7a2a85"], [0.7, "#e0553a"], [1, "#ffd36b"]];
/** What a per-layer chart says before the run's first probe step. */
export const NO_PROBE_YET = "no probe step recorded yet: layers are probed every few steps (watch()'s every=)";
/** The 1 px line between a layers heatmap's rows: the card's background (--panel). */
const ROW_LINE = "#161b22";

/**
 * The columns a heatmap draws for data columns at ascending integer `steps`: at most
 * `width` evenly spaced steps, the last one the last data step, `dx` apart (a multiple of
 * the data's smallest step gap, so evenly spaced data gives its own steps back); and for
 * each, the [from, to) range of data columns drawn in it: those whose step falls in it
 * (each data column in exactly one), or where none does, the one whose cell (halfway to
 * each neighbour, as Plotly draws uneven columns) holds its middle.
 *
 * Why: Plotly paints a heatmap whose columns (and rows) are evenly spaced with no gaps as
 * one image of a pixel a cell, scaled up (image-rendering: pixelated); any other it paints
 * cell by cell into a canvas the plot's size, then PNG-encodes that. A 45-layer dead-unit
 * heatmap of 600 steps with a 1 px row gap took 140-300 ms a draw that way on a 2-core
 * machine, and drawn once a second it was most of a live tab's main thread; as an image,
 * 20-40 ms. A run's history (the server's downsampled steps) followed by live columns
 * (every probe step) is uneven, and a plot 560 px wide shows no more than 560 columns.
 */
export function evenGrid(steps, width) {
  const n = steps.length;
  if (n <= 1) return { x: steps.slice(), spans: steps.map((_, j) => [j, j + 1]) };
  const first = steps[0];
  const last = steps[n - 1];
  let gap = Infinity;
  for (let j = 1; j < n; j++) gap = Math.min(gap, steps[j] - steps[j - 1]);
  gap = Math.max(1, gap);
  const wanted = Math.ceil((last - first) / Math.max(1, width - 1));
  const dx = gap * Math.max(1, Math.ceil(wanted / gap));
  const cells = Math.floor((last - first) / dx) + 1;
  const x = new Array(cells);
  for (let g = 0; g < cells; g++) x[g] = last - (cells - 1 - g) * dx;
  const spans = new Array(cells);
  let j = 0;
  for (let g = 0; g < cells; g++) {
    const lo = g === 0 ? -Infinity : x[g] - dx / 2;
    const hi = g === cells - 1 ? Infinity : x[g] + dx / 2;
    while (j < n && steps[j] < lo) j++;
    let k = j;
    while (k < n && steps[k] < hi) k++;
    if (k > j) {
      spans[g] = [j, k]; // the data columns whose step falls in it
    } else {
      // none: the one whose cell (halfway to each neighbour) holds its middle
      const c = j >= n || (j > 0 && x[g] < (steps[j - 1] + steps[j]) / 2) ? j - 1 : j;
      spans[g] = [c, c + 1];
    }
  }
  return { x, spans };
}

/**
 * What hover names each evenGrid column: the probe step(s) it shows, not the grid's own
 * step (not always a probe step): "1000", or "1000–1090" for steps merged into one.
 */
function stepLabels(steps, spans) {
  return spans.map(([from, to]) => (to - from === 1 ? String(steps[from]) : `${steps[from]}–${steps[to - 1]}`));
}

/** The larger (worse) of row[from..to), skipping missing values; null when all are. */
function worst(row, from, to) {
  let out = null;
  for (let j = from; j < to; j++) {
    const v = row[j];
    if (v !== null && v !== undefined && (out === null || v > out)) out = v;
  }
  return out;
}

/** How many columns a chart's plot can show: its width in device pixels (an estimate before its first draw). */
function plotColumns(div, margins) {
  const w = div._fullLayout?._size?.w ?? (div.clientWidth || 600) - margins;
  return Math.max(2, Math.min(MAX_COLUMNS, Math.round(w * (window.devicePixelRatio || 1))));
}

/** Every cell is 0 (null cells aside; at least one 0): as drawn, or of the data (merged columns keep their largest). */
function allZero(z) {
  let any = false;
  for (const row of z) {
    for (const v of row) {
      if (v === null || v === undefined) continue;
      if (v !== 0) return false;
      any = true;
    }
  }
  return any;
}

/** Arrays equal element by element (a heatmap's columns and cells, before drawing them again). */
function sameArrays(a, b) {
  if (!a || a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i];
    const y = b[i];
    if (Array.isArray(x) ? !sameArrays(x, y) : x !== y) return false;
  }
  return true;
}

/** Layers × steps heatmap of one probe statistic in [0, 1]. */
export class LayerHeatmap {
  constructor(div, { title = "", zmax = 1, empty = "" } = {}) {
    this.div = div;
    this.title = title;
    this.empty = empty || `no layer of this run has a ${title}`;
    this.zmax = zmax;
    this.layers = [];
    this.steps = [];
    this.z = [];
    this.cursor = null;
    this.markers = [];
    this.dataDirty = true;
    this.drawnAt = -Infinity;
    describeChart(div);
    scheduler.mark(this);
  }

  /** New data waits for HEATMAP_INTERVAL_MS since the last repaint; a cursor move does not. */
  due(now) {
    return !this.dataDirty || now - this.drawnAt >= HEATMAP_INTERVAL_MS;
  }

  /** z is [per layer [per step]], as /probes/matrix answers. */
  set(layers, steps, z) {
    this.layers = layers.slice();
    this.steps = steps.slice();
    this.z = z.map((row) => row.slice());
    this.shrink();
    this.dataDirty = true;
    scheduler.mark(this);
  }

  /** values: Map layer name -> value (null when the layer lacks the stat). */
  appendColumn(step, values) {
    if (this.steps.length && step <= this.steps[this.steps.length - 1]) return;
    for (const name of values.keys()) {
      if (!this.layers.includes(name)) {
        this.layers.push(name);
        this.z.push(new Array(this.steps.length).fill(null));
      }
    }
    this.steps.push(step);
    this.layers.forEach((name, i) => this.z[i].push(values.get(name) ?? null));
    this.shrink();
    this.dataDirty = true;
    scheduler.mark(this);
  }

  /** Past MAX_COLUMNS, merge neighbouring columns keeping the worse (larger) value. */
  shrink() {
    while (this.steps.length > MAX_COLUMNS) {
      const keep = [];
      for (let j = 1; j < this.steps.length; j += 2) keep.push(j);
      if (this.steps.length % 2 === 1) keep.push(this.steps.length - 1);
      this.z = this.z.map((row) => keep.map((j) => {
        const a = row[j - 1] ?? null;
        const b = row[j] ?? null;
        return a === null ? b : b === null ? a : Math.max(a, b);
      }));
      this.steps = keep.map((j) => this.steps[j]);
    }
  }

  setCursor(step) { this.cursor = step; scheduler.mark(this); }
  setMarkers(steps) { this.markers = steps; scheduler.mark(this); }

  /**
   * Grows the chart's div so `n` rows get ROW_PX each (at most MAX_GROWN_ROWS' worth);
   * returns the height it set, or null when its own (CSS) height holds them.
   */
  fitRows(n) {
    if (this.baseHeight === undefined) this.baseHeight = this.div.clientHeight || 260;
    const needed = Math.min(n, MAX_GROWN_ROWS) * ROW_PX + HEATMAP_MARGIN_Y;
    if (needed <= this.baseHeight) {
      const grown = this.div.style.height;
      this.div.style.height = "";
      return grown ? this.baseHeight : null; // back to its own height, which Plotly was told otherwise
    }
    this.div.style.height = `${needed}px`;
    return needed;
  }

  draw() {
    const P = Plotly();
    if (!P) return Promise.resolve();
    const shapes = stepShapes(this.cursor, this.markers);
    if (!this.dataDirty && this.div.data) {
      return this.div.dataset.empty ? Promise.resolve() : P.relayout(this.div, { shapes });
    }
    this.dataDirty = false;
    this.drawnAt = performance.now();
    // A layer without this statistic (a tanh net's dead ratio, a Linear's saturation) is
    // an all-null row: left out, so the rows drawn are the layers that have it.
    const kept = this.layers.map((_, i) => i).filter((i) => this.z[i].some((v) => v !== null && v !== undefined));
    this.div.dataset.rows = JSON.stringify(kept.map((i) => this.layers[i]));
    if (!kept.length) {
      this.div.dataset.empty = "1";
      this.div.dataset.allZero = "";
      this.shown = null;
      this.rowCount = 0;
      this.drawRowLines();
      // no probe step at all yet (a run probed every 100 steps, in its first 100): says so
      return plotReact(P, this.div, [], noteLayout(this.div, this.steps.length ? this.empty : NO_PROBE_YET), PLOT_CONFIG);
    }
    delete this.div.dataset.empty;
    hideNote(this.div);
    // the rows' names as Plotly's category labels: escaped (plotlyText), so a layer named
    // "<a href=…>" is text, not a link; dataset.rows keeps them as they are
    const rows = kept.map((i) => plotlyText(this.layers[i]));
    const height = this.fitRows(rows.length);
    // Evenly spaced columns, no gaps: Plotly paints it as one image (see evenGrid); the
    // rows' 1 px gap is drawn over it (drawRowLines). A merged column shows its worst value.
    const { x, spans } = evenGrid(this.steps, plotColumns(this.div, HEATMAP_MARGIN_X));
    const z = kept.map((i) => {
      const row = this.z[i];
      return spans.map(([from, to]) => (to - from === 1 ? row[from] ?? null : worst(row, from, to)));
    });
    const shown = { x, rows, z, height, shapes: JSON.stringify(shapes) };
    const last = this.shown;
    this.shown = shown;
    this.rowCount = rows.length;
    if (last && this.div.data && last.height === height && sameArrays(last.x, x) && sameArrays(last.rows, rows)
      && sameArrays(last.z, z)) {
      // nothing the chart shows has changed (a column that merged into its last one unchanged)
      return last.shapes === shown.shapes ? Promise.resolve() : P.relayout(this.div, { shapes });
    }
    const label = stepLabels(this.steps, spans);
    this.div.dataset.allZero = allZero(z) ? "1" : "";
    const data = [{
      type: "heatmap", x, y: rows, z, text: rows.map(() => label),
      zmin: 0, zmax: this.zmax, colorscale: HEAT_SCALE, xgap: 0, ygap: 0,
      colorbar: { thickness: 10, outlinewidth: 0, len: 0.9 },
      hovertemplate: "%{y}<br>step %{text}<br>" + this.title + " %{z:.3f}<extra></extra>",
    }];
    const layout = baseLayout({
      showlegend: false,
      margin: { l: 110, r: 8, t: 6, b: 32 },
      xaxis: stepAxis(),
      // category: layer names like nn.Sequential's "0.1", "0.10", "1" are labels, not
      // numbers (a linear axis drew "0.1" and "0.10" on one row)
      // every row named (Plotly thinned a 44-row axis to every third label): the chart
      // grows to ROW_PX a row, up to MAX_GROWN_ROWS rows; past that every k-th row is
      // named and hover names each
      yaxis: {
        ...baseLayout().yaxis, type: "category", autorange: "reversed",
        tickfont: { size: 9 }, automargin: true,
        tickmode: "array", tickvals: rows.filter((_, j) => j % Math.ceil(rows.length / MAX_GROWN_ROWS) === 0),
      },
      shapes,
      // every cell 0 says so in words too: one colour over the whole plot is easy to misread
      annotations: this.div.dataset.allZero ? [this.zeroNote()] : [],
      ...(height ? { height } : {}),
    });
    return plotReact(P, this.div, data, layout, PLOT_CONFIG).then(() => {
      if (!this.listening) {
        // a resize (responsive) or relayout moves the plot: the lines follow it
        this.div.on?.("plotly_afterplot", () => this.drawRowLines());
        this.listening = true;
      }
      this.drawRowLines();
    });
  }

  /**
   * In words (describeChart), from the chart's data (not what was last drawn: see Summaries):
   * the layers that have the statistic, the probe steps, and at the last one (the replay
   * cursor's, in replay) the highest value and its layer, and the mean.
   * "3 layers, 15 probe steps, steps 0 to 280. At step 280: highest dead ratio layer2 0.6, mean 0.3."
   */
  summary() {
    const kept = this.layers.map((_, i) => i).filter((i) => this.z[i].some((v) => v !== null && v !== undefined));
    if (!kept.length) return this.steps.length ? this.empty : NO_PROBE_YET;
    const n = this.steps.length;
    const head = `${kept.length} layer${kept.length === 1 ? "" : "s"}, ${n} probe step${n === 1 ? "" : "s"}, ${stepSpan(this.steps[0], this.steps[n - 1])}.`;
    if (allZero(kept.map((i) => this.z[i]))) return `${head} ${this.title} 0 at every layer and probe step.`;
    let j = n - 1;
    if (this.cursor !== null && this.cursor !== undefined) {
      while (j >= 0 && this.steps[j] > this.cursor) j--;
      if (j < 0) return `${head} Cursor at step ${stepText(this.cursor)}, before the first probe step.`;
    }
    let top = null;
    let sum = 0;
    let count = 0;
    for (const i of kept) {
      const v = this.z[i][j];
      if (v === null || v === undefined) continue;
      sum += v;
      count++;
      if (top === null || v > this.z[top][j]) top = i;
    }
    if (top === null) return `${head} No layer has a value at step ${stepText(this.steps[j])}.`;
    return `${head} At step ${stepText(this.steps[j])}: highest ${this.title} ${this.layers[top]} ${formatNumber(this.z[top][j])}`
      + `${count > 1 ? `, mean ${formatNumber(sum / count)}` : ""}.`;
  }

  /** The note over a plot whose every cell is 0: "no saturated units at any probe step (0–190)". */
  zeroNote() {
    const what = this.title.replace(/ ratio$/, "");
    const first = this.steps[0];
    const last = this.steps[this.steps.length - 1];
    const when = first === last ? `at probe step ${first}` : `at any probe step (steps ${first}–${last})`;
    return { text: `0 everywhere: no ${what} units ${when}`, xref: "paper", yref: "paper", x: 0.5, y: 1,
      xanchor: "center", yanchor: "top", showarrow: false, font: { size: 11, color: "#d7dde5" },
      bgcolor: "rgba(22,27,34,0.85)", borderpad: 3 };
  }

  /**
   * The 1 px line between rows, over the plot: a transparent element the plot's size with
   * a repeating gradient (no pointer events: hover reaches the heatmap). Plotly's own row
   * gap (ygap) would cost the heatmap its image path (evenGrid). None past MAX_GROWN_ROWS
   * rows, where a row is a few pixels high.
   */
  drawRowLines() {
    const size = this.div._fullLayout?._size;
    const n = this.rowCount || 0;
    let el = this.rowLines;
    if (!n || n > MAX_GROWN_ROWS || !size || this.div.dataset.empty) {
      if (el) el.hidden = true;
      return;
    }
    if (!el) {
      el = document.createElement("div");
      el.className = "row-lines";
      el.style.position = "absolute";
      el.style.pointerEvents = "none";
      if (getComputedStyle(this.div).position === "static") this.div.style.position = "relative";
      this.div.append(el);
      this.rowLines = el;
    }
    const row = size.h / n;
    el.hidden = false;
    Object.assign(el.style, {
      left: `${size.l}px`, top: `${size.t}px`, width: `${size.w}px`, height: `${size.h}px`,
      backgroundImage: `repeating-linear-gradient(to bottom, transparent 0 ${row - 1}px, ${ROW_LINE} ${row - 1}px ${row}px)`,
    });
  }
}

/**
 * Spreads one histogram (counts over equal bins from lo to hi) onto the grid
 * `edges` by overlap; returns [grid counts, count that fell outside the grid].
 */
export function resample(lo, hi, counts, edges) {
  const n = edges.length - 1;
  const out = new Array(n).fill(0);
  let outside = 0;
  if (lo === null || hi === null || n < 1) return [out, counts.reduce((a, b) => a + b, 0)];
  const g0 = edges[0];
  const gw = (edges[n] - g0) / n;
  const w = (hi - lo) / counts.length;
  counts.forEach((c, k) => {
    if (!c) return;
    const a = lo + k * w;
    const b = a + w;
    if (w <= 0 || gw <= 0) {
      const j = Math.floor((a - g0) / (gw || 1));
      if (j >= 0 && j < n) out[j] += c; else outside += c;
      return;
    }
    let placed = 0;
    const j0 = Math.max(0, Math.floor((a - g0) / gw));
    const j1 = Math.min(n - 1, Math.floor((b - g0) / gw));
    for (let j = j0; j <= j1; j++) {
      const overlap = Math.min(b, g0 + (j + 1) * gw) - Math.max(a, g0 + j * gw);
      if (overlap > 0) { const part = (c * overlap) / w; out[j] += part; placed += part; }
    }
    outside += c - placed;
  });
  return [out, outside];
}

/** The mean of rows[from..to), bin by bin. */
function meanRow(rows, from, to) {
  const out = new Array(rows[from].length).fill(0);
  for (let j = from; j < to; j++) rows[j].forEach((v, b) => { out[b] += (v || 0) / (to - from); });
  return out;
}

function fractions(row) {
  const total = row.reduce((a, b) => a + (b || 0), 0);
  return total > 0 ? row.map((v) => (v || 0) / total) : row.map(() => 0);
}

/** One layer's activation histogram over time: steps on x, value on y, share of values as colour. */
export class HistogramOverTime {
  constructor(div, { onRegrid = () => {} } = {}) {
    this.div = div;
    this.onRegrid = onRegrid;
    this.drawnAt = -Infinity;
    describeChart(div);
    this.clear("");
  }

  due(now) {
    return !this.dataDirty || now - this.drawnAt >= HEATMAP_INTERVAL_MS;
  }

  clear(layer) {
    this.layer = layer;
    this.steps = [];
    this.edges = [];
    this.rows = [];
    this.cursor ??= null; // another layer, same replay step: the cursor stays
    this.outsideShare = 0;
    this.dataDirty = true;
    scheduler.mark(this);
  }

  /** From /histograms: z is [per step [per bin]] on `edges`. */
  set(layer, steps, edges, z) {
    this.layer = layer;
    this.steps = steps.slice();
    this.edges = edges.slice();
    this.rows = z.map(fractions);
    this.outsideShare = 0;
    this.shrink();
    this.dataDirty = true;
    scheduler.mark(this);
  }

  /** A live probe's histogram for this layer. */
  append(step, hist) {
    if (!hist || (this.steps.length && step <= this.steps[this.steps.length - 1])) return;
    const total = hist.counts.reduce((a, b) => a + b, 0);
    if (!this.edges.length) {
      const pad = (hist.hi - hist.lo) * 0.25 || 1;
      const n = hist.counts.length;
      const lo = hist.lo - pad;
      const width = (hist.hi - hist.lo + 2 * pad) / n;
      this.edges = Array.from({ length: n + 1 }, (_, i) => lo + i * width);
    }
    const [row, outside] = resample(hist.lo, hist.hi, hist.counts, this.edges);
    this.steps.push(step);
    this.rows.push(fractions(row));
    this.outsideShare = 0.8 * this.outsideShare + 0.2 * (total ? outside / total : 0);
    if (this.outsideShare > 0.05) { this.outsideShare = 0; this.onRegrid(this.layer); }
    this.shrink();
    this.dataDirty = true;
    scheduler.mark(this);
  }

  shrink() {
    while (this.steps.length > MAX_COLUMNS) {
      this.steps = this.steps.filter((_, i) => i % 2 === 1 || i === this.steps.length - 1);
      this.rows = this.rows.filter((_, i) => i % 2 === 1 || i === this.rows.length - 1);
    }
  }

  setCursor(step) { this.cursor = step; scheduler.mark(this); }

  /**
   * In words (describeChart): the layer, its probe steps and, at the last one (the replay
   * cursor's, in replay), the range of values holding all but the outer 5% on each side and
   * the busiest bin. "Layer fc1: 15 probe steps, steps 0 to 280. At step 280: 90% of values
   * between -0.8 and 0.75, most near 0.02."
   */
  summary() {
    if (!this.steps.length) return this.layer ? NO_PROBE_YET : "this run has no probed layer yet";
    const n = this.steps.length;
    const head = `Layer ${this.layer}: ${n} probe step${n === 1 ? "" : "s"}, ${stepSpan(this.steps[0], this.steps[n - 1])}.`;
    let j = n - 1;
    if (this.cursor !== null && this.cursor !== undefined) {
      while (j >= 0 && this.steps[j] > this.cursor) j--;
      if (j < 0) return `${head} Cursor at step ${stepText(this.cursor)}, before the first probe step.`;
    }
    const row = this.rows[j];
    const total = row.reduce((a, b) => a + (b || 0), 0);
    if (!(total > 0) || this.edges.length !== row.length + 1) return `${head} No values at step ${stepText(this.steps[j])}.`;
    let acc = 0;
    let lo = -1;
    let hi = -1;
    let peak = 0;
    row.forEach((v, b) => {
      acc += v || 0;
      if (lo < 0 && acc > 0.05 * total) lo = b;
      if (hi < 0 && acc >= 0.95 * total) hi = b;
      if ((v || 0) > (row[peak] || 0)) peak = b;
    });
    // the busiest bins: the peak and its neighbours as full (a coarse live histogram spread
    // evenly over several grid bins), their middle
    let top = peak;
    while (top + 1 < row.length && Math.abs((row[top + 1] || 0) - row[peak]) <= 1e-9 * row[peak]) top++;
    return `${head} At step ${stepText(this.steps[j])}: 90% of values between ${formatNumber(this.edges[lo])} and `
      + `${formatNumber(this.edges[hi + 1])}, most near ${formatNumber((this.edges[peak] + this.edges[top + 1]) / 2)}.`;
  }

  draw() {
    const P = Plotly();
    if (!P) return Promise.resolve();
    if (!this.dataDirty && this.div.data) {
      return this.div.dataset.empty ? Promise.resolve() : P.relayout(this.div, { shapes: stepShapes(this.cursor) });
    }
    this.dataDirty = false;
    this.drawnAt = performance.now();
    if (!this.steps.length) {
      this.div.dataset.empty = "1";
      return plotReact(P, this.div, [], noteLayout(this.div, this.layer ? NO_PROBE_YET : "this run has no probed layer yet"), PLOT_CONFIG);
    }
    delete this.div.dataset.empty;
    hideNote(this.div);
    const centers = this.edges.slice(1).map((e, i) => (e + this.edges[i]) / 2);
    // evenly spaced columns (a merged one: the mean of its steps' shares), painted as one image: see evenGrid
    const { x, spans } = evenGrid(this.steps, plotColumns(this.div, 100));
    const z = spans.map(([from, to]) => (to - from === 1 ? this.rows[from].slice() : meanRow(this.rows, from, to)));
    const label = stepLabels(this.steps, spans);
    const data = [{
      // text is not transposed with z: a row a bin, as drawn
      type: "heatmap", transpose: true, x, y: centers, z, text: centers.map(() => label),
      colorscale: "Viridis", zmin: 0,
      // what the colour is: the share of the layer's values in that bin at that step
      colorbar: { thickness: 10, outlinewidth: 0, len: 0.9,
        title: { text: "share of values", side: "right", font: { size: 10 } } },
      hovertemplate: "step %{text}<br>value %{y:.3g}<br>share %{z:.3f}<extra></extra>",
    }];
    const layout = baseLayout({
      showlegend: false,
      xaxis: stepAxis(),
      yaxis: { ...baseLayout().yaxis, title: { text: plotlyText(this.layer) } },
      shapes: stepShapes(this.cursor),
    });
    return plotReact(P, this.div, data, layout, PLOT_CONFIG);
  }
}

/** Every layer's histogram at one step, drawn on small canvases. */
export class SmallMultiples {
  constructor(container, stepLabel) {
    this.container = container;
    this.stepLabel = stepLabel;
    this.cells = new Map();
    this.layers = [];
    this.step = null;
    describeChart(container, "Every layer's activation histogram");
    summaries.changed(this); // a run with no probe step never calls show(): its summary says so
  }

  /**
   * In words (describeChart), from the layers shown (not the cells as last drawn: see
   * Summaries), and each cell's name and description (role=img: its canvas is the
   * histogram): named by its layer and range ("fc1, values from -1 to 1"), described by its
   * title's statistics. The name held them too, and a screen reader read each cell's numbers
   * twice. "3 layers at step 280. Widest spread: layer0, std 1; narrowest: layer2, std 0.333."
   * Written with the summary (at most once a second), not on every replay frame's draw.
   */
  summary() {
    for (const layer of this.layers) {
      const { el } = this.cell(layer.name);
      const [lo, hi] = cellRange(layer);
      const title = cellTitle(layer, this.step);
      if (el.title !== title) el.title = title;
      el.setAttribute("aria-label", `${layer.name}, values from ${formatNumber(lo)} to ${formatNumber(hi)}`);
    }
    if (this.step === null || !this.layers.length) return "no probe step yet";
    const n = this.layers.length;
    const spread = this.layers.filter((l) => Number.isFinite(l.std)).sort((a, b) => b.std - a.std);
    const head = `${n} layer${n === 1 ? "" : "s"} at step ${stepText(this.step)}.`;
    if (spread.length < 2) return head;
    const widest = spread[0];
    const narrowest = spread[spread.length - 1];
    return `${head} Widest spread: ${widest.name}, std ${formatNumber(widest.std)}; narrowest: ${narrowest.name}, std ${formatNumber(narrowest.std)}.`;
  }

  /** layers: [{name, lo, hi, counts, mean, std, dead_ratio, saturated_ratio, ...}] */
  show(step, layers) {
    this.step = step;
    this.layers = layers;
    scheduler.mark(this);
  }

  cell(name) {
    let cell = this.cells.get(name);
    if (!cell) {
      const el = document.createElement("div");
      el.className = "multiple";
      el.dataset.layer = name;
      // role=img, its name and range aria-hidden: the cell's own name says them (summary)
      el.setAttribute("role", "img");
      el.innerHTML = '<div class="name" aria-hidden="true"></div><canvas></canvas>'
        + '<div class="range" aria-hidden="true"><span></span><span></span></div>';
      el.querySelector(".name").textContent = name;
      this.container.append(el);
      cell = { el, canvas: el.querySelector("canvas"), spans: el.querySelectorAll(".range span") };
      this.cells.set(name, cell);
    }
    return cell;
  }

  draw() {
    this.stepLabel.textContent = this.step === null ? "—" : String(this.step);
    for (const layer of this.layers) {
      const cell = this.cell(layer.name);
      const counts = layer.counts || layer.hist?.counts || [];
      const [lo, hi] = cellRange(layer);
      cell.el.dataset.step = String(this.step);
      cell.el.dataset.counts = JSON.stringify(counts);
      cell.el.title = cellTitle(layer, this.step);
      cell.spans[0].textContent = formatNumber(lo);
      cell.spans[1].textContent = formatNumber(hi);
      drawBars(cell.canvas, counts);
    }
    return Promise.resolve();
  }
}

/** A small multiple's histogram range: [lo, hi] (null when unknown). */
function cellRange(layer) {
  return [layer.lo ?? layer.hist?.lo ?? null, layer.hi ?? layer.hist?.hi ?? null];
}

/** A small multiple's title (its tooltip, and its description for a screen reader). */
function cellTitle(layer, step) {
  return [`${layer.name} at step ${step}`, `mean ${formatNumber(layer.mean)}`,
    `std ${formatNumber(layer.std)}`, `zero ${formatNumber(layer.zero_frac)}`,
    `dead ${formatNumber(layer.dead_ratio)}`, `saturated ${formatNumber(layer.saturated_ratio)}`].join("\n");
}

export function drawBars(canvas, counts) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
  if (canvas.width !== w) canvas.width = w;
  if (canvas.height !== h) canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...counts);
  const bw = w / Math.max(1, counts.length);
  ctx.fillStyle = "#4aa3ff";
  counts.forEach((c, i) => {
    const bh = (c / max) * (h - 1);
    ctx.fillRect(i * bw, h - bh, Math.max(1, bw - 0.5), bh);
  });
}
