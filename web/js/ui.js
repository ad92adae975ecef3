// DOM helpers. Everything shown is built with createElement and text
// nodes: hostnames, facts, labels and command output come from agents and
// are hostile, so no string ever becomes markup.

const SVG_NS = 'http://www.w3.org/2000/svg';

function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else if (child instanceof Node) parent.appendChild(child);
    else parent.appendChild(document.createTextNode(String(child)));
  }
  return parent;
}

function applyProps(node, props, svg) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.setAttribute('class', Array.isArray(value) ? value.filter(Boolean).join(' ') : value);
    else if (key === 'text') node.textContent = String(value);
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key === 'on') for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else if (!svg && (key === 'value' || key === 'checked' || key === 'selected' || key === 'disabled')) node[key] = value;
    else if (value === true) node.setAttribute(key, '');
    else node.setAttribute(key, String(value));
  }
  return node;
}

/** el('a', {href, class, on: {click}}, 'text', child…) */
export function el(tag, props, ...children) {
  return append(applyProps(document.createElement(tag), props, false), children);
}

/** The same for SVG elements. */
export function svg(tag, props, ...children) {
  return append(applyProps(document.createElementNS(SVG_NS, tag), props, true), children);
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

export function replace(node, ...children) {
  return append(clear(node), children);
}

let fieldIds = 0;

/** A labelled form control → div.field (`cls` adds classes, `after` follows the control). */
export function field(label, input, hint, cls, after) {
  if (!input.id) input.id = `f${++fieldIds}`;
  return el('div', { class: ['field', cls] },
    el('label', { for: input.id }, label, hint ? el('span', { class: 'hint' }, ` ${hint}`) : null), input, after || null);
}

export function input(props) {
  return el('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', ...props });
}

export function select(options, props) {
  return el('select', props, options.map(([value, text]) => el('option', { value }, text)));
}

export function button(text, onClick, props) {
  return el('button', { type: 'button', ...props, on: { click: onClick } }, text);
}

/** A link inside the dashboard: `#/…`. */
export function link(route, ...children) {
  return el('a', { href: `#${route}` }, ...children);
}

const TIME_FMT = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });

export function absTime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : TIME_FMT.format(d);
}

export function relTime(iso) {
  if (!iso) return 'never';
  const d = new Date(iso).getTime();
  if (Number.isNaN(d)) return String(iso);
  const s = Math.round((Date.now() - d) / 1000);
  const future = s < 0;
  const a = Math.abs(s);
  let text;
  if (a < 5) return 'just now';
  if (a < 60) text = `${a} s`;
  else if (a < 3600) text = `${Math.round(a / 60)} min`;
  else if (a < 86400) text = `${Math.round(a / 3600)} h`;
  else text = `${Math.round(a / 86400)} d`;
  return future ? `in ${text}` : `${text} ago`;
}

/** <time> with a relative text and the absolute time on hover. */
export function time(iso, relative = true) {
  if (!iso) return el('span', { class: 'muted' }, relative ? 'never' : '—');
  return el('time', { datetime: iso, title: absTime(iso), dataset: relative ? { rel: '1' } : null }, relative ? relTime(iso) : absTime(iso));
}

export function statusDot(status) {
  return el('span', { class: 'status', dataset: { status } },
    el('span', { class: `dot ${status}`, 'aria-hidden': 'true' }),
    el('span', null, status));
}

export function badge(text, kind) {
  return el('span', { class: `badge ${kind || text}` }, text);
}

export function chips(labels) {
  const entries = Object.entries(labels || {});
  if (!entries.length) return el('span', { class: 'muted' }, '—');
  return entries.map(([k, v]) => el('span', { class: 'chip' }, `${k}=${v}`));
}

/** `k=v` pairs separated by commas or new lines → {k: v}; throws on a pair without `=`. */
export function parseLabels(text) {
  const labels = {};
  for (const raw of String(text || '').split(/[,\n]/)) {
    const pair = raw.trim();
    if (!pair) continue;
    const at = pair.indexOf('=');
    if (at <= 0) throw new Error(`"${pair}" is not a k=v label`);
    labels[pair.slice(0, at).trim()] = pair.slice(at + 1).trim();
  }
  return labels;
}

export function formatLabels(labels, sep = ', ') {
  return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(sep);
}

export function bytes(n) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return '—';
  let v = Number(n);
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

export function json(value, cls = 'light') {
  return el('pre', { class: cls }, JSON.stringify(value, null, 2));
}

/** A value for a table cell: objects as compact JSON. */
export function scalar(value) {
  if (value === null || value === undefined) return '—';
  if (typeof value === 'object') return JSON.stringify(value);
  return String(value);
}

