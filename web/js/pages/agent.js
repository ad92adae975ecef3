// One agent: what it reports (facts, heartbeat, metrics), what it should run
// (effective configuration with provenance), what it ran (commands), what
// it holds (inventory, files, certificates), and the operator's actions.

import * as api from '../api.js';
import {
  el, field, input, select, table, statusDot, chips, time, link, heading, kv, json, scalar, bytes, badge,
  errorBox, replace, button, confirmDialog, toast, busy, debounce, parseLabels, formatLabels, alert,
} from '../ui.js';
import { lineChart } from '../chart.js';

const RANGES = [['900000', 'last 15 minutes'], ['3600000', 'last hour'], ['21600000', 'last 6 hours'], ['86400000', 'last 24 hours'], ['604800000', 'last 7 days']];

function section(title, ...children) {
  return el('section', { class: 'panel', 'aria-label': title }, el('h2', null, title), ...children);
}

/** A reported value for people: sizes in bytes scaled, long fractions cut. */
function shown(key, v) {
  if (v !== null && typeof v === 'object') return el('code', null, JSON.stringify(v));
  if (typeof v === 'number' && /bytes$/.test(key)) return `${bytes(v)} (${v})`;
  if (typeof v === 'number' && !Number.isInteger(v)) return String(Math.round(v * 100) / 100);
  if (typeof v === 'number' && /_s$/.test(key) && v >= 120) return `${v} s (${Math.round(v / 360) / 10} h)`;
  return scalar(v);
}

function flat(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return el('p', { class: 'muted' }, 'Nothing reported.');
  return kv(entries.map(([k, v]) => [k, shown(k, v)]));
}

/** Whether a file or certificate target names this agent. */
function targets(target, agent) {
  if (!target) return false;
  if (target.all) return true;
  if (target.agents) return target.agents.includes(agent.id);
  if (target.labels) return Object.entries(target.labels).every(([k, v]) => agent.labels?.[k] === v);
  return false;
}

