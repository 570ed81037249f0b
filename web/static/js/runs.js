/**
 * runs.js — the runs list (/): status, name, key config, last loss, sparkline;
 * search; select runs to compare; delete with confirmation; the New-run form; the
 * Init-lab form (POST /api/labs/init, then the lab's comparison view); the overfit
 * sanity check's PASS/FAIL badge next to a run's name.
 *
 * Owns: polling GET /api/runs for the newest PAGE_SIZE runs (more on "Show more"), or
 * with the search box's words those matching them (the server's q=, over each run's
 * whole stored config); rows are updated in place, and a selection outlives its row
 * leaving the list (another search), so runs from two searches can be compared. Also
 * the inline-SVG sparklines and the New-run dialog's submit cycle (POST /api/runs; 422
 * errors shown on the fields; a started run opens its page).
 * Never: polls the whole list (hundreds of runs made every poll a large answer), deletes
 * without a confirmation, or hides the server's reason for a refusal.
 */

import { ApiError, del, flatConfig, getJSON, getPage, postJSON } from "./api.js";
import { formatNumber } from "./charts.js";
import { ExperimentForm } from "./experiment_form.js";
import { setCondition, toast } from "./notify.js";

const POLL_MS = 2000;
const PAGE_SIZE = 50; // runs per poll, and per "Show more"
const MAX_LISTED = 1000; // GET /api/runs's largest limit (api.MAX_RUNS_PAGE)
const SEARCH_DELAY_MS = 250; // typing pauses this long before the search is sent
// model.init_std is listed by the server only for init "normal" (server/queries.py list_config)
const KEY_CONFIG = ["model.arch", "model.depth", "model.width", "model.activation", "model.init",
  "model.init_std", "model.batch_norm", "data.dataset", "solver.optimizer", "solver.lr", "solver.batch_size"];
const $ = (id) => document.getElementById(id);

const rows = new Map(); // run id -> {tr, run}
const selected = new Set();
let runs = [];
/** What the list asks for: the search's text (q=) and how many runs (limit=). */
const wanted = { q: "", limit: PAGE_SIZE };
let total = 0; // runs there are (that match wanted.q): X-Total-Count
let sent = 0; // requests sent, and the latest one whose answer is shown
let shown = 0;
let searchTimer = null;
const form = new ExperimentForm($("new-run-fields"), $("new-run-error"));
let schemaLoaded = false;

function keyConfig(config) {
  const flat = flatConfig(config);
  let keys = KEY_CONFIG.filter((k) => k in flat);
  if (!keys.length) keys = Object.keys(flat).filter((k) => flat[k] !== null && typeof flat[k] !== "object").slice(0, 6);
  return keys.map((k) => {
    const span = document.createElement("span");
    const b = document.createElement("b");
    span.className = "kv";
    b.textContent = String(flat[k]);
    span.append(`${k.split(".").pop()} `, b);
    return span;
  });
}

function sparkline(values) {
  const pts = (values || []).map((v, i) => [i, v]).filter(([, v]) => v !== null && Number.isFinite(v));
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", "120");
  svg.setAttribute("height", "26");
  // an image with a name in words (it was an unnamed image)
  svg.setAttribute("role", "img");
  const ys = pts.map(([, v]) => v);
  svg.setAttribute("aria-label", pts.length < 2 ? "Loss curve: not enough points yet"
    : `Loss curve: from ${formatNumber(ys[0])} to ${formatNumber(ys[ys.length - 1])}, lowest ${formatNumber(Math.min(...ys))}`);
  if (pts.length < 2) return svg;
  const lo = Math.min(...ys);
  const span = Math.max(...ys) - lo || 1;
  const n = (values.length - 1) || 1;
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts.map(([i, v]) => `${((i / n) * 118 + 1).toFixed(1)},${(24 - ((v - lo) / span) * 22).toFixed(1)}`).join(" "));
  svg.append(line);
  return svg;
}

