/**
 * replay.js — the step cursor of a finished run: a scrubber, play/pause at ×0.1 to
 * ×100, and `?step=N` deep links.
 *
 * Owns: the cursor's value and its movement over time, and Space on the scrubber
 * (play/pause). ×1 replays at the pace the run trained at (steps per second of the
 * trainer's clock, data-pace on the section); it reports every cursor move through
 * onCursor(step), and keeps `?step=N` in the address bar current.
 * Never: draws charts or fetches data itself.
 */

const URL_UPDATE_MS = 250;

export function stepFromUrl() {
  const raw = new URLSearchParams(location.search).get("step");
  if (raw === null || raw.trim() === "") return null;
  const n = Number(raw);
  return Number.isFinite(n) && n >= 0 ? Math.floor(n) : null;
}

export class Replay {
  constructor(section, { onCursor }) {
    this.section = section;
    this.onCursor = onCursor;
    this.scrubber = section.querySelector("#scrubber");
    this.output = section.querySelector("#cursor-step");
    this.playButton = section.querySelector("#play");
    this.speed = section.querySelector("#speed");
    this.first = 0;
    this.last = 0;
    this.pace = 1;          // recorded steps per second at ×1
    this.cursor = null;     // no step drawn yet: the first seek draws, even to step 0
    this.exact = 0;         // fractional cursor while playing
    this.playing = false;
    this.frame = null;
    this.urlTimer = null;
    this.scrubber.addEventListener("input", () => this.seek(Number(this.scrubber.value)));
    this.playButton.addEventListener("click", () => this.toggle());
    // Space on the scrubber plays and pauses: a range input has no use for it, and the
    // page's Space (controls.js) leaves a focused field alone, so after stepping with
    // the arrow keys Space did nothing until the focus left the scrubber.
    this.scrubber.addEventListener("keydown", (ev) => {
      if (ev.code !== "Space") return;
      ev.preventDefault();
      if (!ev.repeat) this.toggle();
    });
  }

  show(first, last, pace) {
    this.first = first;
    this.last = Math.max(first, last);
    this.setPace(pace);
    this.scrubber.min = String(this.first);
    this.scrubber.max = String(this.last);
    this.section.hidden = false;
  }

  /** Steps per second at ×1; none known (0): the whole run in a minute. */
  setPace(pace) {
    this.pace = pace > 0 ? pace : Math.max(1, (this.last - this.first) / 60);
    this.section.dataset.pace = String(this.pace);
  }

  seek(step, { updateUrl = true } = {}) {
    const s = Math.round(Math.min(this.last, Math.max(this.first, step)));
    this.exact = s;
    if (s === this.cursor && this.scrubber.value === String(s)) return;
    this.cursor = s;
    this.scrubber.value = String(s);
    this.output.textContent = String(s); // no live region: it changes every frame in playback
    this.scrubber.setAttribute("aria-valuetext", `step ${s}`);
    this.section.dataset.cursor = String(s);
    this.onCursor(s);
    if (updateUrl) this.scheduleUrl();
  }

  scheduleUrl() {
    clearTimeout(this.urlTimer);
    this.urlTimer = setTimeout(() => {
      const url = new URL(location.href);
      url.searchParams.set("step", String(this.cursor));
      history.replaceState(null, "", url);
    }, URL_UPDATE_MS);
  }

  toggle() {
    if (this.playing) this.pause();
    else this.play();
  }

  play() {
    if (this.cursor >= this.last) this.seek(this.first);
    this.playing = true;
    this.playButton.textContent = "❚❚";
    this.playButton.setAttribute("aria-label", "Pause replay");
    let before = performance.now();
    const tick = (now) => {
      if (!this.playing) return;
      const dt = (now - before) / 1000;
      before = now;
      this.exact += dt * this.pace * Number(this.speed.value);
      const next = Math.min(this.last, Math.floor(this.exact));
      const keep = this.exact;
      if (next !== this.cursor) this.seek(next);
      this.exact = keep;
      if (this.cursor >= this.last) { this.pause(); return; }
      this.frame = requestAnimationFrame(tick);
    };
    this.frame = requestAnimationFrame(tick);
  }

  pause() {
    this.playing = false;
    cancelAnimationFrame(this.frame);
    this.playButton.textContent = "▶";
    this.playButton.setAttribute("aria-label", "Play replay");
  }
}
