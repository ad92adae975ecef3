// Configuration scopes and their current versions; a new scope is made by
// opening its page and saving a first version.

import * as api from '../api.js';
import { el, field, input, select, table, link, heading, time, errorBox, replace, debounce } from '../ui.js';

export default async function configs(ctx) {
  const list = el('div');
  const parts = [heading('Configuration'), el('p', { class: 'sub' }, 'Agents run the merge of global, their label scopes and their own scope, later ones winning key by key.')];
  if (ctx.can('operator')) {
    const kind = select([['global', 'global'], ['label', 'label:KEY=VALUE'], ['agent', 'agent:AGENT_ID']], { id: 'scope-kind' });
    const value = input({ id: 'scope-value', placeholder: 'role=web', disabled: true });
    const msg = el('div');
    kind.addEventListener('change', () => {
      value.disabled = kind.value === 'global';
      value.placeholder = kind.value === 'agent' ? 'agent id' : 'role=web';
    });
    const form = el('form', { class: 'panel', 'aria-label': 'Open or create a scope' },
      el('h2', null, 'Open or create a scope'), msg,
      el('div', { class: 'row' }, field('Scope kind', kind, null, 'narrow'), field('Value', value),
        el('div', { class: 'field' }, el('button', { type: 'submit', class: 'primary', id: 'scope-open' }, 'Open'))));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const v = value.value.trim();
      if (kind.value !== 'global' && !v) {
        replace(msg, errorBox(new Error('Give the label pair or the agent id.')));
        return;
      }
      ctx.go(`/configs/${encodeURIComponent(kind.value === 'global' ? 'global' : `${kind.value}:${v}`)}`);
    });
    parts.push(form);
  }
  ctx.root.append(...parts, el('section', { class: 'panel', 'aria-label': 'Scopes' }, el('h2', null, 'Scopes'), list));

  async function load() {
    try {
      const page = await api.get('/api/v1/configs');
      if (!ctx.alive) return;
      replace(list, table([
        { title: 'Scope', cell: (s) => link(`/configs/${encodeURIComponent(s.scope)}`, el('code', null, s.scope)) },
        { title: 'Version', cell: (s) => String(s.version), class: 'num' },
        { title: 'Hash', cell: (s) => el('code', null, s.hash.slice(0, 12)) },
        { title: 'Updated by', cell: (s) => s.updated_by },
        { title: 'Updated', cell: (s) => time(s.updated_at) },
      ], page.data, { empty: 'No configuration yet.', rowProps: (s) => ({ dataset: { scope: s.scope } }) }));
    } catch (err) {
      if (ctx.alive) replace(list, errorBox(err));
    }
  }
  await load();
  ctx.subscribe(['config.'], debounce(load, 300));
  ctx.poll(load, 10000);
}