function when(t) {
  const ms = typeof t === "number" ? t * (t < 1e11 ? 1000 : 1) : Date.parse(t);
  if (!Number.isFinite(ms)) return "";
  const s = (Date.now() - ms) / 1000;
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

function cell(tr, i) {
  return tr.children[i];
}

function makeRow(run) {
  const tr = document.createElement("tr");
  tr.dataset.runId = run.id;
  // The cells' classes and data-labels lay a row out as a card in a phone-wide window
  // (app.css), where the table's columns ran off into a hidden sideways scroll.
  tr.innerHTML = '<td class="select"><input type="checkbox"></td><td class="status"><span class="pill"></span></td>'
    + '<td class="name"><a></a></td><td class="config"></td><td class="num step" data-label="step"></td>'
    + '<td class="num loss" data-label="loss"></td><td class="num val" data-label="val"></td>'
    + '<td class="spark"></td><td class="muted started"></td><td class="actions"><button type="button" class="danger">Delete</button></td>';
  const box = tr.querySelector("input");
  box.setAttribute("aria-label", `Select ${run.name || run.id}`);
  box.checked = selected.has(run.id); // back in the list (another search), still selected
  box.addEventListener("change", () => {
    if (box.checked) selected.add(run.id); else selected.delete(run.id);
    updateCompare();
  });
  tr.querySelector("a").href = `/runs/${encodeURIComponent(run.id)}`;
  tr.querySelector("button").addEventListener("click", () => confirmDelete(rows.get(run.id).run));
  return tr;
}

/** Sets a node's text only when it differs: the list is polled every 2 s. */
function setText(node, text) {
  const t = String(text);
  if (node.textContent !== t) node.textContent = t;
}

/** run id -> lab id, for runs launched by an init lab (a link to its comparison view). */
let labOf = new Map();
/** Runs whose lab (or none) labOf already says: GET /api/labs reads every lab and each of
 * its runs' detail, so it is asked again only for a run not seen before, or one still
 * starting (a lab's record is written once its five runs are launched). */
const labKnown = new Set();

async function loadLabs(listed) {
  if (listed.every((run) => labKnown.has(run.id))) return;
  const labs = await getJSON("/api/labs").catch(() => null);
  if (labs === null) return; // asked again at the next poll
  labOf = new Map(labs.flatMap((lab) => lab.runs.map((r) => [r.id, lab.id])));
  for (const run of listed) if (run.status !== "starting") labKnown.add(run.id);
}

/** run id -> sanity event data, for runs with an overfit check (fetched until it arrives). */
const sanity = new Map();
/** Runs that ended without one: not asked again at every poll. */
const noSanity = new Set();
const ENDED = new Set(["finished", "failed", "stopped"]); // not lost: its trainer may come back and resend

async function loadSanity(run) {
  if (run.config?.overfit == null || sanity.has(run.id) || noSanity.has(run.id)) return;
  const ended = ENDED.has(run.status); // read before the events: a run ends after its check
  const events = await getJSON(`/api/runs/${encodeURIComponent(run.id)}/events?kind=sanity&limit=1`).catch(() => null);
  if (events === null) return;
  if (!events.length) { if (ended) noSanity.add(run.id); return; }
  sanity.set(run.id, events[events.length - 1].data);
  const entry = rows.get(run.id);
  if (entry) fillRow(entry.tr, entry.run);
}

function sanityBadge(run) {
  const d = sanity.get(run.id);
  if (!d) return null;
  const b = document.createElement("span");
  b.className = `badge ${d.passed ? "pass" : "fail"} sanity`;
  b.textContent = d.passed ? "PASS" : "FAIL";
  b.title = d.message || "overfit sanity check";
  return b;
}

/** What each row's rebuilt cells show now (JSON): rebuilt only when it changes. */
const drawnOf = new WeakMap();

/**
 * Fills a row from its run, every poll: a cell changes only when what it shows changed, and
 * the name cell's links are kept, so a link with the keyboard focus keeps it (the cell was
 * rebuilt every 2 s and the focus fell to the page).
 */
function fillRow(tr, run) {
  const drawn = drawnOf.get(tr) ?? {};
  drawnOf.set(tr, drawn);
  const pill = cell(tr, 1).firstChild;
  setText(pill, run.status);
  pill.className = `pill ${run.status}`;
  const link = tr.querySelector("a");
  setText(link, run.name || run.id);
  const d = sanity.get(run.id);
  const extras = JSON.stringify([d ? [d.passed, d.message] : null, labOf.get(run.id) ?? null]);
  if (drawn.extras !== extras) {
    drawn.extras = extras;
    const badge = sanityBadge(run);
    const extra = badge ? [" ", badge] : [];
    if (labOf.has(run.id)) {
      const lab = document.createElement("a");
      lab.className = "lab-link muted";
      lab.href = `/labs/${encodeURIComponent(labOf.get(run.id))}`;
      lab.textContent = "lab view";
      extra.push(" ", lab);
    }
    link.parentElement.replaceChildren(link, ...extra);
  }
  const config = JSON.stringify(run.config ?? null);
  if (drawn.config !== config) {
    drawn.config = config;
    cell(tr, 3).replaceChildren(...keyConfig(run.config));
  }
  setText(cell(tr, 4), run.last_step ?? "—");
  setText(cell(tr, 5), formatNumber(run.last?.loss));
  setText(cell(tr, 6), formatNumber(run.last?.val_loss));
  const spark = JSON.stringify(run.sparkline ?? null);
  if (drawn.spark !== spark) {
    drawn.spark = spark;
    cell(tr, 7).replaceChildren(sparkline(run.sparkline));
  }
  setText(cell(tr, 8), when(run.created_at));
  const del = tr.querySelector("button");
  del.setAttribute("aria-label", `Delete ${run.name || run.id}`);
  del.disabled = !!run.trainer_connected;
  del.title = run.trainer_connected ? "Stop the run first: a trainer is connected" : "Delete this run and its data";
}

function render() {
  const body = document.querySelector("#runs tbody");
  const seen = new Set();
  const ordered = [];
  for (const run of runs) {
    seen.add(run.id);
    let entry = rows.get(run.id);
    if (!entry) {
      entry = { tr: makeRow(run), run };
      rows.set(run.id, entry);
    }
    entry.run = run;
    fillRow(entry.tr, run);
    ordered.push(entry.tr);
  }
  // A run off the list (another search, or past the page) keeps its selection; one the
  // whole list lacks has been deleted.
  for (const [id, entry] of rows) {
    if (!seen.has(id)) { entry.tr.remove(); rows.delete(id); }
  }
  if (!wanted.q && runs.length === total) for (const id of selected) if (!seen.has(id)) selected.delete(id);
  // A row moved (a newer run listed above it) is taken out and put back, which blurs what
  // has the focus in it: the focus is put back.
  const focused = body.contains(document.activeElement) ? document.activeElement : null;
  ordered.forEach((tr, i) => { if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null); });
  if (focused && focused.isConnected && document.activeElement !== focused) focused.focus({ preventScroll: true });
  $("empty").hidden = total > 0 || !!wanted.q;
  renderFooter();
  updateCompare();
}

