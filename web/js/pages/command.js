// One command: its lifecycle, arguments and output; cancel while open.

import * as api from '../api.js';
import { el, badge, link, heading, time, kv, json, errorBox, replace, button, toast, confirmDialog, TERMINAL } from '../ui.js';
import { commandOutput } from './batch.js';

export default async function command(ctx) {
  const id = ctx.params[0];
  const view = el('div');
  ctx.root.append(view);
  let cmd = null;

  async function load() {
    try {
      cmd = (await api.get(`/api/v1/commands/${api.seg(id)}`)).data;
    } catch (err) {
      if (ctx.alive) replace(view, heading('Command'), errorBox(err));
      return;
    }
    if (!ctx.alive) return;
    const actions = [];
    if (ctx.can('operator') && !TERMINAL.has(cmd.status)) {
      actions.push(button('Cancel', async () => {
        if (!(await confirmDialog({ title: 'Cancel this command?', body: 'A running command is killed on the agent.', confirm: 'Cancel command', danger: true }))) return;
        try {
          await api.post(`/api/v1/commands/${api.seg(id)}/cancel`);
          toast('Command cancelled');
          load();
        } catch (err) {
          toast(err.message, 'error');
        }
      }, { class: 'danger', id: 'command-cancel' }));
    }
    replace(view,
      heading(`Command ${cmd.name}`, ...actions),
      el('p', { class: 'sub' }, badge(cmd.status), ' on ', link(`/agents/${cmd.agent_id}`, cmd.agent_id), ' · batch ', link(`/batches/${cmd.batch_id}`, cmd.batch_id.slice(0, 8))),
      el('div', { class: 'grid' },
        el('section', { class: 'panel', 'aria-label': 'Lifecycle' }, el('h2', null, 'Lifecycle'), kv([
          ['Status', badge(cmd.status)],
          ['Exit code', String(cmd.exit_code ?? '—')],
          ['Created', time(cmd.created_at, false)],
          ['By', cmd.created_by],
          ['Delivered', cmd.delivered_at ? time(cmd.delivered_at, false) : '—'],
          ['Started', cmd.started_at ? time(cmd.started_at, false) : '—'],
          ['Finished', cmd.finished_at ? time(cmd.finished_at, false) : '—'],
          ['Expires', time(cmd.expires_at, false)],
          ['Timeout', `${cmd.timeout_s} s`],
          ['Priority', String(cmd.priority)],
        ])),
        el('section', { class: 'panel', 'aria-label': 'Arguments' }, el('h2', null, 'Arguments'), json(cmd.args))),
      el('section', { class: 'panel', 'aria-label': 'Output' }, el('h2', null, 'Output'), commandOutput(cmd)));
  }

  await load();
  ctx.subscribe(['command.status', 'command.result', 'command.cancel'], (ev) => ev.target === id && load());
  ctx.subscribe(['batch.cancel'], (ev) => cmd && ev.target === cmd.batch_id && load());
  ctx.poll(() => cmd && !TERMINAL.has(cmd.status) && load(), 2000);
}
