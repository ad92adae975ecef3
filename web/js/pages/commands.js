// Commands, newest first, filtered by state, agent or batch, keyset paged.

import * as api from '../api.js';
import { el, field, input, select, table, badge, link, heading, time, cursorPager, errorBox, replace, button, toast, debounce, TERMINAL } from '../ui.js';

const STATES = ['queued', 'delivered', 'running', 'succeeded', 'failed', 'timed_out', 'rejected', 'cancelled', 'expired', 'lost'];

export default async function commands(ctx) {
  const state = {
    status: ctx.query.get('status') || '',
    agent_id: ctx.query.get('agent_id') || '',
    batch_id: ctx.query.get('batch_id') || '',
    cursor: '',
    before: [],
    next: null,
  };
  const status = select([['', 'any'], ['queued,delivered,running', 'open'], ...STATES.map((s) => [s, s])], { id: 'commands-status' });
  status.value = state.status;
  const agent = input({ id: 'commands-agent', placeholder: 'agent id', value: state.agent_id });
  const batchId = input({ id: 'commands-batch', placeholder: 'batch id', value: state.batch_id });
  const results = el('div', { 'aria-live': 'polite' });
  const operator = ctx.can('operator');
  ctx.root.append(
    heading('Commands', operator ? el('a', { class: 'button primary', href: '#/run' }, 'Run command') : null),
    el('div', { class: 'panel' },
      el('form', { class: 'toolbar', on: { submit: (e) => e.preventDefault() } }, field('Status', status), field('Agent', agent), field('Batch', batchId)),
      results));

  let seq = 0;
  async function load() {
    const mine = ++seq;
    ctx.setQuery({ status: state.status, agent_id: state.agent_id, batch_id: state.batch_id });
    let page;
    try {
      page = await api.get('/api/v1/commands', { status: state.status, agent_id: state.agent_id, batch_id: state.batch_id, cursor: state.cursor, limit: 50 });
    } catch (err) {
      if (mine === seq && ctx.alive) replace(results, errorBox(err));
      return;
    }
    if (mine !== seq || !ctx.alive) return;
    state.next = page.next_cursor;
    const columns = [
      { title: 'Created', cell: (c) => time(c.created_at) },
      { title: 'Command', cell: (c) => link(`/commands/${c.id}`, c.name) },
      { title: 'Agent', cell: (c) => link(`/agents/${c.agent_id}`, el('span', { class: 'mono' }, c.agent_id.slice(0, 8))) },
      { title: 'Batch', cell: (c) => link(`/batches/${c.batch_id}`, el('span', { class: 'mono' }, c.batch_id.slice(0, 8))) },
      { title: 'Status', cell: (c) => badge(c.status) },
      { title: 'Exit', cell: (c) => (c.exit_code ?? '—'), class: 'num' },
      { title: 'By', cell: (c) => c.created_by },
    ];
    if (operator) {
      columns.push({
        title: 'Actions',
        cell: (c) => (TERMINAL.has(c.status) ? '' : button('Cancel', async () => {
          try {
            await api.post(`/api/v1/commands/${api.seg(c.id)}/cancel`);
            toast('Command cancelled');
            load();
          } catch (err) {
            toast(err.message, 'error');
          }
        }, { class: 'danger small' })),
      });
    }
    replace(results,
      table(columns, page.data, { empty: 'No commands match.', rowProps: (c) => ({ dataset: { commandId: c.id, status: c.status } }) }),
      cursorPager(state, load));
  }

  const restart = () => { state.cursor = ''; state.before = []; load(); };
  const typed = debounce(restart, 250);
  status.addEventListener('change', () => { state.status = status.value; restart(); });
  agent.addEventListener('input', () => { state.agent_id = agent.value.trim(); typed(); });
  batchId.addEventListener('input', () => { state.batch_id = batchId.value.trim(); typed(); });

  await load();
  // New and finished commands show on the first page as they happen.
  const refresh = debounce(() => state.before.length === 0 && load(), 500);
  ctx.subscribe(['command.', 'batch.cancel'], refresh);
  ctx.poll(() => state.before.length === 0 && load(), 5000);
}
