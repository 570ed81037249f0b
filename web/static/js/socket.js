/**
 * socket.js — the viewer websocket for one run (/ws/runs/{id}).
 *
 * Owns: connecting, resuming after any drop from the last seq it has seen
 * (?after_seq=N; the server answers with a catchup frame, or past its catch-up
 * cap with a fresh snapshot, whose history the page reads again: either way a server
 * restart leaves no gap), backing off between attempts, and dropping frames it has
 * already delivered (seq <= last seq) when a catchup overlaps live frames.
 * Also: taking a socket that hears nothing for SILENCE_MS for dead (the server sends a
 * quiet viewer a `tick` every 2 s; a stalled server, stopped or asleep, sends nothing, and
 * the browser's own pings never tell the page), saying why a socket was refused before it
 * opened (the browser says only 1006: the run's REST route tells a token the server no
 * longer takes from a deleted run), and not reconnecting to a deleted run.
 * Never: touches the page, reorders frames, or swallows a frame silently (a `tick` is
 * the server's word that it is alive, not a frame).
 */

const MIN_BACKOFF_MS = 250;
const MAX_BACKOFF_MS = 5000;
/** Nothing heard for this long (three of the server's ticks): the socket is dead. */
const SILENCE_MS = 7000;
/** A socket's first message (its snapshot or catch-up) may take this long: a stalled
 * server's kernel still accepts the connection, and the handshake then hangs for minutes. */
const FIRST_MESSAGE_MS = 20000;
const WATCH_MS = 1000;
/** Between attempts while the server refuses this tab's token or cookie. */
const REFUSED_BACKOFF_MS = 30000;
const PROBE_TIMEOUT_MS = 5000;
/** The server's 1008 reasons for a run that is not there (hub.py): nothing to reconnect to. */
const GONE = /^run (deleted|not found)$/;
const REFUSED_DETAIL =
  "the server no longer accepts this tab (a new token or an expired cookie): reopen the dashboard with ?token=…";
const GONE_DETAIL = "this run was deleted; the page keeps what it showed and will not reconnect";

export class RunSocket {
  /**
   * @param {string} runId
   * @param {{onSnapshot?: Function, onFrame?: Function, onCatchup?: Function,
   *   onConnection?: Function}} handlers
   *   onSnapshot(msg) on a fresh connect; onFrame(frame) for every live or caught-up
   *   frame; onCatchup(msg) after a catch-up's frames (for its other fields);
   *   onConnection(state, detail, info) with state "open" | "lost"; for "lost",
   *   `info.retry` is false when it will not reconnect (the run was deleted: `info.gone`),
   *   and `info.refused` is true while the server refuses this tab's token or cookie.
   */
  constructor(runId, handlers) {
    this.runId = runId;
    this.handlers = handlers;
    this.lastSeq = null;
    this.ws = null;
    this.backoffMs = MIN_BACKOFF_MS;
    this.closed = false;
    this.timer = null;
    this.watch = null;
    this.watchedAt = 0;
    this.silentBy = 0;
    this.silentFor = 0;
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const base = `${scheme}://${location.host}/ws/runs/${encodeURIComponent(this.runId)}`;
    return this.lastSeq === null ? base : `${base}?after_seq=${this.lastSeq}`;
  }

  start() {
    this.closed = false;
    this.connect();
  }

  connect() {
    this.timer = null;
    const ws = new WebSocket(this.url());
    this.ws = ws;
    let handshaken = false;
    this.expect(FIRST_MESSAGE_MS);
    ws.onopen = () => { handshaken = true; };
    ws.onmessage = (ev) => {
      if (this.ws === ws) this.expect(SILENCE_MS);
      this.receive(ev.data);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.dropped(ev.code, ev.reason, handshaken ? "open" : "refused");
    };
  }

  /** The socket is dead unless something arrives within `ms`. */
  expect(ms) {
    this.silentBy = performance.now() + ms;
    this.silentFor = ms;
    if (this.watch !== null) return;
    this.watchedAt = performance.now();
    this.watch = setInterval(() => this.check(), WATCH_MS);
  }

