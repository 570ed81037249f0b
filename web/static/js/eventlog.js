/**
 * eventlog.js — the run page's event log, alerts list and command markers.
 *
 * Owns: one line of text per event (status changes, commands sent and who sent them,
 * acknowledged commands with the step boundary they were applied at ("applied after step N":
 * applied_at_step is the step whose w.step() applied it, so it takes effect from step N + 1,
 * DESIGN §4), alerts naming their layer,
 * checkpoints), de-duplicated so an event seen twice (a catchup that overlaps what is
 * shown; a server event heard live and read again from /events) adds one line: a
 * trainer's event by its seq, a server's (no seq) by kind, step, created_at and data,
 * and the marker list (who, what, after which step) the time charts draw; in replay, the
 * alerts list holds only the alerts raised by the cursor's step and the log marks the lines
 * after it (setCursor), and alertSteps the steps alerts fired at (the loss chart's alert
 * markers). The log lists the newest MAX_LINES events (more once older ones are loaded) and
 * says so when it holds only part of the run (its "older events" line, whose button asks
 * loadOlder); the alerts come apart from the log (addAlerts: a run's early alerts are not
 * among its newest events), and every alert is kept, so the cursor's are listed whatever
 * the log holds.
 * Never: decides control state (controls.js) or fetches anything (loadOlder, run.js's, does).
 */

import { formatNumber } from "./charts.js";
import { setOff, softOff } from "./controls.js";

/** The most lines the log keeps as events come (older ones loaded on request raise it). */
export const MAX_LINES = 500;
/** The most alerts the alerts panel lists (the newest by the cursor); every one is kept. */
export const MAX_ALERT_LINES = 500;
/** How a line after the replay cursor is dimmed (kept visible: it happened later). */
const AFTER_OPACITY = "0.45";

/**
 * Who sent each command (its "command" event's source and origin, by command id): a live
 * marker names them as a reloaded page's does. An entry goes with its command's
 * acknowledgement, and past MAX_SENDERS the oldest go (commands never acknowledged): the
 * map grew by one a command for the page's life.
 */
const senders = new Map();
export const MAX_SENDERS = 1000;
/** The most event keys the log remembers to drop a repeat by (10x the events a re-read asks for). */
export const MAX_SEEN = 5000;

/** How many command senders the page holds (for tests). */
export function sendersHeld() {
  return senders.size;
}

function noteSender(id, who) {
  senders.delete(id); // a repeat goes to the back
  senders.set(id, who);
  while (senders.size > MAX_SENDERS) senders.delete(senders.keys().next().value);
}

