// The server's public API as the page uses it: one request with the key, errors with the server's own words.

export class ApiError extends Error {
  constructor(status, message, code = null, retryAfter = null) {
    super(message);
    this.status = status; // 0: the server could not be reached
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

export const api = {
  key: sessionStorage.getItem("infinitevl.key") || "",

  setKey(key) {
    this.key = key;
    if (key) sessionStorage.setItem("infinitevl.key", key);
    else sessionStorage.removeItem("infinitevl.key");
  },

  // One request; a non-2xx answer becomes an ApiError with the server's own message.
  async request(method, path, { json, body, type } = {}) {
    const headers = {};
    if (this.key) headers.Authorization = `Bearer ${this.key}`;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (type) {
      headers["Content-Type"] = type;
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, `cannot reach the server (${err.message})`);
    }
    if (response.ok) return response;
    let message = `HTTP ${response.status}`;
    let code = null;
    try {
      const detail = (await response.json()).error;
      message = detail.message;
      code = detail.code;
    } catch {
      // not the server's JSON error shape (a proxy in between, say): keep the status line
    }
    const retry = Number(response.headers.get("Retry-After"));
    throw new ApiError(response.status, message, code, Number.isFinite(retry) && retry > 0 ? retry : null);
  },

  async json(method, path, options) {
    return (await this.request(method, path, options)).json();
  },
};

// An error in words a person can act on.
export function describe(err) {
  if (!(err instanceof ApiError)) return err.message || String(err);
  switch (err.status) {
    case 0:
      return err.message;
    case 401:
      return `the server refused the API key: ${err.message}. Enter the key above.`;
    case 429:
      return `the server is busy (HTTP 429): ${err.message}`;
    default:
      return `${err.message} (HTTP ${err.status})`;
  }
}
