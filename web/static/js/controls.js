/**
 * controls.js — the run page's control bar (DESIGN §4).
 *
 * Owns: turning a click (or Space) into one command over the viewer socket with a
 * fresh id, showing that button as pending until the trainer's acknowledgement
 * (event kind "command_result" with the same id) arrives, and then showing the
 * acknowledged state and the step it was applied after ("after step N": applied_at_step is
 * the step whose w.step() applied it, so it is in effect from step N + 1, DESIGN §4).
 * Commands carry target state:
 * "Halve LR" sends set_lr_scale(acked lr_scale * 0.5).
 * A command still pending when the socket drops is sent again, with the same id, once
 * the socket is back (the server stores a command once per id, so a copy it already
 * had is only answered, never applied twice): one sent as the socket closed would
 * otherwise stay pending for good.
 * In replay (showAt) the bar, the LR × field with it, shows the state in effect at the
 * cursor's step: the last acknowledged command applied after an earlier step.
 * Step once is the one command that is not a target state: every click is a step. The
 * trainer applies the step_once commands it drains at one step boundary as one step, so
 * the bar sends one at a time: a click while one is pending is queued (the button says
 * "+N") and sent once the previous one is acknowledged (4 quick clicks lost all but the
 * first, or merged); the queue is dropped when the run resumes, ends, or a step fails.
 * Why a control is off is written out below the buttons (#control-reason, each disabled
 * button's aria-describedby): a button's title alone reached no touch or keyboard user.
 * `sent` (what the page sent, by id: what a resend sends again) keeps every pending
 * command and the KEEP_SETTLED last settled ones: it held every command a tab ever sent.
 * Never: shows a state the trainer has not acknowledged, or sends while no trainer
 * is connected or the run has ended (the buttons say why they are disabled).
 */

import { formatNumber } from "./charts.js";
import { toast } from "./notify.js";

const ENDED = new Set(["finished", "failed", "stopped", "lost"]);
const DEFAULT_STATE = { paused: false, lr_scale: 1, weight_decay_enabled: true, frozen: [], stopping: false };

/**
 * Whether the run's config says every parameter group was started with weight decay 0
 * (then the switch has nothing to turn on or off): a built-in run's solver.weight_decay,
 * or a watch() run's weight_decay / its optimizer's groups where its config lists them.
 */
export function startedWithoutWeightDecay(config) {
  if (!config || typeof config !== "object") return false;
  const wd = config.solver?.weight_decay ?? config.weight_decay;
  if (typeof wd === "number") return wd === 0;
  for (const key of ["param_groups", "optimizer_groups", "groups"]) {
    const groups = config[key] ?? config.optimizer?.[key];
    if (Array.isArray(groups) && groups.length && groups.every((g) => g && typeof g.weight_decay === "number")) {
      return groups.every((g) => g.weight_decay === 0);
    }
  }
  return false;
}

/** Layer kinds without parameters of their own: activations, dropout, pooling, reshaping. */
const PARAMLESS_KIND = /^(relu6?|leakyrelu|rrelu|elu|selu|celu|gelu|silu|mish|tanh|tanhshrink|sigmoid|logsigmoid|hardtanh|hardsigmoid|hardswish|hardshrink|softshrink|softplus|softsign|softmax|logsoftmax|threshold|glu|identity|flatten|unflatten|dropout\d?d?|alphadropout|(max|avg|adaptive(max|avg))pool\dd)$/i;

const STEP_NEEDS_PAUSE = "Step once advances the run by one step while it is paused: pause it first.";
const WAITING = "waiting for the trainer to acknowledge";
/**
 * Settled (acknowledged or refused) commands kept in `sent` beside the pending ones: a
 * reader of the acknowledgement's own frame (run.js's markers, after Controls) and a
 * late duplicate find theirs; older ones nothing reads again.
 */
export const KEEP_SETTLED = 8;
/** A button as the reason line names it, where its label alone would not say what it is. */
const LINE_NAMES = { set_lr_scale: "Set LR ×", "wd-toggle": "Weight decay" };
const STOPPING = "Stop was acknowledged: the trainer finishes its current step and exits.";
const NO_WEIGHT_DECAY = "This run was started with weight decay 0 (every parameter group): there is no weight decay to switch on or off.";

/** Closes every open dropdown <details> not holding `target` (all of them for null). */
export function closeDropdowns(target) {
  for (const d of document.querySelectorAll("details.dropdown[open], details.help[open]")) {
    if (target instanceof Node && d.contains(target)) continue;
    const hadFocus = d.contains(document.activeElement);
    d.open = false;
    if (hadFocus) d.querySelector("summary")?.focus();
  }
}

