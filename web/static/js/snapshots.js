/**
 * snapshots.js — which step the small multiples show, and fetching it.
 *
 * Owns: the sorted list of stored probe steps, snapping a cursor to the nearest
 * stored step at or before it (the server's rule), a small cache, and keeping at
 * most one /histogram request in flight (the latest cursor wins, so scrubbing fast
 * never queues a backlog). While following a live run it shows each new probe frame.
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
