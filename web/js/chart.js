// Line charts as inline SVG, built with DOM calls (no library, no markup
// strings): one or more series of {ts_ms, value} over a time range.

import { el, svg } from './ui.js';

// A viewBox near the size a chart is shown at, so its text stays legible.
const W = 440;
const H = 170;
const PAD = { left: 56, right: 12, top: 10, bottom: 22 };

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

const HM = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const DM = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });

/**
 * chart({title, series: [{name, points: [{ts_ms, value}]}], from, to, format, max})
 * → a div.chart holding the SVG, or a note when there is nothing to draw.
 */
export function lineChart({ title, series, from, to, format = (v) => String(v), max }) {
  const drawn = series.filter((s) => s.points.length);
  const all = drawn.flatMap((s) => s.points.map((p) => p.value));
  const last = drawn[0]?.points.at(-1)?.value;
  const head = el('h3', null, el('span', null, title), el('span', { class: 'muted' }, last === undefined ? '' : `now ${format(last)}`));
  if (!all.length) return el('div', { class: 'chart', dataset: { chart: title } }, head, el('p', { class: 'muted' }, 'No data in this range.'));

  const top = max ?? niceMax(Math.max(...all));
  const x = (t) => PAD.left + ((t - from) / Math.max(1, to - from)) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (Math.min(v, top) / top) * (H - PAD.top - PAD.bottom);
  const lo = Math.min(...all);
  const hi = Math.max(...all);
  const root = svg('svg', {
    viewBox: `0 0 ${W} ${H}`,
    role: 'img',
    'aria-label': `${title}: ${drawn.map((s) => s.name).join(', ')}; minimum ${format(lo)}, maximum ${format(hi)}${last === undefined ? '' : `, latest ${format(last)}`}`,
  });
  // Horizontal grid and the y scale.
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    root.appendChild(svg('line', { class: i === 0 ? 'axis' : 'grid-line', x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    root.appendChild(svg('text', { class: 'tick', x: PAD.left - 6, y: y(v) + 3, 'text-anchor': 'end' }, format(v)));
  }
  // Time ticks.
  const span = to - from;
  const fmt = span > 2 * 86400000 ? DM : HM;
  for (let i = 0; i <= 4; i++) {
    const t = from + (span * i) / 4;
    root.appendChild(svg('text', { class: 'tick', x: x(t), y: H - 6, 'text-anchor': i === 0 ? 'start' : i === 4 ? 'end' : 'middle' }, fmt.format(new Date(t))));
  }
  drawn.forEach((s, i) => {
    const pts = s.points.map((p) => `${x(p.ts_ms).toFixed(1)},${y(p.value).toFixed(1)}`);
    if (i === 0 && s.points.length > 1) {
      const base = H - PAD.bottom;
      root.appendChild(svg('polygon', { class: 'area', points: `${x(s.points[0].ts_ms).toFixed(1)},${base} ${pts.join(' ')} ${x(s.points.at(-1).ts_ms).toFixed(1)},${base}` }));
    }
    const line = svg('polyline', { class: `line s${i % 4}`, points: pts.join(' ') }, svg('title', null, s.name));
    root.appendChild(line);
    if (s.points.length === 1) root.appendChild(svg('circle', { class: `line s${i % 4}`, cx: x(s.points[0].ts_ms), cy: y(s.points[0].value), r: 2.5 }));
  });
  const legend = drawn.length > 1
    ? el('p', { class: 'legend' }, drawn.map((s, i) => el('span', null, el('span', { class: `swatch s${i % 4}`, 'aria-hidden': 'true' }), s.name)))
    : null;
  return el('div', { class: 'chart', dataset: { chart: title } }, head, root, legend);
}