/**
 * Turns a button off. One that is pending, or has the focus, stays focusable: marked
 * aria-disabled (its click listener ignores it) rather than disabled, which dropped the
 * keyboard focus to <body> the moment Enter sent a command. Returns whether it is off.
 */
export function setOff(button, off, { keepFocus = false } = {}) {
  const soft = off && (keepFocus || button === document.activeElement);
  button.disabled = off && !soft;
  if (soft) button.setAttribute("aria-disabled", "true");
  else button.removeAttribute("aria-disabled");
  return off;
}

/** A button setOff turned off while keeping it focusable: its clicks do nothing. */
export function softOff(button) {
  return button.getAttribute("aria-disabled") === "true";
}

function newCommandId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export class Controls {
  /**
   * @param {HTMLElement} root  the #controls section
   * @param {{send: (msg) => boolean}} opts
   */
  constructor(root, { send }) {
    this.root = root;
    this.send = send;
    this.state = null;          // last acknowledged control state, or null before any
    this.since = {};            // state key -> step it was last applied after
    this.pending = new Map();   // command id -> button key
    this.lastApplied = null;    // {name, step} of the last acknowledged command
    this.applied = new Map();   // command id -> {name, step, state}: every acknowledged one (replay)
    this.replayStep = null;     // replay: the state shown is the one acknowledged by this step
    this.sent = new Map();      // command id -> {name, args} sent from this page
    this.spaceFallback = null;  // what Space does once the run has ended (replay play/pause)
    this.onRender = null;       // called after every render (the Rules group follows this bar)
    this.extraPending = null;   // () => ids of the Rules group's pending commands
    this.resendWanted = false;  // the socket dropped with commands pending: send them again
    this.stepQueue = 0;         // Step once clicks made while one was pending: sent one by one
    this.status = "starting";
    this.trainerConnected = false;
    this.uploading = false;
    this.socketOpen = false;
    this.noWeightDecay = false; // started with weight decay 0: the switch is off for good
    this.layers = [];           // the run's layer table
    this.paramLayers = new Set(); // layers the probes found parameters on
    this.buttons = new Map([...root.querySelectorAll("button[data-cmd]")].map((b) => [b.dataset.cmd, b]));
    this.labels = new Map([...this.buttons].map(([k, b]) => [k, b.textContent]));
    this.reason = root.querySelector("#control-reason");
    this.acked = root.querySelector("#acked");
    this.lrInput = root.querySelector("#lr-scale");
    this.freezeList = root.querySelector("#freeze-layers");
    this.freezeCount = root.querySelector("#freeze-count");
    this.freezeList.addEventListener("change", () => this.renderFreeze());
    for (const [key, button] of this.buttons) button.addEventListener("click", () => { if (!softOff(button)) this.click(key); });
    // Enter in the LR × field sets it, as the Set button beside it does (it did nothing)
    this.lrInput.addEventListener("keydown", (ev) => {
      if (ev.key !== "Enter" || ev.isComposing) return;
      ev.preventDefault();
      if (!softOff(this.buttons.get("set_lr_scale")) && !this.buttons.get("set_lr_scale").disabled) this.click("set_lr_scale");
    });
    document.addEventListener("keydown", (ev) => this.key(ev));
    // The dropdowns (Layers, Alerts, the "?" helps) close on Escape and on a click outside.
    document.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeDropdowns(null); });
    document.addEventListener("click", (ev) => closeDropdowns(ev.target));
    this.render();
  }

  /** The run's config (run detail): what the trainer was started with. */
  setConfig(config) {
    this.noWeightDecay = startedWithoutWeightDecay(config);
    this.render();
  }

  /** The run's layers (name, kind); the picker lists those with parameters (see frozenable). */
  setLayers(layers) {
    this.layers = layers;
    this.renderLayers();
  }

  /**
   * Names of layers the probes found parameters on (a weight_norm or grad_norm): once any
   * is known, the picker lists exactly those. Only re-renders for a name new to it.
   */
  addParamLayers(names) {
    const before = this.paramLayers.size;
    for (const n of names) this.paramLayers.add(n);
    if (this.paramLayers.size !== before) this.renderLayers();
  }

  /** Layers freezing can act on: those with parameters (an activation or dropout has none). */
  frozenable() {
    if (this.paramLayers.size) return this.layers.filter((l) => this.paramLayers.has(l.name));
    return this.layers.filter((l) => !PARAMLESS_KIND.test(l.kind || ""));
  }

  renderLayers() {
    const picked = new Set(this.pickedLayers());
    this.freezeList.replaceChildren(...this.frozenable().map((l) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = l.name;
      box.checked = picked.has(l.name);
      label.dataset.layer = l.name;
      const mark = document.createElement("span");
      mark.className = "frozen-mark";
      label.append(box, `${l.name} (${l.kind})`, mark);
      return label;
    }));
    this.renderFreeze();
  }

  pickedLayers() {
    return [...this.freezeList.querySelectorAll("input:checked")].map((b) => b.value);
  }

  renderFreeze() {
    const frozen = new Set((this.view().state || DEFAULT_STATE).frozen);
    // in words, not by colour alone: which layers the trainer acknowledged as frozen
    for (const label of this.freezeList.children) {
      const isFrozen = frozen.has(label.dataset.layer);
      label.classList.toggle("frozen", isFrozen);
      const mark = label.querySelector(".frozen-mark");
      if (mark) mark.textContent = isFrozen ? " · frozen" : "";
    }
    const n = this.pickedLayers().length;
    this.freezeCount.textContent = n ? `${n} picked` : "none picked";
  }

  setRun({ status, trainerConnected, socketOpen, uploading }) {
    if (status !== undefined) this.status = status;
    if (trainerConnected !== undefined) this.trainerConnected = trainerConnected;
    if (uploading !== undefined) this.uploading = uploading;
    if (socketOpen !== undefined) this.socketOpen = socketOpen;
    if (ENDED.has(this.status)) {
      this.pending.clear();
      this.stepQueue = 0;
    }
    this.render();
    this.maybeResend();
  }

  /** The viewer socket dropped: whatever is pending then is sent again once commands can go. */
  socketLost() {
    this.resendWanted = true;
  }

  maybeResend() {
    if (!this.resendWanted || this.disabledReason()) return;
    this.resendWanted = false;
    // after the catch-up frames of the message that reopened the socket (an acknowledgement
    // among them ends a pending command), so only commands the server may lack go again
    queueMicrotask(() => this.resendPending(this.extraPending ? this.extraPending() : []));
  }

  /** The acknowledged control state (snapshot, run detail, or a command_result). */
  setState(state, step = null, name = null) {
    if (!state) return;
    const before = this.state;
    this.state = { ...DEFAULT_STATE, ...state };
    if (!this.state.paused) this.stepQueue = 0; // resumed: queued single steps mean nothing now
    if (step !== null) {
      for (const key of ["paused", "lr_scale", "weight_decay_enabled", "frozen"]) {
        if (!before || JSON.stringify(before[key]) !== JSON.stringify(this.state[key])) this.since[key] = step;
      }
      if (name) this.lastApplied = { name, step };
    }
    this.syncLrInput();
    this.render();
  }

  /**
   * The LR × field holds the scale the bar shows: the acknowledged one, in replay the one
   * in effect at the cursor (it kept the run's last at every step). Left alone while typed in.
   */
  syncLrInput() {
    if (document.activeElement === this.lrInput) return;
    const s = this.replayStep === null ? this.state : this.view().state;
    this.lrInput.value = String((s || DEFAULT_STATE).lr_scale);
  }

  /**
   * The steps the acknowledged state took its values at, from the run's stored commands
   * (GET /commands, oldest first): after a reload the state comes without them. A key a
   * live acknowledgement has set already keeps its step.
   */
  historyFrom(commands) {
    let before = DEFAULT_STATE;
    let last = null;
    const since = {};
    for (const c of commands) {
      if (c.status !== "applied" || !c.state || c.applied_at_step == null) continue;
      this.applied.set(c.id, { name: c.name, step: c.applied_at_step, state: c.state });
      const after = { ...DEFAULT_STATE, ...c.state };
      for (const key of ["paused", "lr_scale", "weight_decay_enabled", "frozen"]) {
        if (JSON.stringify(before[key]) !== JSON.stringify(after[key])) since[key] = c.applied_at_step;
      }
      before = after;
      last = { name: c.name, step: c.applied_at_step };
    }
    this.since = { ...since, ...this.since };
    if (!this.lastApplied && last) this.lastApplied = last;
    if (this.replayStep !== null) this.syncLrInput();
    this.render();
  }

  /** The server's immediate answer to a command sent on the socket. */
  serverResult(msg) {
    if (!this.pending.has(msg.id)) return;
    if (msg.ok === false) {
      if (this.pending.get(msg.id) === "step_once") this.stepQueue = 0;
      this.pending.delete(msg.id);
      toast(`Command refused: ${msg.reason || "unknown reason"}`, "error");
      this.render();
    }
  }

  /** An event frame of kind "command_result" (the trainer's acknowledgement). */
  acknowledged(event) {
    const d = event.data || {};
    const key = this.pending.get(d.id);
    const wasMine = this.pending.delete(d.id);
    if (d.ok === false) {
      if (wasMine) toast(`${d.name} failed: ${d.error || "no reason given"}`, "error");
      if (key === "step_once") this.stepQueue = 0;
    } else if (d.state) {
      const step = d.applied_at_step ?? event.step;
      if (step !== null && step !== undefined) this.applied.set(d.id ?? `${d.name}@${step}`, { name: d.name, step, state: d.state });
      this.setState(d.state, step, d.name);
    }
    if (key === "step_once") this.nextQueuedStep();
    this.render();
  }

  /** Sends the next queued Step once, if the run is still paused and commands can go. */
  nextQueuedStep() {
    if (!this.stepQueue || this.buttonPending("step_once")) return;
    if (this.disabledReason() || !(this.state || DEFAULT_STATE).paused) {
      this.stepQueue = 0;
      return;
    }
    this.stepQueue--;
    this.dispatch("step_once", "step_once", {});
  }

  /**
   * Replay: shows the control state in effect at `step` (the last acknowledged command
   * applied after an earlier step: one applied after step N holds from N + 1), or, for
   * null, the run's last state.
   */
  showAt(step) {
    if (step === this.replayStep) return;
    this.replayStep = step;
    this.syncLrInput();
    this.render();
  }

  /** What the bar shows: {state, since, lastApplied}, at the replay step when there is one. */
  view() {
    if (this.replayStep === null) return { state: this.state, since: this.since, lastApplied: this.lastApplied };
    // applied after step c.step: in effect from c.step + 1
    const upTo = [...this.applied.values()].filter((c) => c.step < this.replayStep).sort((a, b) => a.step - b.step);
    let state = null;
    let lastApplied = null;
    const since = {};
    for (const c of upTo) {
      const before = state || DEFAULT_STATE;
      state = { ...DEFAULT_STATE, ...c.state };
      for (const key of ["paused", "lr_scale", "weight_decay_enabled", "frozen"]) {
        if (JSON.stringify(before[key]) !== JSON.stringify(state[key])) since[key] = c.step;
      }
      lastApplied = { name: c.name, step: c.step };
    }
    return { state, since, lastApplied };
  }

  ackedScale() {
    return (this.state || DEFAULT_STATE).lr_scale;
  }

  disabledReason() {
    if (ENDED.has(this.status)) return `The run has ended (${this.status}); controls are off. Scrub the replay below.`;
    if (!this.socketOpen) return "Not connected to the server; reconnecting…";
    if (!this.trainerConnected && this.uploading) {
      return "The run is being uploaded from its spool (layerscope sync); nothing can apply commands.";
    }
    if (!this.trainerConnected) return "No trainer is connected; commands would have nothing to act on.";
    return "";
  }

  click(key) {
    if (key === "step_once" && this.buttonPending(key) && !this.disabledReason() && (this.state || DEFAULT_STATE).paused) {
      this.stepQueue++; // sent once the pending one is acknowledged
      this.render();
      return;
    }
    if (this.disabledReason() || this.buttonPending(key)) return;
    const s = this.state || DEFAULT_STATE;
    let name;
    let args = {};
    switch (key) {
      case "pause-toggle": name = s.paused ? "resume" : "pause"; break;
      case "step_once": name = "step_once"; break;
      case "halve_lr": name = "set_lr_scale"; args = { value: s.lr_scale * 0.5 }; break;
      case "set_lr_scale": {
        const value = Number(this.lrInput.value);
        if (!(this.lrInput.value.trim() !== "" && Number.isFinite(value) && value >= 0)) {
          toast("LR scale must be a number ≥ 0", "error");
          return;
        }
        name = "set_lr_scale"; args = { value }; break;
      }
      case "wd-toggle":
        if (this.noWeightDecay) return;
        name = "set_weight_decay"; args = { enabled: !s.weight_decay_enabled }; break;
      case "freeze": case "unfreeze": {
        const layers = this.pickedLayers();
        if (!layers.length) { toast("Pick one or more layers first", "error"); return; }
        name = "set_frozen"; args = { layers, frozen: key === "freeze" }; break;
      }
      case "checkpoint": name = "checkpoint"; break;
      case "stop":
        if (!confirm("Stop this run? The trainer finishes its current step and exits.")) return;
        name = "stop"; break;
      default: return;
    }
    this.dispatch(key, name, args);
  }

  /**
   * An alert's suggestion ("halve_lr" or "wd-on") sent as the bar's own button would send
   * it, pending on that button; refused (false) while the controls are off or it is pending.
   */
  suggest(kind) {
    const s = this.state || DEFAULT_STATE;
    if (this.disabledReason()) return false;
    if (kind === "halve_lr") {
      if (this.buttonPending("halve_lr")) return false;
      this.dispatch("halve_lr", "set_lr_scale", { value: s.lr_scale * 0.5 });
      return true;
    }
    if (kind === "wd-on") {
      if (this.noWeightDecay || s.weight_decay_enabled || this.buttonPending("wd-toggle")) return false;
      this.dispatch("wd-toggle", "set_weight_decay", { enabled: true });
      return true;
    }
    return false;
  }

  /** Why an alert's suggestion cannot be sent now ("" when it can). */
  suggestionBlocked(kind) {
    const reason = this.disabledReason();
    if (reason) return reason;
    const s = this.state || DEFAULT_STATE;
    if (kind === "halve_lr" && this.buttonPending("halve_lr")) return "Waiting for the trainer to acknowledge";
    if (kind === "wd-on") {
      if (this.noWeightDecay) return NO_WEIGHT_DECAY;
      if (s.weight_decay_enabled) return "Weight decay is on already (acknowledged).";
      if (this.buttonPending("wd-toggle")) return "Waiting for the trainer to acknowledge";
    }
    return "";
  }

  dispatch(key, name, args) {
    const id = newCommandId();
    if (!this.send({ type: "command", id, name, args })) {
      toast("Not connected; the command was not sent", "error");
      return;
    }
    this.pending.set(id, key);
    this.remember(id, name, args);
    this.render();
  }

  /**
   * Records a command sent from this page (the Rules group's too), for a resend after a
   * reconnect; drops settled ones past the KEEP_SETTLED newest (pending ones stay).
   */
  remember(id, name, args) {
    this.sent.set(id, { name, args });
    const live = new Set([...this.pending.keys(), ...(this.extraPending ? this.extraPending() : [])]);
    let settled = 0;
    for (const old of [...this.sent.keys()].reverse()) {
      if (old !== id && !live.has(old) && ++settled > KEEP_SETTLED) this.sent.delete(old);
    }
    this.root.dataset.commandsKept = String(this.sent.size);
  }

  /**
   * After a reconnect: sends every command still pending (this bar's and ``ids``, the
   * Rules group's) again with its id. One the socket takes again stays pending until
   * the trainer acknowledges it or the server refuses it; one it cannot wait for the
   * next reconnect.
   */
  resendPending(ids = []) {
    for (const id of new Set([...this.pending.keys(), ...ids])) {
      const cmd = this.sent.get(id);
      if (cmd) this.send({ type: "command", id, name: cmd.name, args: cmd.args });
    }
  }

  key(ev) {
    if (ev.code !== "Space" || ev.repeat) return;
    const t = ev.target;
    // Space belongs to whatever has focus: a field, a button, a link, a <summary> (the
    // dropdowns, every "?" help), and a scroll container Chromium makes focusable (the
    // event log, where Space scrolls: it paused the run). The page's Space acts only when
    // nothing is focused.
    if (t !== document.body && t !== document.documentElement) return;
    ev.preventDefault();
    if (ENDED.has(this.status) && this.spaceFallback) this.spaceFallback();
    else this.click("pause-toggle");
  }

  buttonPending(key) {
    return [...this.pending.values()].includes(key);
  }

  render() {
    const s = this.view().state || DEFAULT_STATE;
    const reason = this.disabledReason();
    const why = new Map(); // a disabled button's reason -> the buttons it holds off
    this.root.dataset.acked = JSON.stringify(this.state);
    for (const [key, b] of this.buttons) {
      const pending = this.buttonPending(key);
      let label = this.labels.get(key);
      if (key === "pause-toggle") label = s.paused ? "Resume" : "Pause";
      const noWd = key === "wd-toggle" && this.noWeightDecay;
      if (key === "wd-toggle") label = noWd ? "Weight decay: 0" : `Weight decay: ${s.weight_decay_enabled ? "on" : "off"}`;
      const queued = key === "step_once" && pending ? this.stepQueue : 0;
      b.textContent = pending ? `${label} …${queued ? ` +${queued}` : ""}` : label;
      b.classList.toggle("pending", pending);
      b.classList.toggle("on", key === "wd-toggle" && !noWd && s.weight_decay_enabled);
      const notPaused = key === "step_once" && !s.paused;
      const stopping = key === "stop" && s.stopping;
      // Step once stays clickable while pending: a click then is queued (see nextQueuedStep)
      const queues = key === "step_once" && pending && !notPaused;
      const off = setOff(b, !!reason || (pending && !queues) || noWd || notPaused || stopping, { keepFocus: pending });
      // a greyed button says why, as the others do
      b.title = reason || (noWd ? NO_WEIGHT_DECAY
        : queues ? `Waiting for the trainer to acknowledge; a click now queues one more step${queued ? ` (${queued} queued)` : ""}`
          : pending ? "Waiting for the trainer to acknowledge"
            : notPaused ? STEP_NEEDS_PAUSE : stopping ? STOPPING : "");
      if (key === "step_once") b.dataset.queued = String(queued);
      const line = off && !reason ? (noWd ? "this run was started with weight decay 0: there is none to switch"
        : notPaused ? "advances the run by one step while it is paused: pause it first"
          : stopping ? "acknowledged; the trainer finishes its current step and exits"
            : pending ? WAITING : "") : "";
      if (line) why.set(line, [...(why.get(line) || []), LINE_NAMES[key] || label]);
      if (off) b.setAttribute("aria-describedby", this.reason.id);
      else b.removeAttribute("aria-describedby");
    }
    // in words under the buttons: a title shows on hover only (no touch, no keyboard user)
    const text = reason || [...why].map(([line, labels]) => `${labels.join(", ")}: ${line}.`).join(" ");
    this.reason.textContent = text; // its line stays (empty): the page does not jump as it changes
    this.reason.hidden = false;
    this.reason.classList.toggle("off", !!reason);
    // a polite live region while the run is live (an acknowledgement is heard once): set
    // only on a change, and silent in replay, where it follows the cursor
    const acked = this.describe();
    if (this.acked.textContent !== acked) this.acked.textContent = acked;
    this.acked.setAttribute("aria-live", ENDED.has(this.status) || this.replayStep !== null ? "off" : "polite");
    this.renderFreeze();
    if (this.onRender) this.onRender();
  }

  describe() {
    const { state: s, since, lastApplied } = this.view();
    const cursor = this.replayStep;
    if (!s && cursor !== null) return `run ${this.status}; no command acknowledged by step ${cursor}: it ran as started so far.`;
    if (!s && ENDED.has(this.status)) return `run ${this.status}; no command was acknowledged: it ran as started.`;
    if (!s) return "No command acknowledged yet: the trainer runs as started (LR ×1, weight decay as configured, nothing frozen).";
    const at = (k) => (k in since ? ` (after step ${since[k]})` : "");
    // An ended run is neither running nor stopping any more, whatever its last state said;
    // at a replay step before its end it was one or the other.
    const ended = ENDED.has(this.status) && cursor === null;
    const parts = [
      cursor !== null ? `run ${this.status}; as of step ${cursor}: ${s.paused ? "paused" : "running"}${at("paused")}`
        : ended ? `run ${this.status}; last acknowledged state:` : `acknowledged: ${s.paused ? "paused" : "running"}${at("paused")}`,
      `LR ×${formatNumber(s.lr_scale)}${at("lr_scale")}`,
      this.noWeightDecay ? "weight decay 0 (as started)" : `weight decay ${s.weight_decay_enabled ? "on" : "off"}${at("weight_decay_enabled")}`,
      `frozen: ${s.frozen.length ? s.frozen.join(", ") : "none"}${s.frozen.length ? at("frozen") : ""}`,
    ];
    if (s.stopping && !ended) parts.push("stopping");
    if (lastApplied) parts.push(`last: ${lastApplied.name} after step ${lastApplied.step}`);
    // "last acknowledged state:" introduces the rest (a separator after it read "state: · LR")
    return ended ? `${parts[0]} ${parts.slice(1).join(" · ")}` : parts.join(" · ");
  }
}
