/**
 * rules.js — the run page's "Rules" control group: silence each diagnostic rule and
 * switch the rules' automatic actions (halve LR on a plateau, weight decay on
 * over-fit) while the run trains.
 *
 * Owns: one `set_rules` command per change (a partial target state: {silenced} or
 * {auto_halve_lr} or {auto_weight_decay}), sent through the Controls' socket, each
 * switch pending until the trainer acknowledges it; what it shows is the
 * acknowledged `state.rules` only ({enabled, silenced, auto_halve_lr, auto_weight_decay}).
 * ValidationPlateau, auto-halve's alert, is in the silence list too: the trainer takes
 * `--silence ValidationPlateau` as auto-halve off (it raises that alert only while
 * auto-halve is on) and acknowledges it as `auto_halve_lr: false`, never in `silenced`;
 * its box is ticked exactly when Auto-halve LR is off, and ticking it switches that.
 * Why a switch is off is written in #rules-note (the button's aria-describedby), not in
 * its title alone.
 * Never: shows a switch as changed before the trainer says so, or sends while the
 * controls are off (same reasons as the rest of the control bar).
 */

import { setOff, softOff } from "./controls.js";
import { toast } from "./notify.js";

/** Auto-halve's alert: silenced is auto-halve off (see the module's comment). */
export const PLATEAU = "ValidationPlateau";

/** Why Auto weight decay cannot be switched on for a run started with weight decay 0. */
const NO_WEIGHT_DECAY_TO_ADD = "This run was started with weight decay 0 (every parameter group): "
  + "switching weight decay on would change nothing, so the Overfit rule has none to add.";

export class RulesPanel {
  /** @param {HTMLElement} root the #rules group; @param controls the page's Controls */
  constructor(root, controls) {
    this.root = root;
    this.controls = controls;
    this.pending = new Map(); // command id -> switch key ("auto_halve_lr", "auto_weight_decay", "silence:<rule>")
    this.list = root.querySelector("#rules-silence");
    this.count = root.querySelector("#rules-silenced-count");
    this.note = root.querySelector("#rules-note");
    this.buttons = [...root.querySelectorAll("button[data-rule-auto]")];
    for (const b of this.buttons) b.addEventListener("click", () => { if (!softOff(b)) this.toggleAuto(b.dataset.ruleAuto); });
    // a pending rule's box stays focusable (aria-disabled): a click on it changes nothing
    this.list.addEventListener("click", (ev) => {
      if (ev.target instanceof HTMLInputElement && softOff(ev.target)) ev.preventDefault();
    });
    this.list.addEventListener("change", (ev) => {
      const box = ev.target;
      if (box instanceof HTMLInputElement) this.toggleSilence(box.value, box.checked);
    });
    this.render();
  }

  rules() {
    return this.controls.state?.rules || null;
  }

  send(key, args) {
    const reason = this.controls.disabledReason();
    if (reason || [...this.pending.values()].includes(key)) { this.render(); return; }
    const id = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
    if (!this.controls.send({ type: "command", id, name: "set_rules", args })) {
      toast("Not connected; the command was not sent", "error");
      this.render();
      return;
    }
    this.pending.set(id, key);
    this.controls.remember(id, "set_rules", args);
    this.render();
  }

  toggleAuto(key) {
    const r = this.rules();
    if (r && !this.cannotSwitchOn(key, r)) this.send(key, { [key]: !r[key] });
  }

  /** Auto weight decay is off and the run has no weight decay for it to switch on. */
  cannotSwitchOn(key, r) {
    return key === "auto_weight_decay" && this.controls.noWeightDecay && !r?.[key];
  }

  toggleSilence(rule, silenced) {
    const r = this.rules();
    if (!r) return;
    if (rule === PLATEAU) { this.send("auto_halve_lr", { auto_halve_lr: !silenced }); return; }
    const set = new Set(r.silenced);
    if (silenced) set.add(rule); else set.delete(rule);
    this.send(`silence:${rule}`, { silenced: [...set] });
  }

