/**
 * notify.js — the page's two ways to tell a person something: the banner (a
 * lasting condition, e.g. the connection is lost) and toasts (one-off results).
 * Never: blocks the page (no alert()), or logs to the console instead.
 */

const conditions = new Map();

/** Shows or clears one named condition; the banner shows the most severe. */
export function setCondition(key, message, severity = "error") {
  if (message) conditions.set(key, { message, severity });
  else conditions.delete(key);
  const banner = document.getElementById("banner");
  if (!banner) return;
  const all = [...conditions.values()];
  const top = all.find((c) => c.severity === "error") || all[0];
  banner.hidden = !top;
  if (top) {
    banner.textContent = all.map((c) => c.message).join(" · ");
    banner.className = `banner ${top.severity === "error" ? "" : "warn"}`;
  }
}

export function toast(message, kind = "info", ms = 5000) {
  const box = document.getElementById("toasts");
  if (!box) return;
  const el = document.createElement("div");
  el.className = `toast ${kind}`;
  el.textContent = message;
  box.append(el);
  setTimeout(() => el.remove(), ms);
}
