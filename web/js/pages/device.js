// Device approval (RFC 8628): an agent printed a user code; an operator
// types it here with the labels the new agent gets, then approves or denies.

import * as api from '../api.js';
import { el, field, input, heading, kv, time, chips, badge, errorBox, replace, busy, parseLabels, alert } from '../ui.js';

export default async function device(ctx) {
  const code = input({ id: 'device-code', placeholder: 'XXXX-XXXX', required: true, autocapitalize: 'characters', value: ctx.query.get('user_code') || '' });
  const labels = input({ id: 'device-labels', placeholder: 'role=web, env=prod' });
  const approve = el('button', { type: 'submit', class: 'primary', id: 'device-approve', value: 'approve' }, 'Approve');
  const deny = el('button', { type: 'submit', class: 'danger', id: 'device-deny', value: 'deny' }, 'Deny');
  const result = el('div', { id: 'device-result', 'aria-live': 'polite' });
  const form = el('form', { class: 'panel', 'aria-label': 'Approve a device' },
    el('p', null, 'Enter the code the agent printed. Approve only a machine you are enrolling; the agent also printed its key fingerprint, which the result below shows for comparison.'),
    el('div', { class: 'row' }, field('User code', code, null, 'narrow'), field('Labels', labels, '(k=v, … given to the new agent)')),
    el('div', { class: 'row' }, approve, deny));
  ctx.root.append(heading('Device approval'), form, result);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const decision = ev.submitter?.value === 'deny' ? 'deny' : 'approve';
    const btn = decision === 'deny' ? deny : approve;
    replace(result);
    let parsed;
    try {
      parsed = parseLabels(labels.value);
    } catch (err) {
      replace(result, errorBox(err));
      return;
    }
    await busy(btn, async () => {
      try {
        const body = decision === 'approve' ? { user_code: code.value.trim(), labels: parsed } : { user_code: code.value.trim() };
        const { data } = await api.post(`/api/v1/device/${decision}`, body);
        replace(result, el('section', { class: 'panel', 'aria-label': 'Decision', dataset: { decision: data.approved ? 'approved' : 'denied' } },
          alert(data.approved ? 'ok' : 'info', data.approved ? 'Approved: the agent finishes enrolling within seconds.' : 'Denied: the agent is told to stop asking.'),
          kv([
            ['Decision', badge(data.approved ? 'approved' : 'denied', data.approved ? 'ok' : 'denied')],
            ['User code', el('code', null, data.user_code)],
            ['Hostname', el('span', { class: 'mono' }, data.hostname)],
            ['Key fingerprint', el('code', null, data.key_fingerprint)],
            ['Requested from', data.requested_ip || 'unknown'],
            ['Requested', time(data.requested_at, false)],
            ['Labels', chips(data.labels)],
          ])));
        code.value = '';
      } catch (err) {
        replace(result, errorBox(err));
      }
    });
  });
  code.focus();
}
