/**
 * preview.js — a line chart drawn on a plain <canvas> while Plotly's bundle has not run.
 *
 * Owns: drawing a LineChart's current state (the same points, trace colours, smoothing,
 * log or linear y axis, zero-based range and command markers its Plotly chart will
 * show; a marker on each point of a trace of few points, FEW_POINTS; the chart's empty
 * note, with no axes, while it has no point, as its Plotly chart shows them) with axis
 * ticks, axis titles and a legend, on a canvas in the chart's div,
 * sized for devicePixelRatio and labelled for screen readers. Running Plotly takes
 * seconds here; this takes milliseconds, so a person sees the data that much sooner.
 * Never: handles input, fetches data, or survives the chart's first Plotly draw
 * (LineChart.draw removes the canvas, PREVIEW_CLASS, before it draws).
 */

import { baseLayout, hideNote, showNote, summaries } from "./charts.js";

export const PREVIEW_CLASS = "chart-preview";
const THEME = baseLayout();
const TEXT = THEME.font.color;
const GRID = THEME.xaxis.gridcolor;
const FONT = `${THEME.font.size}px ${THEME.font.family}`;
const MARGIN = THEME.margin;
const LEGEND_H = 32; // Plotly's horizontal legend above the plot pushes the top margin about this much
const MARKER_LINE = "#e3a52b"; // stepShapes' command marker line

/** About `count` round values (1, 2 or 5 × 10^k apart) covering [lo, hi]. */
function linearTicks(lo, hi, count) {
  const raw = (hi - lo) / count || Math.abs(hi) || 1;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

/** Powers of ten inside [10^lo, 10^hi] (log10 bounds), with 2 and 5 when there are few. */
function logTicks(lo, hi) {
  const ticks = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const m of hi - lo < 2 ? [1, 2, 5] : [1]) {
      const v = Math.log10(m) + e;
      if (v >= lo - 1e-9 && v <= hi + 1e-9) ticks.push(v);
    }
  }
  return ticks;
}

/** A y tick as Plotly writes it with exponentformat "e": 0.05, 2, 4e-4. */
function tickLabel(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3).replace(/\.?0+e/, "e").replace("e+", "e");
  return String(Number(v.toPrecision(6)));
}

const stepLabel = (v) => (Math.abs(v) >= 1e6 ? `${Number((v / 1e6).toPrecision(3))}M`
  : Math.abs(v) >= 1e3 ? `${Number((v / 1e3).toPrecision(3))}k` : String(v));

/** [lo, hi] of the finite values (log10 of the positive ones on a log axis), or null. */
function extent(traces, logY) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const t of traces) {
    for (const v of t.y) {
      if (v === null || !Number.isFinite(v) || (logY && v <= 0)) continue;
      const y = logY ? Math.log10(v) : v;
      if (y < lo) lo = y;
      if (y > hi) hi = y;
    }
  }
  if (lo > hi) return null;
  // one value: Plotly's ±1 around it (a log axis: half a decade)
  const pad = (hi - lo) * 0.05 || (logY ? 0.5 : 1);
  return [lo - pad, hi + pad];
}

/**
 * Draws `chart` (a LineChart holding its data) on a canvas filling its div, replacing any
 * earlier preview; returns the canvas. `title` names the chart for the aria-label.
 */