/** A table from column specs {title, cell(row) → node|string, class}. */
export function table(columns, rows, { empty = 'Nothing here yet.', rowProps, caption, cls } = {}) {
  const tbody = el('tbody');
  for (const row of rows) {
    tbody.appendChild(tableRow(columns, row, rowProps));
  }
  if (!rows.length) {
    tbody.appendChild(el('tr', null, el('td', { class: 'empty', colspan: String(columns.length) }, empty)));
  }
  return el('div', { class: 'table-wrap' },
    el('table', { class: cls },
      caption ? el('caption', { class: 'visually-hidden' }, caption) : null,
      el('thead', null, el('tr', null, columns.map((c) => el('th', { scope: 'col', class: c.class }, c.title)))),
      tbody));
}

export function tableRow(columns, row, rowProps) {
  return el('tr', rowProps ? rowProps(row) : null, columns.map((c) => el('td', { class: c.class }, c.cell(row))));
}

/** A key/value table. */
export function kv(pairs) {
  return el('table', { class: 'kv' }, el('tbody', null, pairs.filter(Boolean).map(([k, v]) => el('tr', null, el('th', { scope: 'row' }, k), el('td', { class: 'wrap' }, v)))));
}

export function alert(kind, ...children) {
  return el('div', { class: `alert ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, ...children);
}

export function errorBox(err) {
  const id = err?.requestId ? el('span', { class: 'hint' }, ` (request ${err.requestId})`) : null;
  return alert('error', err?.message || String(err), id);
}

/** A message that goes away by itself. */
export function toast(message, kind = 'ok') {
  const box = document.getElementById('toasts');
  if (!box) return;
  const t = el('div', { class: `toast ${kind}` }, message);
  box.appendChild(t);
  setTimeout(() => t.remove(), kind === 'error' ? 8000 : 4000);
}

/** A modal confirmation: resolves true when confirmed. */
export function confirmDialog({ title, body, confirm = 'Confirm', danger = false, extra }) {
  return new Promise((resolve) => {
    const ok = el('button', { type: 'submit', class: danger ? 'danger solid' : 'primary', value: 'ok' }, confirm);
    const cancel = el('button', { type: 'submit', value: 'cancel', formnovalidate: true }, 'Cancel');
    const form = el('form', { method: 'dialog' }, el('h2', null, title), body ? el('p', null, body) : null, extra || null, el('div', { class: 'buttons' }, cancel, ok));
    const dialog = el('dialog', { 'aria-label': title }, form);
    dialog.addEventListener('close', () => {
      resolve(dialog.returnValue === 'ok');
      dialog.remove();
    });
    document.body.appendChild(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

/** A submit button that shows work in progress while `fn` runs. */
export async function busy(btn, fn) {
  const was = btn.textContent;
  btn.disabled = true;
  btn.setAttribute('aria-busy', 'true');
  try {
    return await fn();
  } finally {
    btn.disabled = false;
    btn.removeAttribute('aria-busy');
    btn.textContent = was;
  }
}

export function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

/** The page heading, focused after navigation so keyboard users start there. */
export function heading(text, ...extra) {
  return el('div', { class: 'page-head' }, el('h1', { tabindex: '-1' }, text), extra.length ? el('div', { class: 'actions' }, ...extra) : null);
}

/** A secret shown once, with a copy button. */
export function secretBox(label, value) {
  const code = el('code', { class: 'mono' }, value);
  const copy = button('Copy', async () => {
    try {
      await navigator.clipboard.writeText(value);
      toast('Copied');
    } catch {
      const range = document.createRange();
      range.selectNodeContents(code);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      toast('Selected: copy it with Ctrl+C');
    }
  }, { class: 'small' });
  return alert('info', el('p', null, el('strong', null, label), ' It is shown only this once.'), el('div', { class: 'secret' }, code, copy));
}

/** Pager for keyset pages: `stack` holds the cursors of the pages before. */
function pager({ hasPrev, hasNext, onPrev, onNext, info }) {
  return el('div', { class: 'pager' },
    info ? el('span', null, info) : null,
    button('← Previous', onPrev, { disabled: !hasPrev, class: 'small' }),
    button('Next →', onNext, { disabled: !hasNext, class: 'small' }));
}

// Previous/Next over a cursor-paged list: `state.cursor` is the page shown,
// `state.next` the server's next cursor, `state.before` the cursors of the
// pages before it; `load()` fetches `state.cursor` again.
export function cursorPager(state, load, info) {
  return pager({
    hasPrev: state.before.length > 0,
    hasNext: !!state.next,
    info,
    onPrev: () => { state.cursor = state.before.pop() || ''; load(); },
    onNext: () => { state.before.push(state.cursor); state.cursor = state.next; load(); },
  });
}

export const TERMINAL = new Set(['succeeded', 'failed', 'timed_out', 'rejected', 'cancelled', 'expired', 'lost']);
