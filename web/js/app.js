// The dashboard's entry point: who is signed in, the header, hash routing
// (`/ui/#/agents/…`, so the server serves one page) and each page's
// lifetime (its event subscriptions and timers end when it is left).

import * as api from './api.js';
import * as events from './events.js';
import { el, replace, errorBox, link, relTime } from './ui.js';
import loginPage from './pages/login.js';
import agentsPage from './pages/agents.js';
import agentPage from './pages/agent.js';
import runPage from './pages/run.js';
import commandsPage from './pages/commands.js';
import commandPage from './pages/command.js';
import batchPage from './pages/batch.js';
import configsPage from './pages/configs.js';
import configPage from './pages/config.js';
import auditPage from './pages/audit.js';
import devicePage from './pages/device.js';
import tokensPage from './pages/tokens.js';
import usersPage from './pages/users.js';

// Set after a sign-in, so a fresh visit shows the login form at once
// instead of asking the server (and getting a 401) first.
const SIGNED_IN_HINT = 'tether.signed_in';

const RANK = { viewer: 0, operator: 1, admin: 2 };

const session = { user: null };

const ROUTES = [
  { path: /^\/login$/, page: loginPage, public: true },
  { path: /^\/agents$/, page: agentsPage, nav: '/agents' },
  { path: /^\/agents\/([^/]+)$/, page: agentPage, nav: '/agents' },
  { path: /^\/run$/, page: runPage, role: 'operator', nav: '/run' },
  { path: /^\/commands$/, page: commandsPage, nav: '/commands' },
  { path: /^\/commands\/([^/]+)$/, page: commandPage, nav: '/commands' },
  { path: /^\/batches\/([^/]+)$/, page: batchPage, nav: '/commands' },
  { path: /^\/configs$/, page: configsPage, nav: '/configs' },
  { path: /^\/configs\/(.+)$/, page: configPage, nav: '/configs' },
  { path: /^\/audit$/, page: auditPage, nav: '/audit' },
  { path: /^\/device$/, page: devicePage, role: 'operator', nav: '/device' },
  { path: /^\/tokens$/, page: tokensPage, nav: '/tokens' },
  { path: /^\/users$/, page: usersPage, role: 'admin', nav: '/users' },
];

const NAV = [
  ['Agents', '/agents'],
  ['Run command', '/run', 'operator'],
  ['Commands', '/commands'],
  ['Configs', '/configs'],
  ['Audit log', '/audit'],
  ['Device approval', '/device', 'operator'],
  ['Tokens', '/tokens'],
  ['Users', '/users', 'admin'],
];

/** Whether the signed-in user has at least `role`. */
export function can(role) {
  return !!session.user && (RANK[session.user.role] ?? -1) >= RANK[role];
}

function parseHash() {
  const raw = window.location.hash.replace(/^#/, '') || '/agents';
  const at = raw.indexOf('?');
  const path = at < 0 ? raw : raw.slice(0, at);
  const query = new URLSearchParams(at < 0 ? '' : raw.slice(at + 1));
  return { path: path === '/' ? '/agents' : path, query };
}

function buildHash(path, query) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const text = q.toString();
  return `#${path}${text ? `?${text}` : ''}`;
}

export function go(path, query) {
  window.location.hash = buildHash(path, query);
}

let current = null; // the shown page's context

function leave() {
  if (!current) return;
  current.alive = false;
  for (const stop of current.cleanups) stop();
  current = null;
}

function makeContext(route, params, query) {
  const ctx = {
    alive: true,
    cleanups: [],
    params,
    query,
    user: session.user,
    can,
    signedIn,
    root: document.getElementById('main'),
    go,
    live: events.live,
    /** Replaces the query in the address bar without rendering again. */
    setQuery(q) {
      history.replaceState(null, '', buildHash(parseHash().path, q));
    },
    subscribe(actions, fn) {
      const stop = events.subscribe(actions, (row) => ctx.alive && fn(row));
      ctx.cleanups.push(stop);
      return stop;
    },
    /** Runs fn every `ms` while live events are not arriving. */
    poll(fn, ms) {
      const t = setInterval(() => {
        if (ctx.alive && !events.live() && document.visibilityState === 'visible') fn();
      }, ms);
      ctx.cleanups.push(() => clearInterval(t));
    },
    every(fn, ms) {
      const t = setInterval(() => ctx.alive && fn(), ms);
      ctx.cleanups.push(() => clearInterval(t));
    },
    onLeave(fn) {
      ctx.cleanups.push(fn);
    },
  };
  return ctx;
}

