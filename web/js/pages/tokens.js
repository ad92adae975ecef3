// Personal API tokens (any user) and enrollment tokens (operators). A new
// secret is shown once; lists never show secrets.

import * as api from '../api.js';
import { el, field, input, select, table, heading, time, badge, chips, errorBox, replace, button, busy, toast, confirmDialog, secretBox, parseLabels } from '../ui.js';

const API_LIFETIMES = [['86400', '1 day'], ['604800', '7 days'], ['2592000', '30 days'], ['7776000', '90 days'], ['31536000', '1 year'], ['', 'until revoked (capped at your own credential\'s lifetime)']];
const ENROLL_LIFETIMES = [['3600', '1 hour'], ['86400', '1 day'], ['604800', '7 days'], ['2592000', '30 days']];

function tokenState(t) {
  if (t.revoked_at) return badge('revoked');
  if (t.expires_at && new Date(t.expires_at).getTime() < Date.now()) return badge('expired');
  return badge('active', 'ok');
}

export default async function tokens(ctx) {
  const apiList = el('div');
  const apiSecret = el('div');
  const name = input({ id: 'token-name', required: true, placeholder: 'e.g. ci-deploy', maxlength: '64' });
  const lifetime = select(API_LIFETIMES, { id: 'token-lifetime' });
  lifetime.value = '2592000';
  const create = el('button', { type: 'submit', class: 'primary', id: 'token-create' }, 'Create token');
  const apiForm = el('form', { 'aria-label': 'Create an API token' },
    el('div', { class: 'row' }, field('Name', name), field('Lifetime', lifetime), el('div', { class: 'field' }, create)));
  ctx.root.append(heading('Tokens'),
    el('section', { class: 'panel', 'aria-label': 'Your API tokens' }, el('h2', null, 'Your API tokens'),
      el('p', { class: 'hint' }, 'For the CLI and scripts: TETHER_TOKEN=… tether agents. A token carries your role.'),
      apiForm, apiSecret, apiList));

  apiForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    await busy(create, async () => {
      try {
        const body = { name: name.value.trim(), expires_in_s: lifetime.value ? Number(lifetime.value) : null };
        const { data } = await api.post('/api/v1/tokens', body);
        replace(apiSecret, secretBox(`Token "${data.name}" created.`, data.token));
        name.value = '';
        loadApi();
      } catch (err) {
        replace(apiSecret, errorBox(err));
      }
    });
  });

  async function loadApi() {
    try {
      const page = await api.get('/api/v1/tokens');
      if (!ctx.alive) return;
      replace(apiList, table([
        { title: 'Name', cell: (t) => t.name },
        { title: 'State', cell: tokenState },
        { title: 'Created', cell: (t) => time(t.created_at) },
        { title: 'Expires', cell: (t) => (t.expires_at ? time(t.expires_at) : 'never') },
        {
          title: 'Actions',
          cell: (t) => (t.revoked_at ? '' : button('Revoke', async () => {
            if (!(await confirmDialog({ title: `Revoke "${t.name}"?`, body: 'Anything using it stops working at once.', confirm: 'Revoke', danger: true }))) return;
            try {
              await api.del(`/api/v1/tokens/${api.seg(t.id)}`);
              toast('Token revoked');
              loadApi();
            } catch (err) {
              toast(err.message, 'error');
            }
          }, { class: 'small danger' })),
        },
      ], page.data, { empty: 'No API tokens.' }));
    } catch (err) {
      if (ctx.alive) replace(apiList, errorBox(err));
    }
  }

  await loadApi();
  if (!ctx.can('operator')) return;

  const enrollList = el('div');
  const enrollSecret = el('div');
  const labels = input({ id: 'enroll-labels', placeholder: 'role=web, env=prod' });
  const uses = input({ id: 'enroll-uses', type: 'number', min: '1', max: '1000000', value: '1', required: true });
  const enrollLifetime = select(ENROLL_LIFETIMES, { id: 'enroll-lifetime' });
  enrollLifetime.value = '86400';
  const enrollCreate = el('button', { type: 'submit', class: 'primary', id: 'enroll-create' }, 'Create enrollment token');
  const enrollForm = el('form', { 'aria-label': 'Create an enrollment token' },
    el('div', { class: 'row' }, field('Labels', labels, '(given to agents enrolling with it)'), field('Uses', uses, null, 'narrow'), field('Valid for', enrollLifetime, null, 'narrow'), el('div', { class: 'field' }, enrollCreate)));
  ctx.root.append(el('section', { class: 'panel', 'aria-label': 'Enrollment tokens' }, el('h2', null, 'Enrollment tokens'),
    el('p', { class: 'hint' }, 'An agent started with --enroll-token enrolls itself. Agents without one can use the device flow and be approved under Device approval.'),
    enrollForm, enrollSecret, enrollList));

  enrollForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    let parsed;
    try {
      parsed = parseLabels(labels.value);
    } catch (err) {
      replace(enrollSecret, errorBox(err));
      return;
    }
    await busy(enrollCreate, async () => {
      try {
        const { data } = await api.post('/api/v1/enroll-tokens', { labels: parsed, uses: Number(uses.value), expires_in_s: Number(enrollLifetime.value) });
        replace(enrollSecret, secretBox('Enrollment token created.', data.token),
          el('p', { class: 'hint' }, 'On the machine: ', el('code', null, `tether agent --server ${window.location.origin} --enroll-token ${data.token}`)));
        loadEnroll();
      } catch (err) {
        replace(enrollSecret, errorBox(err));
      }
    });
  });

  async function loadEnroll() {
    try {
      const page = await api.get('/api/v1/enroll-tokens');
      if (!ctx.alive) return;
      const rows = page.data.slice().reverse();
      replace(enrollList, table([
        { title: 'Id', cell: (t) => el('code', null, t.id.slice(0, 8)) },
        { title: 'Labels', cell: (t) => chips(t.labels) },
        { title: 'Used', cell: (t) => `${t.used} / ${t.uses}`, class: 'num' },
        { title: 'State', cell: (t) => (t.used >= t.uses && !t.revoked_at ? badge('used up', 'expired') : tokenState(t)) },
        { title: 'Created', cell: (t) => time(t.created_at) },
        { title: 'Expires', cell: (t) => time(t.expires_at) },
        {
          title: 'Actions',
          cell: (t) => (t.revoked_at ? '' : button('Revoke', async () => {
            try {
              await api.del(`/api/v1/enroll-tokens/${api.seg(t.id)}`);
              toast('Enrollment token revoked');
              loadEnroll();
            } catch (err) {
              toast(err.message, 'error');
            }
          }, { class: 'small danger' })),
        },
      ], rows, { empty: 'No enrollment tokens.' }));
    } catch (err) {
      if (ctx.alive) replace(enrollList, errorBox(err));
    }
  }
  await loadEnroll();
}