function argsText(name, args, state) {
  if (args && Object.keys(args).length) {
    // a rule's proposal is relative to the scale the trainer acknowledged: {relative: 0.5}
    if (name === "set_lr_scale" && "relative" in args && !("value" in args)) {
      return `×${args.relative} of the current scale`;
    }
    if (name === "set_lr_scale") return `×${formatNumber(args.value)}`;
    if (name === "set_weight_decay") return args.enabled ? "on" : "off";
    if (name === "set_frozen") return `${args.frozen ? "freeze" : "unfreeze"} ${args.layers.join(", ")}`;
    if (name === "set_rules") return Object.entries(args).map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(",") || "none" : v}`).join(" ");
    return JSON.stringify(args);
  }
  if (state && name === "set_lr_scale") return `×${formatNumber(state.lr_scale)}`;
  if (state && name === "set_weight_decay") return state.weight_decay_enabled ? "on" : "off";
  return "";
}

/** A command's name and arguments in words, with no stray space when it has none: "pause", "set_lr_scale ×0.5". */
function commandText(name, args, state) {
  return `${name || "?"} ${argsText(name, args, state)}`.trim();
}

/** An alert's action ({name, args, source, reason}, or an older plain name) in words: "pause", "set_lr_scale ×0.5". */
export function actionText(action) {
  if (!action) return "";
  if (typeof action !== "object") return String(action);
  return commandText(action.name, action.args);
}

export function describeEvent(ev) {
  const d = ev.data || {};
  switch (ev.kind) {
    case "status": return `status → ${d.status}${d.reason ? ` (${d.reason})` : ""}${d.error ? `: ${d.error}` : ""}`;
    case "command_result": {
      const what = commandText(d.name, d.args, d.state);
      // a rule's command always says why; another says so when it was given a reason
      // (a resumed run's steering: "restored from checkpoint-500.pt")
      const rule = d.source === "rule" ? ` · rule: ${d.reason || "no reason given"}`
        : d.reason ? ` · ${d.reason}` : "";
      return d.ok === false ? `${what} failed: ${d.error || "?"}${rule}` : `${what} applied after step ${d.applied_at_step ?? ev.step}${rule}`;
    }
    case "command": {
      const who = [d.source, d.origin].filter(Boolean).join(", ");
      return `${commandText(d.name, d.args)} sent${who ? ` by ${who}` : ""}${d.reason ? `: ${d.reason}` : ""}`;
    }
    case "alert": return `${d.rule ? `${d.rule} ` : ""}${d.layer ? `[${d.layer}] ` : ""}${d.message || JSON.stringify(d)}${d.action ? ` → ${actionText(d.action)}` : ""}`;
    case "sanity": return d.message || (d.passed ? "sanity check PASS" : "sanity check FAIL");
    case "checkpoint": return `checkpoint ${d.path || ""}`.trim();
    default: return d.message || JSON.stringify(d);
  }
}

/** One event's identity: its seq (a trainer's), else what the server stored it with. */
export function eventKey(ev) {
  return ev.seq ?? `${ev.kind}:${ev.step}:${ev.created_at ?? ""}:${JSON.stringify(ev.data)}`;
}

/**
 * What an alert's own advice offers as a button, when a control does it: a NaN/Inf
 * ("Lower the learning rate") or dead ReLUs ("a lower learning rate") -> Halve LR;
 * Overfit ("Add weight decay") -> weight decay on. None when the rule acted itself.
 */
const SUGGESTIONS = {
  ExplodingTensor: { kind: "halve_lr", label: "Halve LR" },
  DeadUnits: { kind: "halve_lr", label: "Halve LR" },
  Overfit: { kind: "wd-on", label: "Switch weight decay on" },
};

/**
 * The rules' words for a zero init found by the probes (trainer/rules.py: the first probed
 * layer has no spread, "... (std 0): a zero init, which never breaks symmetry"). Not their
 * older generic advice ("Zero init never breaks symmetry, and a too-small init ..."), which
 * every AllZero alert carried, a too-large init's too.
 */
const ZERO_INIT_WORDS = /(?<!not )\ba zero init\b/i;

/**
 * Why a lower learning rate cannot revive a DeadUnits alert's units, or null when it may.
 * A zero init never breaks symmetry: every unit of a layer stays identical whatever the
 * step size, and the fix is the init (PRACTICES.md). A zero-init run's DeadUnits alert
 * offered a one-click Halve LR. `context`: {zeroInit: the run's config says init zero,
 * alerts: the run's alerts, by step}: one at or before this alert's step (its own
 * included) that names a zero init says so too (a watch() run's config need not).
 */
export function initCause(ev, context = {}) {
  if (context.zeroInit) return "this run's init is zero: every unit of a layer stays identical, whatever the learning rate";
  const step = typeof ev.step === "number" ? ev.step : Infinity;
  const named = [ev, ...(context.alerts || [])].find((a) => ZERO_INIT_WORDS.test(a.data?.message || "")
    && (a.step ?? -Infinity) <= step);
  if (named) {
    const where = named === ev ? "this alert" : `${named.data?.rule || "an"} alert at step ${named.step}`;
    return `${where} names a zero init: every unit of a layer stays identical, whatever the learning rate`;
  }
  return null;
}

/**
 * The Overfit advice that asks for weight decay to be switched on (trainer/rules.py
 * _weight_decay_advice: it is off now, or the rules cannot tell). Not the others: a model
 * still under-fitting ("fix those first"), weight decay already on ("raise it"), or 0 in
 * every param group ("cannot be switched on live"), where the button offered what the
 * alert advises against or cannot do.
 */
const WD_ON_ADVICE = /Switch weight decay on \(it is off now\)|Add weight decay, dropout or more data\./;

export function suggestionFor(ev, context = {}) {
  const d = ev.data || {};
  if (ev.kind !== "alert") return null;
  const s = SUGGESTIONS[d.rule];
  if (!s || (d.action && s.kind === "wd-on" && d.action.name === "set_weight_decay")) return null;
  if (d.rule === "DeadUnits" && initCause(ev, context)) return null;
  if (s.kind === "wd-on" && !WD_ON_ADVICE.test(d.message || "")) return null;
  return s;
}

/**
 * The step from which an event counts as having happened: its step, but for an applied
 * command the step after the one it was applied after (in effect from N + 1, DESIGN §4).
 */
export function eventFrom(ev) {
  const d = ev.data || {};
  if (ev.kind === "command_result" && d.ok !== false) {
    const at = d.applied_at_step ?? ev.step;
    return typeof at === "number" ? at + 1 : null;
  }
  return typeof ev.step === "number" ? ev.step : null;
}

/** Index of the first alert in `list` (sorted by step, a stepless one first) whose step is above `step`. */
function upperBound(list, step) {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if ((list[mid].step ?? -Infinity) <= step) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export class EventLog {
  constructor(list, alerts) {
    this.list = list;
    this.alerts = alerts;
    this.seen = new Set();        // the log's event keys (a repeat adds no line)
    this.alertSeen = new Set();   // the alerts panel's (alerts come with the log and apart)
    this.alertList = [];          // every alert, by step (arrival order within a step)
    this.alertSteps = new Set();  // steps alerts fired at (the loss chart's alert markers)
    this.cursor = null;           // replay: the alerts by this step are listed, later lines marked
    this.lastStep = null;         // replay: the run's last step (the cursor's furthest)
    this.shownAlerts = null;      // [count listed up to the cursor, alerts held] last rendered
    this.maxLines = MAX_LINES;
    this.olderLine = null;        // "older events not shown" at the log's foot
    this.loadOlder = null;        // () => Promise: reads older events (run.js), addOlder()s them
    this.suggestion = null; // {send(kind) -> bool, blocked(kind) -> reason}: the alerts' buttons
    this.zeroInit = false;  // the run's config says init zero: a lower LR cannot revive its dead units
  }

  /** The run's init is zero (its config's model.init): its DeadUnits alerts offer no Halve LR. */
  setZeroInit(zero) {
    if (this.zeroInit === !!zero) return;
    this.zeroInit = !!zero;
    this.shownAlerts = null; // rendered again with or without their buttons
    this.renderAlerts();
  }

  /** Enables or disables each alert's button from the control bar's current state. */
  renderSuggestions() {
    if (!this.suggestion) return;
    for (const b of this.alerts.querySelectorAll("button[data-suggest]")) {
      const why = this.suggestion.blocked(b.dataset.suggest);
      setOff(b, !!why); // the one with the focus keeps it (aria-disabled)
      b.title = why || "Sends the command from the control bar; shown there once acknowledged.";
    }
  }

  /** The log's event lines (not its "older events" line), newest first. */
  lines() {
    return this.list.querySelectorAll("li[data-kind]");
  }

  /** Adds events (oldest first) to the log, their alerts to the alerts panel; returns how many were new to the log. */
  add(events) {
    let added = 0;
    for (const ev of events) {
      if (ev.kind === "alert") this.noteAlert(ev);
      const key = eventKey(ev);
      if (this.seen.has(key)) continue;
      this.remember(key);
      added++;
      if (ev.kind === "command" && ev.data?.id) noteSender(ev.data.id, [ev.data.source, ev.data.origin]);
      this.list.prepend(this.line(ev));
    }
    let count = this.lines().length;
    if (count > this.maxLines) {
      const lines = this.lines();
      for (let i = lines.length - 1; count > this.maxLines; i--, count--) lines[i].remove();
      this.setOlder(true);
    }
    this.renderAlerts();
    return added;
  }

  remember(key) {
    this.seen.add(key);
    if (this.seen.size > MAX_SEEN) this.seen.delete(this.seen.values().next().value);
  }

  /**
   * Events older than the log's oldest line (`events`: the run's newest N, oldest first, as
   * /events?limit=N lists them) added at its foot; `more`: the run has older ones still.
   */
  addOlder(events, more) {
    const shown = new Set([...this.lines()].map((li) => li.dataset.key));
    const first = events.findIndex((ev) => shown.has(String(eventKey(ev))));
    const older = (first < 0 ? events : events.slice(0, first)).filter((ev) => !shown.has(String(eventKey(ev))));
    const foot = this.olderLine?.isConnected ? this.olderLine : null;
    for (const ev of older.reverse()) { // newest of them first, under the oldest line shown
      if (ev.kind === "alert") this.noteAlert(ev);
      if (ev.kind === "command" && ev.data?.id && !senders.has(ev.data.id)) noteSender(ev.data.id, [ev.data.source, ev.data.origin]);
      this.remember(eventKey(ev));
      this.list.insertBefore(this.line(ev), foot);
    }
    this.maxLines = Math.max(this.maxLines, this.lines().length);
    this.setOlder(more);
    this.renderAlerts();
  }

  /** Says at the log's foot that older events are not listed (and offers to load them), or not. */
  setOlder(more) {
    if (!more) {
      this.olderLine?.remove();
      return;
    }
    if (!this.olderLine) {
      this.olderLine = document.createElement("li");
      this.olderLine.className = "muted older";
      const text = document.createElement("span");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Load older";
      button.addEventListener("click", () => {
        if (!this.loadOlder) return;
        button.disabled = true;
        Promise.resolve(this.loadOlder()).finally(() => { button.disabled = false; });
      });
      this.olderLine.append(text, " ", button);
    }
    this.olderLine.firstChild.textContent = `Older events not shown: this log lists the newest ${this.lines().length}.`;
    this.olderLine.lastChild.hidden = !this.loadOlder;
    this.list.append(this.olderLine); // at the foot, below the oldest line
  }

  /** Alerts read apart from the log (oldest first): the panel and the markers, not the log. */
  addAlerts(events) {
    for (const ev of events) if (ev.kind === "alert") this.noteAlert(ev);
    this.renderAlerts();
  }

  noteAlert(ev) {
    const key = eventKey(ev);
    if (this.alertSeen.has(key)) return;
    this.alertSeen.add(key);
    const step = typeof ev.step === "number" ? ev.step : null;
    this.alertList.splice(upperBound(this.alertList, step ?? -Infinity), 0, ev);
    if (step !== null) this.alertSteps.add(step);
  }

  /**
   * Replay: the run as it stood at `step` (null: the whole run, as live): the alerts panel
   * lists the alerts raised at or before it, and the log marks (dims) the lines after it.
   * `last`: the run's last step, the furthest the cursor goes. A command applied after it
   * counts from a step never trained (eventFrom: last + 1), so it is not after the cursor
   * there: the run's own final "stop applied after step N" read as later than step N.
   */
  setCursor(step, last = null) {
    this.cursor = step;
    this.lastStep = last;
    this.renderAlerts();
    for (const li of this.lines()) this.markLine(li);
  }

  markLine(li) {
    const atEnd = this.cursor !== null && this.lastStep !== null && this.lastStep !== undefined && this.cursor >= this.lastStep;
    const upTo = atEnd ? this.cursor + 1 : this.cursor;
    const later = this.cursor !== null && li.dataset.from !== undefined && Number(li.dataset.from) > upTo;
    if (later === li.classList.contains("after-cursor")) return;
    li.classList.toggle("after-cursor", later);
    li.style.opacity = later ? AFTER_OPACITY : "";
    if (later) li.title = `after the replay cursor (step ${this.cursor})`;
    else li.removeAttribute("title");
  }

  /** Lists the newest MAX_ALERT_LINES alerts raised by the cursor (every alert's without one). */
  renderAlerts() {
    const held = this.alertList.length;
    const upTo = this.cursor === null ? held : upperBound(this.alertList, this.cursor);
    const same = this.shownAlerts && this.shownAlerts[0] === upTo && this.shownAlerts[1] === held;
    if (same && upTo) return;
    this.shownAlerts = [upTo, held];
    if (!held) {
      const none = document.createElement("li");
      none.className = "muted";
      none.textContent = "No alerts.";
      this.alerts.replaceChildren(none);
      return;
    }
    if (!upTo) {
      const none = document.createElement("li");
      none.className = "muted none-yet";
      none.textContent = `No alerts by step ${this.cursor}.`;
      this.alerts.replaceChildren(none);
      return;
    }
    const items = this.alertList.slice(Math.max(0, upTo - MAX_ALERT_LINES), upTo).reverse().map((ev) => this.alertLine(ev));
    if (upTo > MAX_ALERT_LINES) {
      const more = document.createElement("li");
      more.className = "muted older";
      more.textContent = `${upTo - MAX_ALERT_LINES} older alerts not listed.`;
      items.push(more);
    }
    this.alerts.replaceChildren(...items);
    this.renderSuggestions();
  }

  alertLine(ev) {
    const li = this.line(ev);
    li.classList.add("alert");
    li.classList.remove("after-cursor");
    li.style.opacity = "";
    li.removeAttribute("title");
    if (typeof ev.step === "number") li.dataset.step = String(ev.step);
    const context = { zeroInit: this.zeroInit, alerts: this.alertList };
    const hint = suggestionFor(ev, context);
    const cause = ev.kind === "alert" && ev.data?.rule === "DeadUnits" && this.suggestion ? initCause(ev, context) : null;
    if (cause) {
      // what its advice's "lower learning rate" would do here, said instead of a button
      const why = document.createElement("span");
      why.className = "suggest-none";
      why.textContent = `No Halve LR: ${cause}. The fix is the init (He for ReLU layers).`;
      li.append(" ", why);
    }
    if (hint && this.suggestion) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "suggest";
      b.dataset.suggest = hint.kind;
      b.textContent = hint.label;
      b.addEventListener("click", () => {
        if (softOff(b)) return;
        this.suggestion.send(hint.kind);
        this.renderSuggestions();
      });
      li.append(" ", b);
    }
    return li;
  }

  line(ev) {
    const li = document.createElement("li");
    li.dataset.kind = ev.kind;
    li.dataset.key = String(eventKey(ev));
    const from = eventFrom(ev);
    if (from !== null) li.dataset.from = String(from);
    if (ev.data?.source === "rule") li.classList.add("rule");
    const step = document.createElement("span");
    step.className = "step";
    step.textContent = `step ${ev.step ?? "—"}`;
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = ev.kind;
    li.append(step, kind, document.createTextNode(describeEvent(ev)));
    this.markLine(li);
    return li;
  }
}

/**
 * Where a command applied at step boundary `step` is drawn on a step axis: between step N,
 * the last one trained the old way, and N + 1, the first trained the new way (DESIGN §4).
 */
export function markerX(step) {
  return step + 0.5;
}

/** Command markers, keyed by command id: from /commands and from live acknowledgements. */
export class Markers {
  constructor() {
    this.byId = new Map();
  }

  /** A row of GET /api/runs/{id}/commands. */
  fromCommand(c) {
    if (c.status !== "applied" || c.applied_at_step === null || c.applied_at_step === undefined) return;
    const what = commandText(c.name, c.args, c.state);
    if (c.source === "rule") {
      this.byId.set(c.id, { step: c.applied_at_step, rule: true,
        label: `rule: ${c.reason || "no reason given"} · ${what} · applied after step ${c.applied_at_step}` });
      return;
    }
    const who = [c.source, c.origin].filter(Boolean).join(" · ") || "unknown";
    this.byId.set(c.id, { step: c.applied_at_step,
      label: `${what} · by ${who} · applied after step ${c.applied_at_step}` });
  }

  /**
   * A live command_result event; `sent` holds {args} of commands sent from this page. Who
   * sent it reads as after a reload (source · origin, from its "command" event): it read
   * "you (this page)" live and "user · viewer ..." reloaded.
   */
  fromEvent(ev, sent) {
    const d = ev.data || {};
    const sender = senders.get(d.id);
    senders.delete(d.id); // acknowledged (applied or failed): nothing reads it again
    if (d.ok === false || !d.id || this.byId.has(d.id)) return;
    const step = d.applied_at_step ?? ev.step;
    const mine = sent.get(d.id);
    if (d.source === "rule") {
      this.byId.set(d.id, { step, rule: true,
        label: `rule: ${d.reason || "no reason given"} · ${commandText(d.name, d.args, d.state)} · applied after step ${step}` });
      return;
    }
    const who = (sender || [d.source]).filter(Boolean).join(" · ") || "another client";
    this.byId.set(d.id, { step,
      // the acknowledgement's own args: another tab's command is not in `sent`
      label: `${commandText(d.name, d.args ?? mine?.args, d.state)} · by ${who} · applied after step ${step}` });
  }

  /**
   * [{step, x, label, rule?}] by step. x is where the charts draw the marker: half a step
   * after `step`, since a command applied after step N changes the lr/decay/frozen set
   * from step N + 1 on (a marker at N claimed the line changed at N).
   */
  list() {
    return [...this.byId.values()].sort((a, b) => a.step - b.step).map((m) => ({ ...m, x: markerX(m.step) }));
  }
}
