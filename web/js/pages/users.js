// Users (admins only): create, change role, set a password, delete.

import * as api from '../api.js';
import { el, field, input, select, table, heading, time, badge, errorBox, replace, button, busy, toast, confirmDialog } from '../ui.js';

const ROLES = [['viewer', 'viewer (read-only)'], ['operator', 'operator (commands, enrollment, devices)'], ['admin', 'admin (everything, users too)']];

export default async function users(ctx) {
  const list = el('div');
  const msg = el('div');
  const username = input({ id: 'user-name', required: true, autocomplete: 'off', maxlength: '64' });
  const password = input({ id: 'user-password', type: 'password', required: true, minlength: '12', autocomplete: 'new-password' });
  const role = select(ROLES, { id: 'user-role' });
  const create = el('button', { type: 'submit', class: 'primary', id: 'user-create' }, 'Create user');
  const form = el('form', { 'aria-label': 'Create a user' },
    el('div', { class: 'row' }, field('Username', username), field('Password', password, '(12+ characters)'), field('Role', role), el('div', { class: 'field' }, create)));
  ctx.root.append(heading('Users'), el('section', { class: 'panel', 'aria-label': 'New user' }, el('h2', null, 'New user'), form, msg), el('section', { class: 'panel', 'aria-label': 'All users' }, list));

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    await busy(create, async () => {
      try {
        await api.post('/api/v1/users', { username: username.value.trim(), password: password.value, role: role.value });
        toast(`User ${username.value.trim()} created`);
        username.value = '';
        password.value = '';
        replace(msg);
        load();
      } catch (err) {
        replace(msg, errorBox(err));
      }
    });
  });

  async function update(u, body, done) {
    try {
      await api.patch(`/api/v1/users/${api.seg(u.id)}`, body);
      toast(done);
    } catch (err) {
      toast(err.message, 'error');
    }
    load();
  }

  async function load() {
    try {
      const page = await api.get('/api/v1/users');
      if (!ctx.alive) return;
      replace(list, table([
        { title: 'Username', cell: (u) => [u.username, u.username === ctx.user.username ? el('span', { class: 'muted' }, ' (you)') : null] },
        {
          title: 'Role',
          cell: (u) => {
            if (u.disabled || u.username === ctx.user.username) return u.role;
            const s = select(ROLES.map(([v]) => [v, v]), { 'aria-label': `Role of ${u.username}` });
            s.value = u.role;
            s.addEventListener('change', () => update(u, { role: s.value }, `${u.username} is now ${s.value}`));
            return s;
          },
        },
        { title: 'Created', cell: (u) => time(u.created_at) },
        { title: 'State', cell: (u) => (u.disabled ? badge('disabled', 'revoked') : badge('active', 'ok')) },
        {
          title: 'Actions',
          cell: (u) => (u.disabled ? '' : [
            button('Set password', async () => {
              const pw = input({ type: 'password', minlength: '12', autocomplete: 'new-password' });
              const ok = await confirmDialog({ title: `New password for ${u.username}`, body: 'Their sessions and password-made tokens end.', confirm: 'Set password', extra: field('New password', pw) });
              if (ok) update(u, { password: pw.value }, 'Password changed');
            }, { class: 'small' }),
            ' ',
            u.username === ctx.user.username ? null : button('Delete', async () => {
              if (!(await confirmDialog({ title: `Delete ${u.username}?`, body: 'The user is disabled and their tokens revoked. Audit rows stay.', confirm: 'Delete', danger: true }))) return;
              try {
                await api.del(`/api/v1/users/${api.seg(u.id)}`);
                toast('User deleted');
              } catch (err) {
                toast(err.message, 'error');
              }
              load();
            }, { class: 'small danger' }),
          ]),
        },
      ], page.data, { empty: 'No users.' }));
    } catch (err) {
      if (ctx.alive) replace(list, errorBox(err));
    }
  }
  await load();
}