function renderFooter() {
  const count = $("runs-count");
  const more = $("more");
  const rest = Math.max(0, Math.min(total, MAX_LISTED) - runs.length);
  let text;
  if (wanted.q) {
    text = total
      ? `${runs.length < total ? `The newest ${runs.length} of ` : ""}${total} ${total === 1 ? "run matches" : "runs match"} “${wanted.q}”`
      : `No run matches “${wanted.q}” (its name, id, status or config)`;
  } else {
    text = total ? `${runs.length < total ? `The newest ${runs.length} of ` : ""}${total} ${total === 1 ? "run" : "runs"}` : "";
  }
  // a status line: set only when it changes, so a screen reader hears it once, not every poll
  if (count.textContent !== text) count.textContent = text;
  count.hidden = !text;
  more.hidden = rest === 0;
  more.textContent = `Show ${Math.min(PAGE_SIZE, rest)} more`;
}

// /compare shows at most this many runs, one colour each (server/pages.py MAX_COMPARE_RUNS)
const MAX_COMPARE = 10;

function updateCompare() {
  const button = $("compare");
  const over = selected.size > MAX_COMPARE;
  button.disabled = selected.size < 2 || over;
  button.textContent = over
    ? `Compare selected (${selected.size}; at most ${MAX_COMPARE})`
    : selected.size ? `Compare selected (${selected.size})` : "Compare selected";
  // "Select all" is about the rows listed (the search's): ticked when every one is selected
  const picked = runs.filter((run) => selected.has(run.id)).length;
  const all = $("select-all");
  all.checked = runs.length > 0 && picked === runs.length;
  all.indeterminate = picked > 0 && picked < runs.length;
}

