/**
 * notify.js — the page's two ways to tell a person something: the banner (a
 * lasting condition, e.g. the connection is lost) and toasts (one-off results).
 * Info toasts go after a few seconds, read out politely; an error toast is an alert and
 * stays until its Dismiss button is pressed (one that went after 5 s could be missed, and
 * was read out politely only). The same error again while it shows adds no second one.
 * Never: blocks the page (no alert()), or logs to the console instead.
 */

const conditions = new Map();
/** The most error toasts shown at once (the oldest goes): they stay until dismissed. */
const MAX_ERRORS = 3;

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
    // role=alert: a text set again, even unchanged, is read out again; set on a change only
    const text = all.map((c) => c.message).join(" · ");
    if (banner.textContent !== text) banner.textContent = text;
    banner.className = `banner ${top.severity === "error" ? "" : "warn"}`;
  }
}

export function toast(message, kind = "info", ms = 5000) {
  const box = document.getElementById(kind === "error" ? "toasts-errors" : "toasts-info")
    || document.getElementById("toasts");
  if (!box) return;
  if (kind === "error") {
    for (const t of box.querySelectorAll(".toast.error")) {
      if (t.dataset.message === message) return; // still showing: not piled up (a failing poll)
    }
  }
  const el = document.createElement("div");
  el.className = `toast ${kind}`;
  el.dataset.message = message;
  const text = document.createElement("span");
  text.textContent = message;
  el.append(text);
  if (kind !== "error") {
    box.append(el);
    setTimeout(() => el.remove(), ms);
    return;
  }
  const before = document.activeElement;
  const close = document.createElement("button");
  close.type = "button";
  close.className = "dismiss";
  close.textContent = "×";
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", () => {
    // the focus goes to the next error's Dismiss, else back to where it was before: left
    // on <body>, the page's next Space would pause or resume the run
    const next = el.nextElementSibling?.querySelector("button.dismiss")
      || el.previousElementSibling?.querySelector("button.dismiss");
    const had = document.activeElement === close;
    el.remove();
    if (had) (next || returnTo(before))?.focus();
  });
  el.append(" ", close);
  box.append(el);
  while (box.querySelectorAll(".toast.error").length > MAX_ERRORS) box.querySelector(".toast.error").remove();
}

/** Where the focus goes back to after a toast: the element that had it, if still there. */
function returnTo(element) {
  return element && element !== document.body && element.isConnected ? element : null;
}
