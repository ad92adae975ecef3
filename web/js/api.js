// The HTTP API from the dashboard: JSON in and out, the session cookie for
// credentials, the CSRF token on every mutating request, and one error type
// built from the server's envelope {error:{code,key,what,params,request_id}}.

/** An API error; `message` is the server's `what`, meant for people. */
export class ApiError extends Error {
  constructor(status, body, fallback) {
    super(body?.what || fallback || `request failed (HTTP ${status})`);
    this.name = 'ApiError';
    this.status = status;
    this.code = body?.code ?? null;
    this.key = body?.key ?? null;
    this.params = body?.params ?? {};
    this.requestId = body?.request_id ?? null;
  }
}

let csrfToken = null;
let onUnauthenticated = null;

/** The session's CSRF token, from the login answer or GET /api/v1/auth/session. */
export function setCsrf(token) {
  csrfToken = token || null;
}

/** Called when a request answers 401 (the session ended). */
export function setUnauthenticatedHandler(fn) {
  onUnauthenticated = fn;
}

function url(path, query) {
  const u = new URL(path, window.location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== '') u.searchParams.set(k, String(v));
  }
  return u;
}

/**
 * One request. Resolves with {body, headers, status}; rejects with ApiError.
 * `quiet401` keeps a 401 from ending the session view (the login form).
 */
export async function request(method, path, { query, body, headers, quiet401 = false } = {}) {
  const h = { Accept: 'application/json', ...(headers || {}) };
  if (body !== undefined) h['Content-Type'] = 'application/json';
  if (method !== 'GET' && method !== 'HEAD' && csrfToken) h['X-CSRF-Token'] = csrfToken;
  let res;
  try {
    res = await fetch(url(path, query), {
      method,
      headers: h,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
      cache: 'no-store',
      redirect: 'error',
    });
  } catch {
    throw new ApiError(0, null, 'The server cannot be reached. Check the connection and try again.');
  }
  const text = res.status === 204 ? '' : await res.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = null;
    }
  }
  if (!res.ok) {
    const err = new ApiError(res.status, json?.error, res.statusText);
    if (res.status === 401 && !quiet401 && onUnauthenticated) onUnauthenticated(err);
    throw err;
  }
  return { body: json, headers: res.headers, status: res.status };
}

/** GET → the body ({data} or {data, next_cursor}). */
export async function get(path, query) {
  return (await request('GET', path, { query })).body;
}

export async function post(path, body) {
  return (await request('POST', path, { body: body ?? {} })).body;
}

export async function patch(path, body) {
  return (await request('PATCH', path, { body })).body;
}

export async function del(path) {
  return (await request('DELETE', path)).body;
}

/** A path segment, percent-encoded (config scopes contain `:` and `=`). */
export function seg(value) {
  return encodeURIComponent(String(value));
}
