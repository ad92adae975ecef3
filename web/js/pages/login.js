// Sign-in: POST /api/v1/auth/login sets the session cookie (HttpOnly) and
// answers the CSRF token the dashboard sends on every change.

import * as api from '../api.js';
import { el, field, input, errorBox, replace, busy } from '../ui.js';

export default async function login(ctx) {
  const username = input({ name: 'username', autocomplete: 'username', required: true });
  const password = input({ name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const submit = el('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const message = el('div');
  const form = el('form', { class: 'panel', 'aria-labelledby': 'login-title' },
    el('h1', { id: 'login-title', tabindex: '-1' }, 'Sign in'),
    message,
    field('Username', username),
    field('Password', password),
    submit);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    replace(message);
    await busy(submit, async () => {
      try {
        const { data } = (await api.request('POST', '/api/v1/auth/login', {
          body: { username: username.value.trim(), password: password.value },
          quiet401: true,
        })).body;
        password.value = '';
        ctx.signedIn(data);
        ctx.go(ctx.query.get('next') || '/agents');
      } catch (err) {
        replace(message, errorBox(err));
        password.select();
      }
    });
  });
  ctx.root.appendChild(el('div', { class: 'login' },
    el('div', { class: 'brand-big' }, el('img', { src: '/ui/favicon.svg', alt: '', width: '40', height: '40' }), 'tether'),
    form,
    el('p', { class: 'hint' }, 'Fleet control plane. Sign in with your tether user; the API and CLI take API tokens instead.')));
  username.focus();
}
