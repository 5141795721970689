// The console's only way to the server: the public v1 API with the key from session storage.
// The key is sent as `Authorization: Bearer`, never in a URL (so it stays out of logs and history).

const KEY_NAME = "cineweave.key";

export function getKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_NAME, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_NAME);
}

/** An error answer of the API, from its native shape {"error": {"code", "message", "details"}}. */
export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = getKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const err = body && typeof body === "object" ? body.error : null;
  if (err && typeof err === "object") {
    return new ApiError(response.status, err.code || "error", err.message || response.statusText,
      err.details || {});
  }
  // FastAPI's own shape ({"detail": ...}) or no body at all: still a readable message
  const detail = body && body.detail;
  const message = typeof detail === "string" ? detail : `${response.status} ${response.statusText || "error"}`;
  return new ApiError(response.status, "http_" + response.status, message, {});
}

/**
 * Call the API: `path` like "/v1/jobs"; `json` sends a JSON body, `form` a FormData (multipart).
 * Answers the parsed JSON (null for 204); throws ApiError on an error status or a network failure.
 */
export async function api(path, { method = "GET", json, form, signal, headers } = {}) {
  const init = { method, headers: authHeaders(headers || {}), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    if (e && e.name === "AbortError") throw e;
    throw new ApiError(0, "network_error", "The server could not be reached. Is it running?", {});
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** Parse one SSE block ("event: x\ndata: ...\nid: n") into {event, data, id}. */
function parseBlock(block) {
  let event = "message";
  let id = null;
  const data = [];
  for (const raw of block.split("\n")) {
    const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  if (!data.length) return null;
  const text = data.join("\n");
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = text;
  }
  return { event, data: parsed, id };
}

/**
 * Follow a job's server-sent events (GET /v1/jobs/{id}/events) with fetch, since EventSource
 * cannot send an Authorization header. `handlers` maps event names (status, start, progress,
 * preview, output, queue, completed, ...) to functions of (data, id); `onError(err)` and
 * `onEnd()` are optional. The stream reconnects with Last-Event-ID (at most `maxRetries` times in a
 * row without an event: an attempt that delivered any resets the count) until a `completed`
 * event. Answers close().
 */
export function streamEvents(jobId, handlers = {}, { maxRetries = 5 } = {}) {
  const controller = new AbortController();
  let lastId = null;
  let closed = false;
  let done = false;
  let dispatched = 0; // events handed to the handlers so far (a stream that delivered any was healthy)

  const dispatch = (msg) => {
    dispatched += 1;
    if (msg.id) lastId = msg.id;
    const handler = handlers[msg.event];
    if (handler) {
      try {
        handler(msg.data, msg.id);
      } catch (e) {
        console.error("event handler failed", msg.event, e);
      }
    }
    if (msg.event === "completed") done = true;
  };

  const once = async () => {
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastId) headers["Last-Event-ID"] = lastId;
    const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`,
      { headers, signal: controller.signal });
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) !== -1) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const msg = parseBlock(block);
        if (msg) dispatch(msg);
        if (done) {
          controller.abort();
          return;
        }
      }
    }
  };

  (async () => {
    let failures = 0;
    while (!closed && !done && failures <= maxRetries) {
      const before = dispatched;
      // an attempt that delivered events was a working stream: what ends it starts a new count
      const delivered = () => {
        if (dispatched > before) failures = 0;
      };
      try {
        await once();
        if (done || closed) break;
        // the server ended the stream before the job did (its time cap, a restart): reconnect,
        // at once the first time, then backing off while it keeps ending early
        delivered();
        failures += 1;
        if (failures > 1) await new Promise((resolve) => setTimeout(resolve, Math.min(8000, 250 * 2 ** failures)));
      } catch (e) {
        if (closed || (e && e.name === "AbortError")) break;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) {
          if (handlers.onError) handlers.onError(e);
          return;
        }
        delivered();
        failures += 1;
        if (failures > maxRetries) {
          if (handlers.onError) handlers.onError(e);
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, Math.min(8000, 500 * 2 ** failures)));
      }
    }
    if (handlers.onEnd && !closed) handlers.onEnd();
  })();

  return () => {
    closed = true;
    controller.abort();
  };
}
