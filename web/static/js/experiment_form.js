/**
 * experiment_form.js — the New-run form, generated from EXPERIMENT_SCHEMA
 * (GET /api/experiment_schema, the trainer's own list of knobs).
 *
 * Owns: one input per field (sections as fieldsets, `when` fields hidden unless
 * they matter), collecting only what the person changed from the defaults (so
 * "epochs" can decide when "steps" is left alone), and mapping the server's 422
 * {"detail": [{loc, msg}]} onto the fields as inline errors.
 * Never: validates on its own; the server's validate_experiment is the one judge.
 */

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children);
  return node;
}

const shown = (v) => (v === null || v === undefined ? "" : String(v));

export class ExperimentForm {
  constructor(container, errorBox) {
    this.container = container;
    this.errorBox = errorBox;
    this.fields = new Map(); // "section.key" -> {spec, input, wrap, error, path}
  }

  /** The first field a person fills in (the dialog opens on it). */
  firstInput() {
    for (const f of this.fields.values()) if (!f.outer.hidden) return f.input;
    return null;
  }

  build(schema) {
    this.container.replaceChildren();
    this.fields.clear();
    const top = el("fieldset", { class: "section" }, el("legend", { text: "Run" }));
    const wrapTop = el("div", { class: "fields" });
    top.append(wrapTop);
    this.container.append(top);
    for (const [key, spec] of Object.entries(schema)) {
      if (spec.type === "section") {
        const fs = el("fieldset", { class: "section", title: spec.help || "" }, el("legend", { text: spec.label || key }));
        const inner = el("div", { class: "fields" });
        fs.append(inner);
        for (const [k, s] of Object.entries(spec.fields)) inner.append(this.field([key, k], s));
        this.container.append(fs);
      } else {
        wrapTop.append(this.field([key], spec));
      }
    }
    for (const f of this.fields.values()) f.input.addEventListener("change", () => this.applyWhen());
    this.applyWhen();
  }

  field(path, spec) {
    const id = `f-${path.join("-")}`;
    let input;
    if (spec.type === "bool") {
      input = el("input", { type: "checkbox", id, name: path.join(".") });
      input.checked = !!spec.default;
    } else if (spec.type === "choice") {
      input = el("select", { id, name: path.join(".") }, ...spec.choices.map((c) => el("option", { value: c, text: c })));
      input.value = shown(spec.default);
    } else {
      const numeric = spec.type === "int" || spec.type === "float";
      const hints = [];
      if (spec.nullable) hints.push("empty: none");
      if (spec.aliases) hints.push(...Object.keys(spec.aliases).map((a) => `or "${a}"`));
      input = el("input", { type: "text", id, name: path.join("."), inputmode: numeric ? "decimal" : null,
        placeholder: hints.join(", ") || null, autocomplete: "off", spellcheck: "false" });
      input.value = shown(spec.default);
    }
    const range = "min" in spec ? ` (${spec.min} – ${spec.max ?? "∞"})` : "";
    const label = el("label", { for: id, text: `${spec.label || path[path.length - 1]}${range}` });
    const error = el("p", { class: "error", role: "alert", id: `${id}-error`, hidden: true });
    const hint = el("span", { class: "hint", id: `${id}-hint`, text: spec.help || "" });
    // the field's error and hint are read with it (they sat beside it, tied to nothing)
    input.setAttribute("aria-describedby", spec.help ? `${error.id} ${hint.id}` : error.id);
    const wrap = spec.type === "bool"
      ? el("div", { class: "field checkbox", "data-field": path.join(".") }, input, label)
      : el("div", { class: "field", "data-field": path.join(".") }, label, input);
    const outer = el("div", { class: "field-wrap" }, wrap, error, hint);
    this.fields.set(path.join("."), { spec, input, wrap, outer, error, path });
    return outer;
  }

  /** Hides fields whose `when` condition (a sibling's value) does not hold. */
  applyWhen() {
    for (const f of this.fields.values()) {
      const when = f.spec.when;
      if (!when) continue;
      const ok = Object.entries(when).every(([sibling, values]) => {
        const other = this.fields.get([...f.path.slice(0, -1), sibling].join("."));
        return !other || values.includes(other.input.value);
      });
      f.outer.hidden = !ok;
    }
  }

  /** The config to POST: only fields changed from their defaults, typed as the schema says. */
  value() {
    const out = {};
    for (const f of this.fields.values()) {
      if (f.outer.hidden) continue;
      const { spec, input, path } = f;
      let v;
      if (spec.type === "bool") {
        if (input.checked === !!spec.default) continue;
        v = input.checked;
      } else {
        const raw = input.value.trim();
        if (raw === shown(spec.default)) continue;
        if (raw === "") {
          if (!spec.nullable) continue;
          v = null;
        } else if ((spec.type === "int" || spec.type === "float") && !(spec.aliases && raw in spec.aliases)) {
          const n = Number(raw);
          v = Number.isFinite(n) ? n : raw; // the server names the problem with a non-number
        } else v = raw;
      }
      let node = out;
      for (const p of path.slice(0, -1)) node = node[p] ??= {};
      node[path[path.length - 1]] = v;
    }
    return out;
  }

  /**
   * Fields left empty that take no empty value (not nullable, a default of their own): as
   * [{loc, msg}] errors, the 422's shape. value() would leave them out, and the run would
   * silently start with the default.
   */
  missing() {
    const out = [];
    for (const f of this.fields.values()) {
      if (f.outer.hidden || f.spec.type === "bool" || f.spec.nullable) continue;
      const raw = f.input.value.trim();
      if (raw !== "" || raw === shown(f.spec.default)) continue;
      out.push({ loc: f.path, msg: `required: give a value (the default is ${shown(f.spec.default)})` });
    }
    return out;
  }

  clearErrors() {
    for (const f of this.fields.values()) {
      f.error.hidden = true;
      f.error.textContent = "";
      f.wrap.classList.remove("invalid");
      f.input.removeAttribute("aria-invalid");
    }
    this.errorBox.hidden = true;
    this.errorBox.textContent = "";
  }

  /** detail: the 422 body's list [{loc, msg}] (loc may start with "body"). */
  showErrors(detail) {
    this.clearErrors();
    const unmatched = [];
    const list = Array.isArray(detail) ? detail : [{ loc: [], msg: String(detail) }];
    let first = null;
    for (const e of list) {
      const loc = (e.loc || []).map(String).filter((p) => p !== "body");
      let f = null;
      for (let i = 0; i < loc.length && !f; i++) f = this.fields.get(loc.slice(i).join("."));
      if (!f) { unmatched.push(`${loc.join(".") || "config"}: ${e.msg}`); continue; }
      f.error.hidden = false;
      f.error.textContent = f.error.textContent ? `${f.error.textContent}; ${e.msg}` : e.msg;
      f.wrap.classList.add("invalid");
      f.input.setAttribute("aria-invalid", "true");
      f.outer.hidden = false;
      first ??= f;
    }
    if (unmatched.length) {
      this.errorBox.hidden = false;
      this.errorBox.textContent = unmatched.join(" · ");
    }
    if (!first) return;
    // focus() alone scrolls only the input into view: a field already showing at the
    // bottom of the form kept its message (opened below it) just out of view.
    first.input.focus({ preventScroll: true });
    first.error.scrollIntoView({ block: "nearest" });
    first.wrap.scrollIntoView({ block: "nearest" });
  }
}