  /** The server's immediate answer to a command sent on the socket. */
  serverResult(msg) {
    if (!this.pending.has(msg.id)) return;
    if (msg.ok === false) {
      this.pending.delete(msg.id);
      toast(`Rules change refused: ${msg.reason || "unknown reason"}`, "error");
    }
    this.render();
  }

  /** A command_result event: a switch of ours is no longer pending (Controls took the state). */
  acknowledged(event) {
    const d = event.data || {};
    if (!this.pending.delete(d.id)) return;
    if (d.ok === false) toast(`set_rules failed: ${d.error || "no reason given"}`, "error");
    this.render();
  }

  render() {
    const r = this.rules();
    const reason = this.controls.disabledReason();
    if (reason && ["finished", "failed", "stopped", "lost"].includes(this.controls.status)) {
      this.pending.clear(); // the run has ended: nothing will acknowledge them, nor resend them
    }
    const pendingKeys = new Set(this.pending.values());
    this.root.dataset.acked = JSON.stringify(r);
    const why = [];
    for (const b of this.buttons) {
      const key = b.dataset.ruleAuto;
      const on = !!r?.[key];
      const pending = pendingKeys.has(key);
      b.textContent = `${b.dataset.label}: ${r ? (on ? "on" : "off") : "—"}${pending ? " …" : ""}`;
      b.classList.toggle("on", on);
      b.classList.toggle("pending", pending);
      const pointless = this.cannotSwitchOn(key, r);
      // pending (or focused), it stays focusable: disabled dropped the focus to <body>
      const off = setOff(b, !r || !!reason || pending || pointless, { keepFocus: pending });
      b.title = reason || (pointless ? NO_WEIGHT_DECAY_TO_ADD : pending ? "Waiting for the trainer to acknowledge" : "");
      // the control bar's line says the common reason; this one says a switch's own
      if (off && !reason && r) why.push(`${b.dataset.label}: ${pointless ? NO_WEIGHT_DECAY_TO_ADD : "waiting for the trainer to acknowledge."}`);
      if (off) b.setAttribute("aria-describedby", reason ? this.controls.reason.id : this.note.id);
      else b.removeAttribute("aria-describedby");
    }
    this.note.textContent = r ? why.join(" ") : "No rules state acknowledged by this trainer yet.";
    // the trainer's rules and auto-halve's alert, silenced exactly when auto-halve is off
    const enabled = r ? [...r.enabled, PLATEAU] : [];
    const silenced = new Set(r?.silenced || []);
    if (r && !r.auto_halve_lr) silenced.add(PLATEAU);
    if (this.list.children.length !== enabled.length || [...this.list.children].some((l, i) => l.dataset.rule !== enabled[i])) {
      this.list.replaceChildren(...enabled.map((name) => {
        const label = document.createElement("label");
        const box = document.createElement("input");
        box.type = "checkbox";
        box.value = name;
        label.dataset.rule = name;
        // in words, not in a title: silenced, auto-halve neither alerts nor halves
        label.append(box, name === PLATEAU ? ` silence ${name} (= Auto-halve LR off)` : ` silence ${name}`);
        return label;
      }));
    }
    for (const label of this.list.children) {
      const box = label.querySelector("input");
      const pending = pendingKeys.has(label.dataset.rule === PLATEAU ? "auto_halve_lr" : `silence:${label.dataset.rule}`);
      box.checked = silenced.has(label.dataset.rule); // acknowledged state only
      setOff(box, !!reason || pending, { keepFocus: pending });
      label.classList.toggle("pending", pending);
    }
    // the count is of rules silenced by name: auto-halve is off by default, and a run no one
    // silenced anything on read "1 silenced" (its row says what it is)
    const named = silenced.size - (silenced.has(PLATEAU) ? 1 : 0);
    this.count.textContent = named ? `${named} silenced` : "none silenced";
  }
}