export function drawPreview(chart, title) {
  const div = chart.div;
  div.querySelector(`:scope > canvas.${PREVIEW_CLASS}`)?.remove();
  const data = chart.plotData();
  const lines = data.filter((t) => t.mode === "lines");
  const markers = data.find((t) => t.mode === "markers");
  const logY = chart.logY;
  const width = div.clientWidth;
  const height = div.clientHeight;
  const dpr = window.devicePixelRatio || 1;
  const canvas = document.createElement("canvas");
  canvas.className = PREVIEW_CLASS;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  canvas.style.cssText = `display:block;width:${width}px;height:${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.font = FONT;
  ctx.fillStyle = TEXT;
  canvas.setAttribute("role", "img");
  if (!chart.hasData()) {
    // the note its Plotly chart shows, no axes (empty axes read as a chart that failed)
    showNote(div, chart.empty);
    canvas.dataset.lines = "0";
    canvas.dataset.markers = "0";
    canvas.setAttribute("aria-label", `${title}: ${chart.empty}`);
    div.append(canvas);
    summaries.write(chart);
    return canvas;
  }
  hideNote(div);

  const xs = lines.flatMap((t) => (t.x.length ? [t.x[0], t.x[t.x.length - 1]] : []));
  const xMin = xs.length ? Math.min(...xs) : 0;
  const xMax = xs.length ? Math.max(...xs) : 1;
  // one step: Plotly's ±1 around it (the point in the middle, not on the axis)
  const x0 = xMax > xMin ? xMin : xMin - 1;
  const x1 = xMax > xMin ? xMax : xMin + 1;
  const [y0, y1] = chart.zeroBased && !logY ? chart.yRange() : extent(lines, logY) ?? [0, 1];
  const legend = chart.showLegend && lines.length > 1;
  const top = MARGIN.t + (legend ? LEGEND_H : 0);
  const plot = { l: MARGIN.l, t: top, w: Math.max(1, width - MARGIN.l - MARGIN.r), h: Math.max(1, height - top - MARGIN.b) };
  const px = (x) => plot.l + ((x - x0) / (x1 - x0)) * plot.w;
  const py = (y) => plot.t + plot.h - ((y - y0) / (y1 - y0)) * plot.h;

  ctx.strokeStyle = GRID;
  ctx.lineWidth = 1;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const x of linearTicks(x0, x1, Math.max(2, Math.floor(plot.w / 110)))) {
    if (x < x0 || x > x1) continue;
    ctx.beginPath();
    ctx.moveTo(Math.round(px(x)) + 0.5, plot.t);
    ctx.lineTo(Math.round(px(x)) + 0.5, plot.t + plot.h);
    ctx.stroke();
    ctx.fillText(stepLabel(x), px(x), plot.t + plot.h + 4);
  }
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const y of logY ? logTicks(y0, y1) : linearTicks(y0, y1, Math.max(2, Math.floor(plot.h / 40)))) {
    if (y < y0 || y > y1) continue;
    ctx.beginPath();
    ctx.moveTo(plot.l, Math.round(py(y)) + 0.5);
    ctx.lineTo(plot.l + plot.w, Math.round(py(y)) + 0.5);
    ctx.stroke();
    ctx.fillText(tickLabel(logY ? 10 ** y : y), plot.l - 4, py(y));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "bottom";
  ctx.fillText("step", plot.l + plot.w / 2, height - 1);
  ctx.save();
  ctx.translate(10, plot.t + plot.h / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.textBaseline = "middle";
  ctx.fillText(chart.yTitle, 0, 0);
  ctx.restore();

  ctx.save();
  ctx.beginPath();
  ctx.rect(plot.l, plot.t, plot.w, plot.h);
  ctx.clip();
  if (markers) {
    ctx.strokeStyle = MARKER_LINE;
    ctx.setLineDash([2, 3]);
    for (const s of markers.x) {
      ctx.beginPath();
      ctx.moveTo(Math.round(px(s)) + 0.5, plot.t);
      ctx.lineTo(Math.round(px(s)) + 0.5, plot.t + plot.h);
      ctx.stroke();
    }
    ctx.setLineDash([]);
  }
  ctx.lineWidth = lines[0]?.line.width ?? 1.5;
  ctx.lineJoin = "round";
  for (const t of lines) {
    ctx.strokeStyle = t.line.color;
    ctx.setLineDash(t.line.dash === "dash" ? [6, 4] : t.line.dash === "dot" ? [2, 3] : []);
    ctx.beginPath();
    let pen = false; // connectgaps: false, as Plotly draws it: a null breaks the line
    t.x.forEach((x, i) => {
      const v = t.y[i];
      if (v === null || !Number.isFinite(v) || (logY && v <= 0)) { pen = false; return; }
      const y = py(logY ? Math.log10(v) : v);
      if (pen) ctx.lineTo(px(x), y); else ctx.moveTo(px(x), y);
      pen = true;
    });
    ctx.stroke();
  }
  ctx.setLineDash([]);
  if (markers) {
    markers.x.forEach((s, i) => {
      const v = markers.y[i];
      if (v === null || (logY && v <= 0)) return;
      const x = px(s);
      const y = py(logY ? Math.log10(v) : v);
      ctx.fillStyle = markers.marker.color[i];
      ctx.beginPath();
      ctx.moveTo(x, y - 5); ctx.lineTo(x + 5, y); ctx.lineTo(x, y + 5); ctx.lineTo(x - 5, y);
      ctx.fill();
    });
  }
  ctx.restore();
  // a trace of few points has a marker on each (LineChart.drawnData): one point drew nothing;
  // outside the clip, as Plotly pads its range for them: a point on the plot's edge is whole
  let dots = 0;
  lines.forEach((t, i) => {
    if (!chart.fewPoints(i)) return;
    ctx.fillStyle = t.line.color;
    t.x.forEach((x, k) => {
      const v = t.y[k];
      if (v === null || !Number.isFinite(v) || (logY && v <= 0)) return;
      ctx.beginPath();
      ctx.arc(px(x), py(logY ? Math.log10(v) : v), 3, 0, 2 * Math.PI); // Plotly's size 6
      ctx.fill();
      dots++;
    });
  });

  if (legend) {
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    let x = plot.l;
    for (const t of lines) {
      ctx.strokeStyle = t.line.color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.moveTo(x, MARGIN.t + LEGEND_H / 2);
      ctx.lineTo(x + 28, MARGIN.t + LEGEND_H / 2);
      ctx.stroke();
      ctx.fillStyle = TEXT;
      ctx.fillText(t.name, x + 34, MARGIN.t + LEGEND_H / 2);
      x += 44 + ctx.measureText(t.name).width;
    }
  }

  const drawn = lines.filter((t) => t.y.some((v) => v !== null));
  canvas.dataset.lines = String(drawn.length);
  canvas.dataset.colors = drawn.map((t) => t.line.color).join(" ");
  canvas.dataset.markers = String(dots);
  canvas.setAttribute("aria-label", drawn.length
    ? `${title}: ${drawn.map((t) => t.name).join(", ")} ${xMax > xMin ? `over steps ${xMin}–${xMax}` : `at step ${xMin}`}${logY ? ", log scale" : ""}`
      + `${markers ? `, ${markers.x.length} command marker(s)` : ""} (a preview; the interactive chart follows)`
    : `${title}: ${chart.empty}`);
  div.append(canvas);
  summaries.write(chart); // the chart's own summary (describeChart) says what the preview shows, from now on
  return canvas;
}
