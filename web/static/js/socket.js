/**
 * socket.js — the viewer websocket for one run (/ws/runs/{id}).
 *
 * Owns: connecting, resuming after any drop from the last seq it has seen
 * (?after_seq=N; the server answers with a catchup frame, or past its catch-up
 * cap with a fresh snapshot, whose history the page reads again: either way a server
 * restart leaves no gap), backing off between attempts, and dropping frames it has
 * already delivered (seq <= last seq) when a catchup overlaps live frames.
 * Never: touches the page, reorders frames, or swallows a frame silently.
 */

const MIN_BACKOFF_MS = 250;
const MAX_BACKOFF_MS = 5000;

export class RunSocket {
  /**
   * @param {string} runId
   * @param {{onSnapshot?: Function, onFrame?: Function, onConnection?: Function}} handlers
   *   onSnapshot(msg) on a fresh connect; onFrame(frame) for every live or caught-up
   *   frame; onConnection(state, detail) with state "open" | "lost".
   */
  constructor(runId, handlers) {
    this.runId = runId;
    this.handlers = handlers;
    this.lastSeq = null;
    this.ws = null;
    this.backoffMs = MIN_BACKOFF_MS;
    this.closed = false;
    this.timer = null;
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
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.onmessage = (ev) => this.receive(ev.data);
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.closed) return;
      const detail = ev.code === 1008 ? `refused: ${ev.reason || "not authorised"}` : `code ${ev.code}`;
      this.handlers.onConnection?.("lost", detail);
      this.timer = setTimeout(() => this.connect(), this.backoffMs);
      this.backoffMs = Math.min(this.backoffMs * 2, MAX_BACKOFF_MS);
    };
  }

  receive(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (err) {
      console.warn("layerscope: unparsable frame dropped", err);
      return;
    }
    if (msg.type === "snapshot") {
      this.opened();
      this.lastSeq = Math.max(this.lastSeq ?? 0, msg.last_seq ?? 0);
      this.handlers.onSnapshot?.(msg);
    } else if (msg.type === "catchup") {
      this.opened();
      for (const frame of msg.frames || []) this.deliver(frame);
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
    this.ws?.close();
  }
}
