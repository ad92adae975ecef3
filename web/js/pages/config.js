// One configuration scope: the fleet's view of it, the editor (PUT with
// If-Match so two editors never overwrite each other), the history with a
// line diff between any two versions, and rollback.

import * as api from '../api.js';
import { el, field, input, select, table, heading, time, errorBox, replace, button, busy, toast, confirmDialog, alert, json, link } from '../ui.js';
import { canonicalText, diffLines } from '../diff.js';

export default async function config(ctx) {
  const scope = ctx.params[0];
  const path = `/api/v1/configs/${api.seg(scope)}`;
  const operator = ctx.can('operator');
  const status = el('div');
  const editor = el('div');
  const history = el('div');
  const diff = el('div', { id: 'config-diff' });
  ctx.root.append(
    heading(`Scope ${scope}`, link('/configs', '← All scopes')),
    el('section', { class: 'panel', 'aria-label': 'Fleet status' }, el('h2', null, 'Fleet status'), status),
    el('section', { class: 'panel', 'aria-label': operator ? 'Edit' : 'Current document' }, el('h2', null, operator ? 'Edit' : 'Current document'), editor),
    el('section', { class: 'panel', 'aria-label': 'History' }, el('h2', null, 'History'), history, diff));

  let current = null; // the current version, or null for a new scope
  let versions = [];
  let dirty = false;

  async function loadCurrent() {
    // A scope without versions is new: asked for, it would be a 404.
    const scopes = (await api.get('/api/v1/configs')).data;
    if (!scopes.some((s) => s.scope === scope)) {
      current = null;
      return;
    }
    try {
      const res = await api.request('GET', path);
      current = { ...res.body.data, etag: res.headers.get('ETag') };
    } catch (err) {
      if (err.status !== 404) throw err;
      current = null;
    }
  }

  async function loadStatus() {
    if (!current) {
      replace(status, el('p', { class: 'muted' }, 'This scope has no version yet.'));
      return;
    }
    try {
      const { data } = await api.get(`${path}/status`);
      if (!ctx.alive) return;
      replace(status,
        el('div', { class: 'stats' }, [['targeted', data.targeted], ['applied', data.applied], ['behind', data.behind], ['failed', data.failed]].map(([k, v]) => el('div', { dataset: { stat: k } }, el('strong', null, String(v)), el('span', null, k)))),
        data.errors.length ? table([
          { title: 'Error', cell: (e) => el('span', { class: 'error-text' }, e.error), class: 'wrap' },
          { title: 'Agents', cell: (e) => String(e.agents), class: 'num' },
        ], data.errors) : null);
    } catch (err) {
      if (ctx.alive) replace(status, errorBox(err));
    }
  }

  function renderEditor() {
    dirty = false;
    if (!operator) {
      replace(editor, current ? [el('p', { class: 'hint' }, `Version ${current.version} by ${current.author}`), json(current.doc)] : el('p', { class: 'muted' }, 'No version yet.'));
      return;
    }
    const text = el('textarea', { id: 'config-doc', rows: '16', spellcheck: 'false' }, current ? JSON.stringify(current.doc, null, 2) : '{\n}');
    const comment = input({ id: 'config-comment', placeholder: 'what changes and why', maxlength: '1024' });
    const save = el('button', { type: 'submit', class: 'primary', id: 'config-save' }, current ? `Save version ${current.version + 1}` : 'Create version 1');
    const msg = el('div');
    text.addEventListener('input', () => { dirty = true; });
    const form = el('form', { 'aria-label': 'Edit the document' }, msg,
      el('p', { class: 'hint' }, current ? `Editing version ${current.version} (by ${current.author}). ` : 'New scope. ', 'The document is a JSON object.'),
      field('Document', text), field('Comment', comment), save);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      replace(msg);
      let doc;
      try {
        doc = JSON.parse(text.value);
      } catch (err) {
        replace(msg, errorBox(new Error(`Not valid JSON: ${err.message}`)));
        return;
      }
      if (!doc || typeof doc !== 'object' || Array.isArray(doc)) {
        replace(msg, errorBox(new Error('The document must be a JSON object.')));
        return;
      }
      await busy(save, async () => {
        try {
          // If-Match names the version this edit replaces; "0" creates the scope.
          const res = await api.request('PUT', path, {
            body: { doc, comment: comment.value },
            headers: { 'If-Match': current?.etag || `"${current ? current.version : 0}"` },
          });
          const w = res.body.data;
          toast(`Saved version ${w.version}; ${w.agents_changed} agent(s) told`);
          await refresh(true);
        } catch (err) {
          replace(msg, errorBox(err), err.status === 409 ? button('Load the latest version', () => refresh(true), { class: 'small' }) : null);
        }
      });
    });
    replace(editor, form);
  }

  function renderDiff(fromVersion, toVersion) {
    const a = versions.find((v) => v.version === fromVersion);
    const b = versions.find((v) => v.version === toVersion);
    if (!b) {
      replace(diff);
      return;
    }
    const lines = diffLines(a ? canonicalText(a.doc).split('\n') : [], canonicalText(b.doc).split('\n'));
    const added = lines.filter((l) => l.op === 'add').length;
    const removed = lines.filter((l) => l.op === 'del').length;
    const from = select(versions.map((v) => [String(v.version), `v${v.version}`]), { id: 'diff-from' });
    const to = select(versions.map((v) => [String(v.version), `v${v.version}`]), { id: 'diff-to' });
    from.value = a ? String(a.version) : String(versions.at(-1).version);
    to.value = String(b.version);
    const pick = () => renderDiff(Number(from.value), Number(to.value));
    from.addEventListener('change', pick);
    to.addEventListener('change', pick);
    replace(diff, el('h3', null, `Changes from ${a ? `v${a.version}` : 'nothing'} to v${b.version}`),
      el('div', { class: 'row' }, field('From', from, null, 'narrow'), field('To', to, null, 'narrow'),
        el('p', { class: 'hint', dataset: { added: String(added), removed: String(removed) } }, `+${added} −${removed} lines`)),
      el('div', { class: 'diff', role: 'region', 'aria-label': 'Line diff', tabindex: '0' },
        lines.map((l) => el('div', { class: l.op }, l.line))));
  }

  async function loadHistory() {
    if (!current) {
      versions = [];
      replace(history, el('p', { class: 'muted' }, 'No versions yet.'));
      replace(diff);
      return;
    }
    try {
      const page = await api.get(`${path}/history`, { limit: 100 });
      if (!ctx.alive) return;
      versions = page.data;
    } catch (err) {
      if (err.status === 404) versions = [];
      else throw err;
    }
    const latest = versions[0]?.version;
    replace(history, table([
      { title: 'Version', cell: (v) => `v${v.version}`, class: 'num' },
      { title: 'Author', cell: (v) => v.author },
      { title: 'When', cell: (v) => time(v.created_at) },
      { title: 'Comment', cell: (v) => v.comment || el('span', { class: 'muted' }, '—'), class: 'wrap' },
      { title: 'Hash', cell: (v) => el('code', null, v.hash.slice(0, 12)) },
      {
        title: 'Actions',
        cell: (v) => [
          button('Diff', () => renderDiff(previous(v.version), v.version), { class: 'small', 'aria-label': `Diff version ${v.version} with the one before` }),
          operator && v.version !== latest ? button('Roll back', () => rollback(v.version), { class: 'small danger', 'aria-label': `Roll back to version ${v.version}` }) : null,
        ],
      },
    ], versions, { empty: 'No versions yet.', rowProps: (v) => ({ dataset: { version: String(v.version) } }) }));
    if (versions.length) renderDiff(previous(versions[0].version), versions[0].version);
    else replace(diff);
  }

  function previous(version) {
    const older = versions.filter((v) => v.version < version);
    return older.length ? older[0].version : null;
  }

  async function rollback(version) {
    const ok = await confirmDialog({ title: `Roll back to version ${version}?`, body: 'This writes a new version whose document is that version\'s; history is kept.', confirm: 'Roll back', danger: true });
    if (!ok) return;
    try {
      const { data } = await api.post(`${path}/rollback`, { version });
      toast(`Rolled back: version ${data.version}`);
      await refresh(true);
    } catch (err) {
      toast(err.message, 'error');
    }
  }

  async function refresh(resetEditor) {
    await loadCurrent();
    if (!ctx.alive) return;
    if (resetEditor || !dirty) renderEditor();
    else editor.prepend(alert('info', 'A newer version was saved meanwhile; saving now will be refused. Copy your changes, then reload.'));
    await Promise.all([loadStatus(), loadHistory()]);
  }

  await refresh(true);
  ctx.subscribe(['config.put', 'config.rollback'], (ev) => {
    if (ev.target === scope && (!current || Number(current.version) < Number(ev.details?.version ?? Infinity))) refresh(false);
  });
  ctx.poll(() => loadStatus(), 10000);
}
