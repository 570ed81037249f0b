/**
 * api.js — the REST side of http_api.md, as the pages call it.
 *
 * Owns: same-origin JSON requests (the viewer-token cookie goes along), turning a
 * non-2xx answer into an ApiError that carries the server's `detail`, a paged list's
 * X-Total-Count, and reading a run's nested `config` as dotted keys.
 * Never: retries silently or hides a failed request from the caller.
 */

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

async function request(method, url, body, withHeaders = false) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(url, init);
  if (res.status === 204) return withHeaders ? { data: null, headers: res.headers } : null;
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!res.ok) throw new ApiError(res.status, data && data.detail !== undefined ? data.detail : data);
  return withHeaders ? { data, headers: res.headers } : data;
}

export const getJSON = (url) => request("GET", url);
export const postJSON = (url, body) => request("POST", url, body);
export const del = (url) => request("DELETE", url);

/** A page of a list route: {items, total}, total from its X-Total-Count header (else the
 * items' count). */
export async function getPage(url) {
  const { data, headers } = await request("GET", url, undefined, true);
  const total = Number.parseInt(headers.get("X-Total-Count") ?? "", 10);
  return { items: data, total: Number.isFinite(total) ? total : data.length };
}

/** Builds `/api/runs/{id}/{path}?k=v` with only the defined parameters. */
export function runUrl(runId, path = "", params = {}) {
  let url = `/api/runs/${encodeURIComponent(runId)}${path ? "/" + path : ""}`;
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `${url}?${s}` : url;
}

/** A run's nested config as {"model.depth": 4, ...}; arrays and scalars are leaves. */
export function flatConfig(config, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(config || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v && typeof v === "object" && !Array.isArray(v)) flatConfig(v, key, out);
    else out[key] = v;
  }
  return out;
}
