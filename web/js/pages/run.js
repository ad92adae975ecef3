// Run a command: name, arguments, timeout and a target (some agents, a
// label selector or all), then each agent's result as it arrives
// (command.status and command.result events; polling without them).

import * as api from '../api.js';
import {
  el, field, input, table, badge, link, heading, errorBox, replace, button, busy, debounce, parseLabels,
  TERMINAL, toast, time,
} from '../ui.js';
import { commandOutput } from './batch.js';

const BUILTINS = [
  ['ping', 'answers pong'],
  ['sysinfo', 'host facts'],
  ['config.reload', 'fetch and apply the configuration again'],
  ['agent.restart', 'restart the agent'],
  ['shell', 'only where the agent allows it locally; args {"script": "…"}'],
];

export default async function run(ctx) {
  const name = input({ id: 'run-name', list: 'run-builtins', required: true, placeholder: 'ping', value: ctx.query.get('name') || '' });
  const builtins = el('datalist', { id: 'run-builtins' }, BUILTINS.map(([n, what]) => el('option', { value: n }, what)));
  const args = el('textarea', { id: 'run-args', rows: '4', spellcheck: 'false' }, '{}');
  const timeout = input({ id: 'run-timeout', type: 'number', min: '1', max: '86400', value: '300', required: true });

  // Target: several agents (picked), a label selector, or all.
  const picked = new Map(); // id → name
  const mode = { value: 'agents' };
  const radio = (value, text) => el('label', { class: 'choice' },
    el('input', { type: 'radio', name: 'target', value, checked: value === 'agents', on: { change: () => setMode(value) } }), text);
  const chosen = el('div', { id: 'run-chosen', 'aria-live': 'polite' });
  const find = input({ id: 'run-find', type: 'search', placeholder: 'search agents by name or hostname' });
  const found = el('div', { id: 'run-found' });
  const labels = input({ id: 'run-labels', placeholder: 'role=web, env=prod' });
  const agentsBox = el('div', null, chosen, field('Add agents', find), found);
  const labelsBox = el('div', { hidden: true }, field('Label selector', labels, '(agents carrying every pair)'));
  const allBox = el('div', { hidden: true }, el('p', { class: 'hint' }, 'Every active agent, resolved now.'));
  function setMode(value) {
    mode.value = value;
    agentsBox.hidden = value !== 'agents';
    labelsBox.hidden = value !== 'labels';
    allBox.hidden = value !== 'all';
  }

  function renderChosen() {
    replace(chosen, picked.size
      ? [...picked].map(([id, n]) => el('span', { class: 'chip', dataset: { agentId: id } }, n,
        el('button', { type: 'button', 'aria-label': `Remove ${n}`, on: { click: () => { picked.delete(id); renderChosen(); } } }, '×')))
      : el('p', { class: 'hint' }, 'No agent chosen yet.'));
  }

  const search = debounce(async () => {
    const q = find.value.trim();
    if (!q) {
      replace(found);
      return;
    }
    try {
      const page = await api.get('/api/v1/agents', { q, limit: 10 });
      if (!ctx.alive) return;
      replace(found, page.data.length
        ? el('ul', { class: 'plain' }, page.data.map((a) => el('li', null,
          button(`Add ${a.name}`, () => { picked.set(a.id, a.name); renderChosen(); }, { class: 'small', dataset: { agentId: a.id }, disabled: a.status === 'revoked' }),
          ' ', el('span', { class: 'mono muted' }, a.hostname), ' ', el('span', { class: 'muted' }, a.status))))
        : el('p', { class: 'hint' }, 'No agent matches.'));
    } catch (err) {
      replace(found, errorBox(err));
    }
  }, 200);
  find.addEventListener('input', search);

  for (const id of (ctx.query.get('agents') || '').split(',').filter(Boolean)) {
    try {
      const { data } = await api.get(`/api/v1/agents/${api.seg(id)}`);
      picked.set(data.id, data.name);
    } catch {
      // An unknown id in the link is simply left out.
    }
  }
  renderChosen();

  const submit = el('button', { type: 'submit', class: 'primary', id: 'run-submit' }, 'Run');
  const message = el('div');
  const results = el('div', { id: 'run-results' });
  const form = el('form', { class: 'panel', 'aria-label': 'Run a command' },
    message,
    el('div', { class: 'row' }, field('Command', name, null, null, builtins), field('Timeout (s)', timeout, null, 'narrow')),
    field('Arguments', args, '(a JSON object)'),
    el('fieldset', null, el('legend', null, 'Target'),
      el('div', { role: 'radiogroup' }, radio('agents', 'Agents'), radio('labels', 'Label selector'), radio('all', 'All agents')),
      agentsBox, labelsBox, allBox),
    submit);
  ctx.root.append(heading('Run a command'), form, results);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    replace(message);
    let body;
    try {
      let parsedArgs;
      try {
        parsedArgs = JSON.parse(args.value || '{}');
      } catch {
        throw new Error('Arguments must be a JSON object, e.g. {"script": "uptime"}.');
      }
      if (!parsedArgs || typeof parsedArgs !== 'object' || Array.isArray(parsedArgs)) throw new Error('Arguments must be a JSON object.');
      let target;
      if (mode.value === 'agents') {
        if (!picked.size) throw new Error('Choose at least one agent, or another kind of target.');
        target = { agents: [...picked.keys()] };
      } else if (mode.value === 'labels') {
        const sel = parseLabels(labels.value);
        if (!Object.keys(sel).length) throw new Error('Give at least one k=v label.');
        target = { labels: sel };
      } else {
        target = { all: true };
      }
      body = { target, name: name.value.trim(), args: parsedArgs, timeout_s: Number(timeout.value) };
    } catch (err) {
      replace(message, errorBox(err));
      return;
    }
    await busy(submit, async () => {
      try {
        const { data } = await api.post('/api/v1/commands', body);
        toast(`Started ${body.name} on ${data.command_ids.length} agent(s)`);
        showBatch(data.batch_id, data.command_ids, [...picked]);
      } catch (err) {
        replace(message, errorBox(err));
      }
    });
  });

  let stopLive = null;

  /** The batch's commands, one row per agent, updated live. */
  function showBatch(batchId, commandIds, knownNames) {
    if (stopLive) stopLive();
    const names = new Map(knownNames);
    const rows = new Map(); // command id → command
    const ids = new Set(commandIds);
    const body = el('div', { 'aria-live': 'polite' });
    const cancel = button('Cancel the rest', async () => {
      try {
        await api.post(`/api/v1/batches/${api.seg(batchId)}/cancel`);
        refreshAll();
      } catch (err) {
        toast(err.message, 'error');
      }
    }, { class: 'danger small', id: 'run-cancel' });
    replace(results, el('section', { class: 'panel', 'aria-label': 'Results', dataset: { batchId } },
      el('div', { class: 'page-head' }, el('h2', null, 'Results'), el('div', { class: 'actions' }, link(`/batches/${batchId}`, 'Batch page'), ' ', cancel)),
      body));

    function render() {
      const list = commandIds.map((id) => rows.get(id) || { id, status: 'queued', agent_id: null });
      const open = list.some((c) => !TERMINAL.has(c.status));
      cancel.hidden = !open;
      replace(body, table([
        { title: 'Agent', cell: (c) => c.agent_id ? link(`/agents/${c.agent_id}`, names.get(c.agent_id) || c.agent_id.slice(0, 8)) : '…' },
        { title: 'Status', cell: (c) => badge(c.status) },
        { title: 'Exit', cell: (c) => (c.exit_code ?? '—'), class: 'num' },
        { title: 'Finished', cell: (c) => c.finished_at ? time(c.finished_at) : '—' },
        { title: 'Output', cell: (c) => commandOutput(c), class: 'wrap' },
      ], list, { rowProps: (c) => ({ dataset: { commandId: c.id, status: c.status } }) }));
    }

    async function nameAgents() {
      const missing = [...new Set([...rows.values()].map((c) => c.agent_id))].filter((a) => a && !names.has(a)).slice(0, 50);
      await Promise.all(missing.map(async (a) => {
        try {
          names.set(a, (await api.get(`/api/v1/agents/${api.seg(a)}`)).data.name);
        } catch {
          names.set(a, a.slice(0, 8));
        }
      }));
    }

    async function refreshAll() {
      try {
        const page = await api.get('/api/v1/commands', { batch_id: batchId, limit: 500 });
        for (const c of page.data) rows.set(c.id, c);
        await nameAgents();
        if (ctx.alive) render();
      } catch (err) {
        if (ctx.alive) replace(body, errorBox(err));
      }
    }

    async function refreshOne(id) {
      try {
        rows.set(id, (await api.get(`/api/v1/commands/${api.seg(id)}`)).data);
        if (ctx.alive) render();
      } catch {
        refreshAll();
      }
    }

    const stops = [
      ctx.subscribe(['command.status', 'command.result', 'command.cancel'], (ev) => {
        if (ids.has(ev.target)) refreshOne(ev.target);
      }),
      ctx.subscribe(['batch.cancel'], (ev) => {
        if (ev.target === batchId) refreshAll();
      }),
    ];
    // Without events, poll while anything is still open.
    const timer = setInterval(() => {
      const open = commandIds.some((id) => !TERMINAL.has(rows.get(id)?.status || 'queued'));
      if (open && ctx.alive && !ctx.live()) refreshAll();
    }, 1500);
    stopLive = () => {
      for (const stop of stops) stop();
      clearInterval(timer);
    };
    ctx.onLeave(stopLive);
    render();
    refreshAll();
  }

  if (!picked.size) find.focus();
  else name.focus();
}
