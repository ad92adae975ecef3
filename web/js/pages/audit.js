// The audit log, newest first: filters, keyset pages, and new rows as they
// happen (on the first page). Admins see every row, others their own.

import * as api from '../api.js';
import { el, field, input, table, badge, heading, time, cursorPager, errorBox, replace, debounce } from '../ui.js';

const ACTIONS = ['login.ok', 'login.failed', 'agent.enroll', 'agent.update', 'agent.revoke', 'agent.delete', 'agent.online', 'agent.offline',
  'command.create', 'command.cancel', 'command.result', 'batch.cancel', 'config.put', 'config.rollback', 'device.approve', 'device.deny',
  'enroll_token.create', 'enroll_token.revoke', 'api_token.create', 'api_token.revoke', 'user.create', 'user.update', 'user.delete', 'rbac.denied'];

/** datetime-local value → RFC 3339 (the browser's time zone). */
function isoOf(local) {
  if (!local) return '';
  const d = new Date(local);
  return Number.isNaN(d.getTime()) ? '' : d.toISOString();
}

export default async function audit(ctx) {
  const admin = ctx.can('admin');
  const q = ctx.query;
  const state = { actor: q.get('actor') || '', action: q.get('action') || '', agent_id: q.get('agent_id') || '', from: q.get('from') || '', to: q.get('to') || '', cursor: '', before: [], next: null };
  const actor = input({ id: 'audit-actor', value: state.actor, placeholder: 'username or agent id' });
  const action = input({ id: 'audit-action', value: state.action, list: 'audit-actions', placeholder: 'e.g. config.put' });
  const actions = el('datalist', { id: 'audit-actions' }, ACTIONS.map((a) => el('option', { value: a })));
  const agent = input({ id: 'audit-agent', value: state.agent_id, placeholder: 'agent id' });
  const from = input({ id: 'audit-from', type: 'datetime-local', value: state.from });
  const to = input({ id: 'audit-to', type: 'datetime-local', value: state.to });
  const results = el('div', { 'aria-live': 'polite' });
  ctx.root.append(
    heading('Audit log'),
    el('p', { class: 'sub' }, admin ? 'Every recorded action, hash-chained.' : 'Your own actions. Admins see everyone\'s.'),
    el('div', { class: 'panel' },
      el('form', { class: 'toolbar', on: { submit: (e) => e.preventDefault() } },
        admin ? field('Actor', actor) : null, field('Action', action, null, null, actions), field('Agent', agent), field('From', from), field('To', to)),
      results));

  let seq = 0;
  async function load() {
    const mine = ++seq;
    ctx.setQuery({ actor: state.actor, action: state.action, agent_id: state.agent_id, from: state.from, to: state.to });
    let page;
    try {
      page = await api.get('/api/v1/audit', {
        actor: admin ? state.actor : '', action: state.action, agent_id: state.agent_id, from: isoOf(state.from), to: isoOf(state.to), cursor: state.cursor, limit: 50,
      });
    } catch (err) {
      if (mine === seq && ctx.alive) replace(results, errorBox(err));
      return;
    }
    if (mine !== seq || !ctx.alive) return;
    state.next = page.next_cursor;
    replace(results, table([
      { title: 'When', cell: (r) => time(r.ts, false) },
      { title: 'Actor', cell: (r) => [el('span', { class: 'mono' }, r.actor), ' ', el('span', { class: 'muted' }, r.actor_kind)] },
      { title: 'Action', cell: (r) => el('code', null, r.action) },
      { title: 'Target', cell: (r) => el('span', { class: 'mono' }, r.target || '—'), class: 'wrap' },
      { title: 'Outcome', cell: (r) => badge(r.outcome) },
      { title: 'IP', cell: (r) => r.ip || '—' },
      { title: 'Details', cell: (r) => (r.details && Object.keys(r.details).length ? el('details', null, el('summary', null, 'show'), el('pre', { class: 'light' }, JSON.stringify(r.details, null, 2))) : ''), class: 'wrap' },
    ], page.data, { empty: 'No audit rows match.', rowProps: (r) => ({ dataset: { auditId: String(r.id) } }) }),
    cursorPager(state, load));
  }

  const restart = () => { state.cursor = ''; state.before = []; load(); };
  const typed = debounce(restart, 300);
  for (const [node, key] of [[actor, 'actor'], [action, 'action'], [agent, 'agent_id'], [from, 'from'], [to, 'to']]) {
    node.addEventListener('input', () => { state[key] = node.value.trim(); typed(); });
  }
  await load();
  // On the first page, new rows appear as they are written.
  const refresh = debounce(() => state.before.length === 0 && !state.to && load(), 700);
  ctx.subscribe(['*'], refresh);
  ctx.poll(() => state.before.length === 0 && load(), 10000);
}
