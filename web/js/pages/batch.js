// One batch: counts per state, its commands with their output, cancel.

import * as api from '../api.js';
import { el, table, badge, link, heading, time, kv, errorBox, replace, button, toast, debounce, confirmDialog, TERMINAL } from '../ui.js';

/** A command's output for a table cell: stdout, stderr, the reason, `output`. */
export function commandOutput(c) {
  const parts = [];
  if (c.stdout) parts.push(el('pre', { class: 'stdout' }, c.stdout));
  if (c.stderr) parts.push(el('pre', { class: 'stderr' }, c.stderr));
  if (c.output && typeof c.output === 'object' && Object.keys(c.output).length) parts.push(el('pre', { class: 'light' }, JSON.stringify(c.output, null, 2)));
  if (c.reason) parts.push(el('p', { class: 'muted' }, c.reason));
  if (c.truncated) parts.push(el('p', { class: 'hint' }, 'Output was cut at 64 KiB.'));
  return parts.length ? parts : el('span', { class: 'muted' }, TERMINAL.has(c.status) ? 'no output' : '…');
}

export default async function batch(ctx) {
  const id = ctx.params[0];
  const head = el('div');
  const counts = el('div');
  const list = el('div', { 'aria-live': 'polite' });
  ctx.root.append(head, el('section', { class: 'panel', 'aria-label': 'Counts' }, counts), el('section', { class: 'panel', 'aria-label': 'Commands' }, el('h2', null, 'Commands'), list));
  let ids = new Set();
  let open = true;

  async function load() {
    let b;
    let page;
    try {
      [b, page] = await Promise.all([
        api.get(`/api/v1/batches/${api.seg(id)}`).then((r) => r.data),
        api.get('/api/v1/commands', { batch_id: id, limit: 500 }),
      ]);
    } catch (err) {
      if (ctx.alive) replace(counts, errorBox(err));
      return;
    }
    if (!ctx.alive) return;
    open = b.status !== 'done';
    ids = new Set(page.data.map((c) => c.id));
    const actions = [];
    if (ctx.can('operator') && open) {
      actions.push(button('Cancel batch', async () => {
        if (!(await confirmDialog({ title: 'Cancel this batch?', body: 'Every command not finished yet is cancelled; running ones are killed.', confirm: 'Cancel batch', danger: true }))) return;
        try {
          await api.post(`/api/v1/batches/${api.seg(id)}/cancel`);
          toast('Batch cancelled');
          load();
        } catch (err) {
          toast(err.message, 'error');
        }
      }, { class: 'danger' }));
    }
    replace(head, heading(`Batch ${b.name}`, ...actions), el('p', { class: 'sub' }, badge(b.status === 'done' ? 'done' : 'running', b.status === 'done' ? 'ok' : 'running'), ` · ${b.total} command(s) · by ${b.created_by} · `, time(b.created_at)));
    replace(counts,
      el('div', { class: 'stats' }, Object.entries(b.counts).map(([k, v]) => el('div', null, el('strong', null, String(v)), el('span', null, k)))),
      kv([['Batch id', el('code', null, b.id)]]));
    replace(list, table([
      { title: 'Agent', cell: (c) => link(`/agents/${c.agent_id}`, c.agent_id.slice(0, 8)) },
      { title: 'Command', cell: (c) => link(`/commands/${c.id}`, c.name) },
      { title: 'Status', cell: (c) => badge(c.status) },
      { title: 'Exit', cell: (c) => (c.exit_code ?? '—'), class: 'num' },
      { title: 'Output', cell: commandOutput, class: 'wrap' },
    ], page.data, { rowProps: (c) => ({ dataset: { commandId: c.id, status: c.status } }) }),
    page.next_cursor ? el('p', { class: 'hint' }, 'Showing the first 500 commands; the counts above cover all.') : null);
  }

  await load();
  const refresh = debounce(load, 300);
  ctx.subscribe(['command.status', 'command.result', 'command.cancel'], (ev) => ids.has(ev.target) && refresh());
  ctx.subscribe(['batch.cancel'], (ev) => ev.target === id && refresh());
  ctx.poll(() => open && load(), 2000);
}
