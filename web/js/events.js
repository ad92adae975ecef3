// Live updates from GET /api/v1/events (Server-Sent Events): every event is
// an audit row; `event:` is its action, `id:` the row id (so the browser
// resumes with Last-Event-ID by itself) and `data:` the row as
// GET /api/v1/audit shows it. Pages subscribe by action or action prefix.
//
// While the stream is down (not built into this server, or a proxy in the
// way), pages fall back to polling what they show: `live()` says which.

const ACTIONS = [
  'agent.online', 'agent.offline', 'agent.enroll', 'agent.update', 'agent.revoke', 'agent.delete',
  'command.create', 'command.cancel', 'command.status', 'command.result', 'batch.cancel',
  'config.put', 'config.rollback',
  'device.approve', 'device.deny',
  'file.assign', 'file.unassign',
  'cert.add', 'cert.issue', 'cert.issued', 'cert.replace', 'cert.revoke', 'cert.expiring', 'cert.renewal_requested',
  'cert.csr_refused', 'ca.rotate', 'ca.import', 'ca.retire',
  'user.create', 'user.update', 'user.delete', 'user.reset_password',
  'api_token.create', 'api_token.revoke', 'enroll_token.create', 'enroll_token.revoke',
  // Admins' feed also carries these (the audit page shows them as they happen).
  'login.ok', 'login.failed', 'rbac.denied', 'token.issued', 'token.refresh_reuse', 'user.bootstrap',
];

const RETRY_MS = 15000;

let source = null;
let state = 'off'; // 'off' | 'connecting' | 'on' | 'polling'
let retryTimer = null;
const subscribers = new Set();
const stateListeners = new Set();

function setState(next) {
  if (state === next) return;
  state = next;
  for (const fn of stateListeners) fn(state);
}

function dispatch(action, ev) {
  let row;
  try {
    row = JSON.parse(ev.data);
  } catch {
    return;
  }
  if (!row || typeof row !== 'object') return;
  row.action = row.action || action;
  for (const sub of subscribers) {
    if (sub.match(row.action)) {
      try {
        sub.fn(row);
      } catch (e) {
        // One page's bug must not stop the others' updates.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

/** Opens the stream (after sign-in). */
export function connect() {
  if (source) return;
  clearTimeout(retryTimer);
  setState('connecting');
  const es = new EventSource('/api/v1/events');
  source = es;
  es.onopen = () => setState('on');
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) {
      // The browser gave up (an error status or not an event stream): poll,
      // and try the stream again later.
      source = null;
      setState('polling');
      retryTimer = setTimeout(connect, RETRY_MS);
    } else {
      // Reconnecting by itself, resuming from the last id.
      setState('polling');
    }
  };
  for (const action of ACTIONS) es.addEventListener(action, (ev) => dispatch(action, ev));
  // Unnamed events, in case a server sends the action only in the data.
  es.onmessage = (ev) => dispatch('', ev);
}

export function disconnect() {
  clearTimeout(retryTimer);
  if (source) source.close();
  source = null;
  setState('off');
}

/** Whether events arrive now (pages poll when they do not). */
export function live() {
  return state === 'on';
}

export function onState(fn) {
  stateListeners.add(fn);
  fn(state);
  return () => stateListeners.delete(fn);
}

/**
 * Calls fn(row) for every event whose action is one of `actions` (an exact
 * action like "agent.online", a prefix ending in "." like "command.", or "*").
 * Returns the unsubscribe function.
 */
export function subscribe(actions, fn) {
  const list = Array.isArray(actions) ? actions : [actions];
  const sub = {
    fn,
    match: (action) => list.some((a) => a === '*' || (a.endsWith('.') ? action.startsWith(a) : action === a)),
  };
  subscribers.add(sub);
  return () => subscribers.delete(sub);
}