  check() {
    const now = performance.now();
    // Late (the page was busy, asleep or a throttled background tab): messages may be
    // queued behind this timer; they get a moment before the silence counts.
    const late = now - this.watchedAt > 2 * WATCH_MS + 500;
    this.watchedAt = now;
    const ws = this.ws;
    if (!ws) return;
    if (late) {
      this.silentBy = Math.max(this.silentBy, now + WATCH_MS);
      return;
    }
    if (now < this.silentBy) return;
    this.ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close(4000, "no word from the server");
    } catch (err) {
      console.warn("layerscope: closing a silent socket", err);
    }
    this.dropped(null, `no word from the server for ${Math.round(this.silentFor / 1000)} s`, "silent");
  }

  /** `how`: "open" (closed after its handshake), "refused" (before), "silent" (given up). */
  async dropped(code, reason, how) {
    this.ws = null;
    if (this.closed) return;
    if (code === 1008 && GONE.test(reason || "")) return this.goneAway(GONE_DETAIL);
    // 1011 with a reason: the server says why it cannot serve the run (a damaged database)
    let detail = how === "silent" ? reason
      : code === 1008 ? `refused: ${reason || "not authorised"}`
        : code === 1011 && reason ? `code 1011: ${reason}` : `code ${code}`;
    let wait = this.backoffMs;
    let refused = false;
    this.backoffMs = Math.min(this.backoffMs * 2, MAX_BACKOFF_MS);
    if (how === "refused") {
      // Refused before it opened: a 403 for the token or cookie, or a server not there.
      // The browser tells the page nothing more than 1006; the run's REST route does.
      const status = await this.probe();
      if (this.closed || this.ws || this.timer !== null) return;
      if (status === 404) return this.goneAway(GONE_DETAIL);
      if (status === 401 || status === 403) {
        detail = REFUSED_DETAIL;
        wait = REFUSED_BACKOFF_MS;
        refused = true;
      }
    }
    this.handlers.onConnection?.("lost", detail, { retry: true, refused });
    this.timer = setTimeout(() => this.connect(), wait);
  }

  /** The HTTP status of the run's detail, or null when the server does not answer. */
  async probe() {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), PROBE_TIMEOUT_MS);
    try {
      const res = await fetch(`/api/runs/${encodeURIComponent(this.runId)}`, {
        credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" }, signal: abort.signal,
      });
      return res.status;
    } catch {
      return null; // the server is down or stalled: the usual backoff
    } finally {
      clearTimeout(timer);
    }
  }

  goneAway(detail) {
    this.stopWatching();
    this.handlers.onConnection?.("lost", detail, { retry: false, gone: true });
  }

  stopWatching() {
    clearInterval(this.watch);
    this.watch = null;
  }

  receive(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      console.warn("layerscope: unparsable frame dropped", err);
      return;
    }
    if (msg.type === "tick") return; // the server is alive (expect() has noted it)
    if (msg.type === "snapshot") {
      this.opened();
      this.lastSeq = Math.max(this.lastSeq ?? 0, msg.last_seq ?? 0);
      this.handlers.onSnapshot?.(msg);
    } else if (msg.type === "catchup") {
      this.opened();
      for (const frame of msg.frames || []) this.deliver(frame);
      this.handlers.onCatchup?.(msg); // then the catch-up's own fields (the run's pace)
    } else {
      this.deliver(msg);
    }
  }

  opened() {
    this.backoffMs = MIN_BACKOFF_MS;
    this.handlers.onConnection?.("open", "");
  }

  deliver(frame) {
    if (typeof frame.seq === "number") {
      if (this.lastSeq !== null && frame.seq <= this.lastSeq) return;
      this.lastSeq = frame.seq;
    }
    this.handlers.onFrame?.(frame);
  }

  /** Sends a JSON message; false when the socket is not open (the caller says so). */
  send(message) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  get isOpen() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.stopWatching();
    this.ws?.close();
  }
}
