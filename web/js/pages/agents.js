// The agents table: one server-side page at a time (keyset paging), filtered
// by the server (label, status, search), so it stays fast with any number of
// agents. Status dots flip on agent.online / agent.offline events.

import * as api from '../api.js';
import { el, field, input, select, table, tableRow, statusDot, chips, time, link, heading, cursorPager, errorBox, replace, debounce, parseLabels } from '../ui.js';

const COLUMNS = [
  { title: 'Status', cell: (a) => statusDot(a.status) },
  { title: 'Name', cell: (a) => link(`/agents/${a.id}`, a.name) },
  { title: 'Hostname', cell: (a) => el('span', { class: 'mono' }, a.hostname), class: 'wrap' },
  { title: 'Labels', cell: (a) => chips(a.labels) },
  { title: 'Version', cell: (a) => a.version || el('span', { class: 'muted' }, '—') },
  { title: 'Last seen', cell: (a) => el('span', { class: 'last-seen' }, time(a.last_seen)) },
];

function rowProps(a) {
  return { dataset: { agentId: a.id, status: a.status } };
}

export default async function agents(ctx) {
  const q = ctx.query;
  const state = {
    q: q.get('q') || '',
    label: q.get('label') || '',
    status: q.get('status') || '',
    limit: Number(q.get('limit')) || 50,
    cursor: q.get('cursor') || '',
    before: [], // cursors of the pages before this one
    next: null,
  };

  const search = input({ type: 'search', id: 'agents-q', placeholder: 'name or hostname', value: state.q });
  const label = input({ id: 'agents-label', placeholder: 'role=web, env=prod', value: state.label });
  const status = select([['', 'any'], ['online', 'online'], ['offline', 'offline'], ['revoked', 'revoked']], { id: 'agents-status' });
  status.value = state.status;
  const size = select([['50', '50'], ['100', '100'], ['200', '200'], ['500', '500']], { id: 'agents-limit' });
  size.value = String(state.limit);
  const labelError = el('div', { class: 'error-text', 'aria-live': 'polite' });
  const results = el('div', { id: 'agents-results', 'aria-live': 'polite' });

  const actions = [];
  if (ctx.can('operator')) {
    actions.push(el('a', { class: 'button', href: '#/tokens' }, 'Enroll agents'));
    actions.push(el('a', { class: 'button primary', href: '#/run' }, 'Run command'));
  }
  ctx.root.append(
    heading('Agents', ...actions),
    el('div', { class: 'panel' },
      el('form', { class: 'toolbar', role: 'search', on: { submit: (e) => e.preventDefault() } },
        field('Search', search, null, 'wide'),
        field('Labels', label, '(k=v, …)', null, labelError),
        field('Status', status),
        field('Per page', size, null, 'narrow')),
      results));

  let seq = 0;
  let tbody = null;

  async function load() {
    const mine = ++seq;
    let labels = '';
    try {
      labels = Object.entries(parseLabels(state.label)).map(([k, v]) => `${k}=${v}`).join(',');
      replace(labelError);
    } catch (err) {
      replace(labelError, err.message);
      return;
    }
    ctx.setQuery({ q: state.q, label: state.label, status: state.status, limit: state.limit === 50 ? '' : state.limit, cursor: state.cursor });
    results.setAttribute('aria-busy', 'true');
    let page;
    try {
      page = await api.get('/api/v1/agents', { q: state.q, label: labels, status: state.status, limit: state.limit, cursor: state.cursor });
    } catch (err) {
      if (mine === seq && ctx.alive) replace(results, errorBox(err));
      return;
    } finally {
      if (mine === seq) results.removeAttribute('aria-busy');
    }
    if (mine !== seq || !ctx.alive) return; // a newer filter is on its way
    state.next = page.next_cursor;
    const filtered = state.q || state.label || state.status;
    const view = table(COLUMNS, page.data, {
      cls: 'agents',
      caption: 'Agents',
      rowProps,
      empty: filtered ? 'No agent matches these filters.' : 'No agents yet. Create an enrollment token under Tokens, or approve a device.',
    });
    tbody = view.querySelector('tbody');
    const first = state.before.length === 0;
    replace(results, view,
      cursorPager(state, load, `${page.data.length} shown${first ? '' : ` · page ${state.before.length + 1}`}`));
    // For the browser tests' timing: navigation or filter change → rows on screen.
    performance.mark('agents-rendered');
    window.dispatchEvent(new CustomEvent('tether:agents-rendered', { detail: { rows: page.data.length } }));
  }

  function restart() {
    state.cursor = '';
    state.before = [];
    load();
  }

  const typed = debounce(restart, 200);
  search.addEventListener('input', () => {
    state.q = search.value.trim();
    typed();
  });
  label.addEventListener('input', () => {
    state.label = label.value;
    typed();
  });
  status.addEventListener('change', () => {
    state.status = status.value;
    restart();
  });
  size.addEventListener('change', () => {
    state.limit = Number(size.value);
    restart();
  });

  function rowOf(id) {
    return tbody?.querySelector(`tr[data-agent-id="${CSS.escape(id)}"]`) || null;
  }

  // Presence: flip the dot of a row on screen, no request needed.
  ctx.subscribe(['agent.online', 'agent.offline'], (ev) => {
    const tr = rowOf(ev.target);
    if (!tr || tr.dataset.status === 'revoked') return;
    const now = ev.action === 'agent.online' ? 'online' : 'offline';
    tr.dataset.status = now;
    replace(tr.cells[0], statusDot(now));
    if (now === 'online' && ev.ts) replace(tr.cells[5], el('span', { class: 'last-seen' }, time(ev.ts)));
  });
  // A changed agent on screen: fetch it again.
  ctx.subscribe(['agent.update', 'agent.revoke'], async (ev) => {
    const tr = rowOf(ev.target);
    if (!tr) return;
    try {
      const { data } = await api.get(`/api/v1/agents/${api.seg(ev.target)}`);
      if (tr.isConnected) tr.replaceWith(tableRow(COLUMNS, data, rowProps));
    } catch {
      // Gone meanwhile: the delete event reloads the page.
    }
  });
  const reload = debounce(load, 1000);
  ctx.subscribe(['agent.enroll', 'agent.delete'], reload);
  // Without the event stream, refresh what is on screen now and then.
  ctx.poll(load, 5000);

  await load();
}