function renderNav(activeNav) {
  const nav = document.getElementById('nav');
  replace(nav, NAV.filter(([, , role]) => !role || can(role)).map(([text, path]) =>
    el('a', { href: `#${path}`, 'aria-current': path === activeNav ? 'page' : null }, text)));
}

function renderHeader() {
  const top = document.getElementById('top');
  top.hidden = !session.user;
  if (!session.user) return;
  replace(document.getElementById('who'), session.user.username, el('span', { class: 'role' }, session.user.role));
}

async function render() {
  const { path, query } = parseHash();
  const route = ROUTES.find((r) => r.path.test(path));
  leave();
  const main = document.getElementById('main');
  if (!route) {
    replace(main, el('h1', { tabindex: '-1' }, 'Not found'), el('p', null, 'No such page. ', link('/agents', 'Go to the agents.')));
    return;
  }
  if (!route.public && !session.user) {
    const next = window.location.hash.replace(/^#/, '');
    go('/login', next && !next.startsWith('/login') ? { next } : {});
    return;
  }
  if (route.public && session.user) {
    go(query.get('next') || '/agents');
    return;
  }
  renderNav(route.nav);
  const params = path.match(route.path).slice(1).map((p) => decodeURIComponent(p));
  const ctx = makeContext(route, params, query);
  current = ctx;
  replace(main);
  if (route.role && !can(route.role)) {
    replace(main, el('h1', { tabindex: '-1' }, 'Not allowed'), el('p', null, `This page needs the ${route.role} role; you are signed in as ${session.user.role}.`));
    return;
  }
  try {
    await route.page(ctx);
  } catch (err) {
    if (ctx.alive) main.appendChild(errorBox(err));
  }
  if (ctx.alive && !main.contains(document.activeElement)) {
    const h1 = main.querySelector('h1');
    (h1 || main).focus({ preventScroll: true });
  }
}

/** After a login or a session check: the user and the CSRF token. */
export function signedIn(data) {
  session.user = data.user;
  api.setCsrf(data.csrf_token);
  try {
    localStorage.setItem(SIGNED_IN_HINT, '1');
  } catch {
    // Storage may be off; the session still works, reloads ask the server.
  }
  renderHeader();
  events.connect();
}

function signedOut() {
  session.user = null;
  api.setCsrf(null);
  try {
    localStorage.removeItem(SIGNED_IN_HINT);
  } catch {
    // See signedIn.
  }
  events.disconnect();
  renderHeader();
}

function hinted() {
  try {
    return localStorage.getItem(SIGNED_IN_HINT) === '1';
  } catch {
    return true;
  }
}

async function start() {
  api.setUnauthenticatedHandler(() => {
    if (!session.user) return;
    signedOut();
    render();
  });
  document.getElementById('logout').addEventListener('click', async () => {
    try {
      await api.post('/api/v1/auth/logout');
    } catch {
      // Signed out locally either way.
    }
    signedOut();
    go('/login');
  });
  events.onState((state) => {
    const live = document.getElementById('live');
    live.className = `live ${state}`;
    live.textContent = { on: 'Live', polling: 'Polling', connecting: 'Connecting…', off: '' }[state] || '';
    live.title = state === 'on' ? 'Live updates are on' : 'Live updates are unavailable; pages refresh every few seconds';
  });
  // Relative times ("3 min ago") stay true while a page is open.
  setInterval(() => {
    for (const t of document.querySelectorAll('time[data-rel]')) t.textContent = relTime(t.getAttribute('datetime'));
  }, 15000);
  if (hinted()) {
    try {
      const { data } = (await api.request('GET', '/api/v1/auth/session', { quiet401: true })).body;
      signedIn(data);
    } catch (err) {
      if (err.status !== 401) {
        replace(document.getElementById('main'), errorBox(err));
        return;
      }
      signedOut();
    }
  }
  window.addEventListener('hashchange', render);
  render();
}

start();