async function refresh() {
  const ask = { ...wanted };
  const ticket = ++sent;
  const params = new URLSearchParams({ limit: String(ask.limit) });
  if (ask.q) params.set("q", ask.q);
  try {
    const page = await getPage(`/api/runs?${params}`);
    await loadLabs(page.items);
    // An answer older than the one shown, or to a search since changed, is dropped.
    if (ticket < shown || ask.q !== wanted.q || ask.limit !== wanted.limit) return;
    shown = ticket;
    runs = page.items;
    total = page.total;
    $("search-error").hidden = true;
    setCondition("poll", null); // a failed poll's banner goes once the list loads again
    render();
    for (const run of runs) loadSanity(run);
    document.body.dataset.ready = "1";
  } catch (e) {
    if (ask.q !== wanted.q) return;
    if (e instanceof ApiError && e.status === 422 && ask.q) {
      // the search itself is refused (too many words): said beside the box, not every poll
      const d = e.detail;
      $("search-error").textContent = `Search not run: ${Array.isArray(d) ? d.map((x) => x.msg).join("; ") : d}`;
      $("search-error").hidden = false;
      document.body.dataset.ready = "1";
      return;
    }
    // a lasting condition, not a toast: an error toast stays until dismissed, so one said
    // the list could not load long after it had loaded again
    setCondition("poll", `Could not load runs: ${e.message}; trying again`);
  }
}

/** The search box's words go to the server (q=) once typing pauses; the list starts
 * again from its newest page. */
function search(now = false) {
  clearTimeout(searchTimer);
  const go = () => {
    const q = $("filter").value.trim();
    if (q === wanted.q) return;
    wanted.q = q;
    wanted.limit = PAGE_SIZE;
    refresh();
  };
  if (now) go(); else searchTimer = setTimeout(go, SEARCH_DELAY_MS);
}

function confirmDelete(run) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = `Delete run “${run.name || run.id}” and everything recorded for it? This cannot be undone.`;
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    try {
      await del(`/api/runs/${encodeURIComponent(run.id)}`);
      selected.delete(run.id);
      toast(`Deleted ${run.name || run.id}`);
    } catch (e) {
      toast(`Not deleted: ${typeof e.detail === "string" ? e.detail : e.message}`, "error");
    }
    refresh();
  };
  dialog.showModal();
}

async function openNewRun() {
  if (!schemaLoaded) {
    try {
      form.build(await getJSON("/api/experiment_schema"));
      schemaLoaded = true;
    } catch (e) {
      toast(`Could not load the experiment schema: ${e.message}`, "error");
      return;
    }
  }
  form.clearErrors();
  $("new-run-dialog").showModal();
  // on its first field: showModal focused the fields' scroll container
  form.firstInput()?.focus();
}

