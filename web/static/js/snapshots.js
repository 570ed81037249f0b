/**
 * snapshots.js — which step the small multiples show, and fetching it.
 *
 * Owns: the sorted list of stored probe steps, snapping a cursor to the nearest
 * stored step at or before it (the server's rule), a small cache, and keeping at
 * most one /histogram request in flight (the latest cursor wins, so scrubbing fast
 * never queues a backlog). While following a live run it shows each new probe frame.
 * onSharedRange re-bins one step's histograms onto one x-range for every layer (the
 * small multiples' "same x-range" view).
 * Never: draws; it hands (step, layers) to its callback.
 */

import { getJSON, runUrl } from "./api.js";

const CACHE_SIZE = 200;

export class Snapshots {
  constructor(runId, show) {
    this.runId = runId;
    this.show = show;
    this.steps = [];
    this.cache = new Map();
    this.shown = null;
    this.wanted = null;
    this.inFlight = null;
    this.following = true;
  }

  setSteps(steps) {
    this.steps = steps.slice().sort((a, b) => a - b);
  }

  /** The stored probe step the server answers for `step`: the last <= step, else the first. */
  snap(step) {
    const s = this.steps;
    if (!s.length) return step;
    let lo = 0;
    let hi = s.length - 1;
    let best = s[0];
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (s[mid] <= step) { best = s[mid]; lo = mid + 1; } else hi = mid - 1;
    }
    return best;
  }

  /** A live probe frame: remembered, and shown while following. */
  live(frame) {
    if (!this.steps.length || frame.step > this.steps[this.steps.length - 1]) this.steps.push(frame.step);
    this.remember(frame.step, { step: frame.step, layers: frame.layers });
    if (this.following) {
      this.shown = frame.step;
      this.show(frame.step, frame.layers);
    }
  }

  remember(step, entry) {
    this.cache.set(step, entry);
    if (this.cache.size > CACHE_SIZE) this.cache.delete(this.cache.keys().next().value);
  }

  /** Shows an answer of /histogram?step=`step` fetched by the caller. */
  prime(step, answer) {
    const entry = { step: answer.step, layers: answer.layers };
    const key = this.snap(step);
    this.remember(key, entry);
    this.shown = key;
    this.wanted = key;
    this.show(entry.step, entry.layers);
  }

  /** Shows the stored histograms for the cursor; resolves once shown (or superseded). */
  request(step) {
    if (!this.steps.length) return Promise.resolve();
    this.wanted = this.snap(step);
    if (!this.inFlight) this.inFlight = this.drain().finally(() => { this.inFlight = null; });
    return this.inFlight;
  }

  async drain() {
    while (this.wanted !== this.shown) {
      const want = this.wanted;
      let entry = this.cache.get(want);
      if (!entry) {
        const answer = await getJSON(runUrl(this.runId, "histogram", { step: want }));
        entry = { step: answer.step, layers: answer.layers };
        this.remember(want, entry);
      }
      if (this.wanted === want) {
        this.shown = want;
        this.show(entry.step, entry.layers);
      }
    }
  }
}

/** A histogram's [lo, hi, counts] (a /histogram answer's layer or a live frame's), or null. */
function histOf(layer) {
  const lo = layer.lo ?? layer.hist?.lo;
  const hi = layer.hi ?? layer.hist?.hi;
  const counts = layer.counts || layer.hist?.counts;
  if (!Number.isFinite(lo) || !Number.isFinite(hi) || hi < lo || !counts?.length) return null;
  return [lo, hi, counts];
}

/**
 * `layers` with every histogram re-binned onto one shared x-range (the lowest lo to the
 * highest hi of the step, as many bins as the finest layer has), so a spread that shrinks
 * with depth reads as narrower bars rather than the same shape on its own axis. Each bin's
 * count is split over the shared bins it overlaps by overlap (a bin of zero width, every
 * value the same, goes whole into the bin holding it). A layer keeps its own range as
 * ownLo/ownHi. Layers without a histogram are returned as they are; fewer than two with
 * one, or no width at all, returns `layers` itself.
 */
export function onSharedRange(layers) {
  const hists = layers.map(histOf);
  const ranged = hists.filter(Boolean);
  if (ranged.length < 2) return layers;
  const lo = Math.min(...ranged.map((h) => h[0]));
  const hi = Math.max(...ranged.map((h) => h[1]));
  if (!(hi > lo)) return layers;
  const bins = Math.max(...ranged.map((h) => h[2].length));
  const width = (hi - lo) / bins;
  const at = (x) => Math.min(bins - 1, Math.max(0, Math.floor((x - lo) / width)));
  return layers.map((layer, i) => {
    const h = hists[i];
    if (!h) return layer;
    const [a0, b0, counts] = h;
    const out = new Array(bins).fill(0);
    const w = (b0 - a0) / counts.length;
    counts.forEach((c, j) => {
      if (!c) return;
      const a = a0 + j * w;
      const b = a + w;
      const first = at(a);
      const last = w > 0 ? at(b - w * 1e-9) : first;
      if (first === last) {
        out[first] += c;
        return;
      }
      for (let t = first; t <= last; t++) {
        const overlap = Math.min(b, lo + (t + 1) * width) - Math.max(a, lo + t * width);
        if (overlap > 0) out[t] += (c * overlap) / w;
      }
    });
    return { ...layer, hist: undefined, lo, hi, counts: out, ownLo: a0, ownHi: b0 };
  });
}