export default async function agentPage(ctx) {
  const id = ctx.params[0];
  const operator = ctx.can('operator');
  const head = el('div');
  const overview = el('div');
  const facts = el('div');
  const heartbeat = el('div');
  const charts = el('div', { class: 'charts' });
  const config = el('div');
  const commands = el('div');
  const inventory = el('div');
  const items = el('div');
  const editBox = el('div');
  const range = select(RANGES, { id: 'metrics-range' });
  range.value = '3600000';
  let agent = null;

  ctx.root.append(head, editBox,
    el('div', { class: 'grid' }, section('Overview', overview), section('Facts', facts), section('Latest heartbeat', heartbeat)),
    el('section', { class: 'panel', 'aria-label': 'Host metrics' },
      el('div', { class: 'page-head' }, el('h2', null, 'Host metrics'), el('div', { class: 'row' }, field('Range', range, null, 'narrow'))),
      charts),
    section('Effective configuration', config),
    section('Commands', commands),
    el('div', { class: 'grid' }, section('Inventory', inventory), section('Files and certificates', items)));

  function renderHead() {
    const actions = [];
    if (operator && agent.status !== 'revoked') {
      actions.push(el('a', { class: 'button primary', href: `#/run?agents=${encodeURIComponent(agent.id)}` }, 'Run command'));
      actions.push(button('Edit name and labels', () => openEdit(), { id: 'agent-edit' }));
      actions.push(button('Revoke', revoke, { class: 'danger', id: 'agent-revoke' }));
    }
    if (operator) actions.push(button('Delete', remove, { class: 'danger', id: 'agent-delete' }));
    replace(head, heading(agent.name, ...actions),
      el('p', { class: 'sub' }, statusDot(agent.status), ' · ', el('span', { class: 'mono' }, agent.hostname), ' · seen ', time(agent.last_seen)));
    head.querySelector('.status')?.setAttribute('id', 'agent-status');
  }

  function renderOverview() {
    replace(overview, kv([
      ['Id', el('code', null, agent.id)],
      ['Name', agent.name],
      ['Hostname', agent.hostname],
      ['Status', statusDot(agent.status)],
      ['Labels', chips(agent.labels)],
      ['Version', agent.version || '—'],
      ['Last seen', time(agent.last_seen)],
      ['Enrolled', time(agent.created_at, false)],
      ['Configuration', agent.desired_config_hash
        ? (agent.applied_config_hash === agent.desired_config_hash ? badge('applied') : badge(agent.config_error ? 'failed' : 'behind'))
        : el('span', { class: 'muted' }, 'none')],
      agent.config_error ? ['Configuration error', el('span', { class: 'error-text' }, agent.config_error)] : null,
      ['Desired hash', el('code', null, (agent.desired_config_hash || '—').slice(0, 16))],
      ['Applied hash', el('code', null, (agent.applied_config_hash || '—').slice(0, 16))],
      agent.revoked_at ? ['Revoked', time(agent.revoked_at, false)] : null,
    ]));
    replace(facts, flat(agent.facts));
    replace(heartbeat, flat(agent.heartbeat));
  }

  async function loadAgent() {
    try {
      agent = (await api.get(`/api/v1/agents/${api.seg(id)}`)).data;
    } catch (err) {
      if (err.status === 404) {
        replace(head, heading('Agent not found'), el('p', null, 'It may have been deleted. ', link('/agents', 'Back to the agents.')));
        for (const n of [overview, facts, heartbeat, charts, config, commands, inventory, items]) replace(n);
        return false;
      }
      throw err;
    }
    if (!ctx.alive) return false;
    renderHead();
    renderOverview();
    return true;
  }

  async function metric(name, from, to) {
    const { data } = await api.get(`/api/v1/agents/${api.seg(id)}/metrics`, { name, from, to });
    return data.series;
  }

  async function loadCharts() {
    const span = Number(range.value);
    const to = Date.now();
    const from = to - span;
    const asPoints = (series) => series.points.map((p) => ({ ts_ms: p.ts_ms, value: p.avg }));
    const named = (series, fallback) => Object.entries(series.labels || {}).map(([k, v]) => `${k}=${v}`).join(' ') || fallback;
    try {
      const [cpu, used, total, load1, load5, load15, disk] = await Promise.all(
        ['host.cpu_pct', 'host.mem_used_bytes', 'host.mem_total_bytes', 'host.load1', 'host.load5', 'host.load15', 'host.disk_used_bytes'].map((n) => metric(n, from, to)));
      if (!ctx.alive) return;
      const totalMax = Math.max(0, ...total.flatMap((s) => s.points.map((p) => p.max)));
      replace(charts,
        lineChart({ title: 'CPU', series: cpu.map((s) => ({ name: 'cpu %', points: asPoints(s) })), from, to, max: 100, format: (v) => `${Math.round(v)} %` }),
        lineChart({ title: 'Memory used', series: used.map((s) => ({ name: 'used', points: asPoints(s) })), from, to, max: totalMax || undefined, format: bytes }),
        lineChart({
          title: 'Load',
          series: [...load1.map((s) => ({ name: 'load 1 min', points: asPoints(s) })), ...load5.map((s) => ({ name: 'load 5 min', points: asPoints(s) })), ...load15.map((s) => ({ name: 'load 15 min', points: asPoints(s) }))],
          from, to, format: (v) => v.toFixed(v < 10 ? 2 : 0),
        }),
        lineChart({ title: 'Disk used', series: disk.slice(0, 4).map((s) => ({ name: named(s, 'disk'), points: asPoints(s) })), from, to, format: bytes }));
    } catch (err) {
      if (ctx.alive) replace(charts, errorBox(err));
    }
  }

  async function loadConfig() {
    try {
      const { data } = await api.get(`/api/v1/agents/${api.seg(id)}/config`);
      if (!ctx.alive) return;
      const rows = Object.entries(data.provenance || {}).map(([path, from]) => ({ path, from, value: pointer(data.doc, path) }));
      replace(config,
        el('p', { class: 'hint' }, 'Hash ', el('code', null, data.hash.slice(0, 16)), '. Each value names the scope and version that set it.'),
        table([
          { title: 'Path', cell: (r) => el('code', null, r.path) },
          { title: 'Value', cell: (r) => el('code', null, JSON.stringify(r.value)), class: 'wrap' },
          { title: 'Set by', cell: (r) => link(`/configs/${encodeURIComponent(r.from.scope)}`, `${r.from.scope} v${r.from.version}`) },
        ], rows, { empty: 'No configuration targets this agent.' }),
        el('details', null, el('summary', null, 'Whole document'), json(data.doc)));
    } catch (err) {
      if (ctx.alive) replace(config, errorBox(err));
    }
  }

  async function loadCommands() {
    try {
      const page = await api.get(`/api/v1/agents/${api.seg(id)}/commands`, { limit: 15 });
      if (!ctx.alive) return;
      replace(commands,
        table([
          { title: 'Created', cell: (c) => time(c.created_at) },
          { title: 'Command', cell: (c) => link(`/commands/${c.id}`, c.name) },
          { title: 'Status', cell: (c) => badge(c.status) },
          { title: 'Exit', cell: (c) => (c.exit_code ?? '—'), class: 'num' },
          { title: 'By', cell: (c) => c.created_by },
          { title: 'Output', cell: (c) => el('code', null, (c.stdout || c.stderr || c.reason || '').slice(0, 80)), class: 'wrap' },
        ], page.data, { empty: 'No commands yet.', rowProps: (c) => ({ dataset: { commandId: c.id, status: c.status } }) }),
        page.next_cursor ? el('p', null, link(`/commands?agent_id=${encodeURIComponent(id)}`, 'All commands of this agent →')) : null);
    } catch (err) {
      if (ctx.alive) replace(commands, errorBox(err));
    }
  }

  async function loadInventory(cursor, into) {
    try {
      const page = await api.get(`/api/v1/agents/${api.seg(id)}/inventory`, { limit: 50, cursor });
      if (!ctx.alive) return;
      const rows = (into || []).concat(page.data);
      const more = page.next_cursor ? button('Load more', () => loadInventory(page.next_cursor, rows), { class: 'small' }) : null;
      replace(inventory, table([
        { title: 'Kind', cell: (i) => i.kind },
        { title: 'Key', cell: (i) => el('span', { class: 'mono' }, i.key), class: 'wrap' },
        { title: 'Attributes', cell: (i) => el('code', null, JSON.stringify(i.attrs)), class: 'wrap' },
        { title: 'Updated', cell: (i) => time(i.updated_at) },
      ], rows, { empty: 'This agent reports no inventory.' }), more);
    } catch (err) {
      if (ctx.alive) replace(inventory, errorBox(err));
    }
  }

  async function loadItems() {
    try {
      const [files, certs] = await Promise.all([api.get('/api/v1/files/assignments'), api.get('/api/v1/certs')]);
      const mine = [
        ...files.data.filter((f) => targets(f.target, agent)).slice(0, 25).map((f) => ({ kind: 'file', id: f.id, name: f.path, version: f.version, url: `/api/v1/files/assignments/${f.id}/status` })),
        ...certs.data.filter((c) => targets(c.target, agent)).slice(0, 25).map((c) => ({ kind: 'certificate', id: c.id, name: c.name, version: c.version, url: `/api/v1/certs/${c.id}/status`, notAfter: c.not_after, expiring: c.expiring })),
      ];
      const states = await Promise.all(mine.map(async (item) => {
        try {
          const { data } = await api.get(item.url);
          return (data.agents || []).find((a) => a.agent_id === id) || null;
        } catch {
          return null;
        }
      }));
      if (!ctx.alive) return;
      replace(items, table([
        { title: 'Kind', cell: (r) => r.kind },
        { title: 'Name', cell: (r) => el('span', { class: 'mono' }, r.name), class: 'wrap' },
        { title: 'Version', cell: (r) => String(r.version), class: 'num' },
        { title: 'On the agent', cell: (r) => r.state ? badge(r.state.state) : badge('pending') },
        { title: 'Detail', cell: (r) => r.state?.error ? el('span', { class: 'error-text' }, r.state.error) : (r.expiring ? badge('expiring', 'failed') : (r.state?.not_after ? time(r.state.not_after, false) : '')) },
      ], mine.map((m, i) => ({ ...m, state: states[i] })), { empty: 'No managed files or certificates target this agent.' }));
    } catch (err) {
      if (ctx.alive) replace(items, errorBox(err));
    }
  }

  function openEdit() {
    const name = input({ id: 'edit-name', value: agent.name, required: true });
    const labels = el('textarea', { id: 'edit-labels', rows: '4' }, formatLabels(agent.labels, '\n'));
    const save = el('button', { type: 'submit', class: 'primary' }, 'Save');
    const msg = el('div');
    const form = el('form', { class: 'panel', 'aria-label': 'Edit agent' },
      el('h2', null, 'Edit name and labels'), msg,
      field('Name', name),
      field('Labels', labels, 'one k=v per line; new labels retarget configuration and label-targeted commands'),
      el('div', { class: 'row' }, save, button('Cancel', () => replace(editBox))));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      let parsed;
      try {
        parsed = parseLabels(labels.value);
      } catch (err) {
        replace(msg, errorBox(err));
        return;
      }
      await busy(save, async () => {
        try {
          agent = (await api.patch(`/api/v1/agents/${api.seg(id)}`, { name: name.value.trim(), labels: parsed })).data;
          replace(editBox);
          renderHead();
          renderOverview();
          toast('Agent updated');
          loadConfig();
        } catch (err) {
          replace(msg, errorBox(err));
        }
      });
    });
    replace(editBox, form);
    name.focus();
  }

  async function revoke() {
    const reason = input({ id: 'revoke-reason', placeholder: 'why (kept in the audit log)' });
    const ok = await confirmDialog({
      title: `Revoke ${agent.name}?`,
      body: 'Its tokens stop working at once and its open connection ends. It cannot be undone: the machine must enroll again.',
      confirm: 'Revoke',
      danger: true,
      extra: field('Reason', reason),
    });
    if (!ok) return;
    try {
      agent = (await api.post(`/api/v1/agents/${api.seg(id)}/revoke`, { reason: reason.value.trim() })).data;
      renderHead();
      renderOverview();
      toast('Agent revoked');
    } catch (err) {
      toast(err.message, 'error');
    }
  }

  async function remove() {
    const ok = await confirmDialog({
      title: `Delete ${agent.name}?`,
      body: 'This revokes the agent and removes it with its commands, metrics and inventory. The audit log keeps its history.',
      confirm: 'Delete',
      danger: true,
    });
    if (!ok) return;
    try {
      await api.del(`/api/v1/agents/${api.seg(id)}`);
      toast('Agent deleted');
      ctx.go('/agents');
    } catch (err) {
      toast(err.message, 'error');
    }
  }

  range.addEventListener('change', loadCharts);

  if (!(await loadAgent())) return;
  await Promise.all([loadCharts(), loadConfig(), loadCommands(), loadInventory(), loadItems()]);

  // Live: this agent's events refresh its header; commands and configuration
  // events refresh those sections.
  const refreshAgent = debounce(() => loadAgent(), 300);
  ctx.subscribe(['agent.'], (ev) => {
    if (ev.target !== id) return;
    if (ev.action === 'agent.delete') {
      replace(editBox, alert('info', 'This agent was deleted.'));
      return;
    }
    refreshAgent();
  });
  const refreshCommands = debounce(loadCommands, 1000);
  ctx.subscribe(['command.', 'batch.cancel'], refreshCommands);
  const refreshConfig = debounce(() => {
    loadConfig();
    loadAgent();
  }, 500);
  ctx.subscribe(['config.'], refreshConfig);
  ctx.poll(() => {
    loadAgent();
    loadCommands();
  }, 4000);
  ctx.every(loadCharts, 60000);
}

/** The value at a JSON Pointer (RFC 6901). */
function pointer(doc, path) {
  if (path === '') return doc;
  let v = doc;
  for (const raw of path.split('/').slice(1)) {
    const key = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (v === null || typeof v !== 'object') return undefined;
    v = v[key];
  }
  return v;
}