async function submitNewRun(ev) {
  ev.preventDefault();
  const missing = form.missing();
  if (missing.length) { form.showErrors(missing); return; }
  const submit = $("new-run-submit");
  submit.disabled = true;
  submit.textContent = "Starting…";
  try {
    const created = await postJSON("/api/runs", form.value());
    // The run just started, on its own page (stored before its id is answered): it
    // stayed on the list, where the person had to find it.
    location.href = `/runs/${encodeURIComponent(created.id)}`; // the button stays disabled meanwhile
  } catch (e) {
    if (e instanceof ApiError && e.status === 422) form.showErrors(e.detail);
    else form.showErrors([{ loc: [], msg: e.message }]);
    submit.disabled = false;
    submit.textContent = "Start run";
  }
}

async function submitLab(ev) {
  ev.preventDefault();
  const submit = $("lab-submit");
  const error = $("lab-error");
  const steps = $("lab-steps");
  error.hidden = true;
  steps.removeAttribute("aria-invalid");
  if (steps.value.trim() === "") {
    // Number("") is 0: the server said "must be >= 1, got 0" of a field left empty
    error.textContent = "Steps: required (a whole number of training steps, at least 1)";
    error.hidden = false;
    steps.setAttribute("aria-invalid", "true"); // the error is its description (aria-describedby)
    steps.focus();
    return;
  }
  submit.disabled = true;
  try {
    const lab = await postJSON("/api/labs/init", {
      activation: $("lab-activation").value,
      batch_norm: $("lab-batch-norm").checked,
      steps: Number($("lab-steps").value),
    });
    location.href = lab.url;
  } catch (e) {
    const d = e instanceof ApiError ? e.detail : e.message;
    error.textContent = Array.isArray(d) ? d.map((x) => `${x.loc.join(".")}: ${x.msg}`).join("; ") : String(d);
    error.hidden = false;
    if (Array.isArray(d) && d.some((x) => (x.loc || []).includes("steps"))) steps.setAttribute("aria-invalid", "true");
  } finally {
    submit.disabled = false;
  }
}

$("init-lab").addEventListener("click", () => {
  $("lab-error").hidden = true;
  $("lab-steps").removeAttribute("aria-invalid");
  $("lab-dialog").showModal();
});
$("lab-cancel").addEventListener("click", () => $("lab-dialog").close());
$("lab-form").addEventListener("submit", submitLab);
$("filter").addEventListener("input", () => search());
$("filter").addEventListener("keydown", (ev) => { if (ev.key === "Enter") search(true); });
$("more").addEventListener("click", async () => {
  const before = runs.length;
  wanted.limit = Math.min(wanted.limit + PAGE_SIZE, MAX_LISTED);
  await refresh();
  // The last "more" hides itself: the keyboard goes on at the first run it added.
  if ($("more").hidden && document.activeElement === document.body) {
    document.querySelectorAll("#runs tbody tr")[before]?.querySelector("input")?.focus();
  }
});
$("compare").addEventListener("click", () => {
  // one ids= per run: an id may hold a comma
  location.href = `/compare?${[...selected].map((id) => `ids=${encodeURIComponent(id)}`).join("&")}`;
});
$("select-all").addEventListener("change", (ev) => {
  // Selects or clears the rows listed; runs off the list (another search) keep theirs.
  for (const run of runs) {
    const box = rows.get(run.id).tr.querySelector("input");
    box.checked = ev.target.checked;
    if (box.checked) selected.add(run.id); else selected.delete(run.id);
  }
  updateCompare();
});
$("new-run").addEventListener("click", openNewRun);
$("new-run-cancel").addEventListener("click", () => $("new-run-dialog").close());
$("new-run-form").addEventListener("submit", submitNewRun);
// Back from the started run's page, restored as it was left: not mid-submit.
window.addEventListener("pageshow", (ev) => {
  if (!ev.persisted) return;
  $("new-run-dialog").close();
  $("new-run-submit").disabled = false;
  $("new-run-submit").textContent = "Start run";
});

refresh();
setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
