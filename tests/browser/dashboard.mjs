// The dashboard in real headless Chromium, against a real tether server
// started by crates/tether/tests/e2e/dashboard.rs (see its docs for the
// environment it passes). Prints only timing lines; exits non-zero with a
// message on the first failed check, a console error or a page error.
//
//   TETHER_URL          the server, e.g. http://127.0.0.1:PORT
//   ADMIN_USER/PASS     an admin's credentials
//   VIEWER_USER/PASS    a viewer's credentials            (full run)
//   AGENT_ID, AGENT_PID a real agent process to stop       (full run)
//   AGENT_NAME          its name, to search for            (full run)
//   PERF_AGENTS         number of agents in the database   (perf run: only timings)
//   SCREENSHOT_DIR      where each page's screenshot goes

import { chromium } from 'playwright-core';
import { generateKeyPairSync } from 'node:crypto';
import { mkdirSync, appendFileSync } from 'node:fs';
import { join } from 'node:path';

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const BASE = env('TETHER_URL');
const SHOTS = env('SCREENSHOT_DIR');
mkdirSync(SHOTS, { recursive: true });

const HOSTILE = '<img src=x onerror=alert(1)>browser-test-device';
const problems = [];
function watch(page, who) {
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`${who}: console error: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`${who}: page error: ${e.message}`));
  // Names the request behind a "Failed to load resource" console error.
  page.on('response', (r) => {
    if (r.status() >= 400) problems.push(`${who}: (HTTP ${r.status()} from ${r.request().method()} ${r.url()})`);
  });
  page.on('dialog', (d) => problems.push(`${who}: unexpected native dialog: ${d.message()}`));
}

function check(cond, what) {
  if (!cond) throw new Error(what);
}

function timing(line) {
  console.log(line);
  appendFileSync(join(SHOTS, 'timings.txt'), `${new Date().toISOString()} ${line}\n`);
}

async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

async function login(page, user, pass) {
  await page.goto(`${BASE}/ui/`);
  await page.waitForSelector('#login-title');
  await page.fill('input[name=username]', user);
  await page.fill('input[name=password]', pass);
  await page.click('form button[type=submit]');
  await page.waitForSelector('table.agents');
}

/** Runs `fn(page)`, naming the step in the error it may throw. */
async function step(name, fn) {
  try {
    await fn();
  } catch (err) {
    err.message = `${name}: ${err.message}`;
    throw err;
  }
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

try {
  if (process.env.PERF_AGENTS) await perf(Number(process.env.PERF_AGENTS));
  else await full();
  check(problems.length === 0, `the browser reported problems:\n${problems.join('\n')}`);
} catch (err) {
  console.error(`FAILED ${err.message}`);
  if (problems.length) console.error(`browser problems:\n${problems.join('\n')}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}

async function full() {
  const agentId = env('AGENT_ID');
  const agentName = env('AGENT_NAME');
  const context = await browser.newContext({ viewport: { width: 1300, height: 900 } });
  const page = await context.newPage();
  watch(page, 'admin');
  page.setDefaultTimeout(15000);

  await step('login', async () => {
    await page.goto(`${BASE}/ui/`);
    await page.waitForSelector('#login-title');
    await shot(page, '01-login');
    await page.fill('input[name=username]', env('ADMIN_USER'));
    await page.fill('input[name=password]', env('ADMIN_PASS'));
    await page.click('form button[type=submit]');
    await page.waitForSelector('table.agents');
    check((await page.textContent('#who')).includes(env('ADMIN_USER')), 'the header names the signed-in user');
  });

  await step('a reload keeps the session', async () => {
    await page.reload();
    await page.waitForSelector('table.agents');
    check(await page.isVisible('#logout'), 'still signed in after a reload');
  });

  const row = `table.agents tr[data-agent-id="${agentId}"]`;
  await step('find the agent by search', async () => {
    await page.fill('#agents-q', agentName);
    await page.waitForSelector(row);
    await page.waitForFunction(() => document.querySelectorAll('table.agents tbody tr').length === 1);
    await page.waitForSelector(`${row}[data-status="online"]`, { timeout: 30000 });
    await shot(page, '02-agents');
  });

  await step('open the agent', async () => {
    await page.click(`${row} a`);
    await page.waitForSelector('#agent-status');
    check((await page.textContent('main h1')) === agentName, 'the detail page is the agent');
    await page.waitForSelector('section[aria-label="Effective configuration"] table');
    await shot(page, '03-agent');
  });

  await step('run ping from the run-command form', async () => {
    await page.click('a.button:has-text("Run command")');
    await page.waitForSelector(`#run-chosen [data-agent-id="${agentId}"]`);
    // A marker a reload would lose: results must arrive without one.
    await page.evaluate(() => { window.__noReload = true; });
    await page.fill('#run-name', 'ping');
    await page.click('#run-submit');
    await page.waitForSelector('#run-results tr[data-status="succeeded"]', { timeout: 30000 });
    const out = await page.textContent('#run-results tr[data-status="succeeded"]');
    check(out.includes('pong'), `the result shows pong: ${out}`);
    check(await page.evaluate(() => window.__noReload === true), 'the page was not reloaded');
    await shot(page, '04-run');
  });

  await step('edit a configuration scope and see the diff', async () => {
    await page.click('#nav a[href="#/configs"]');
    await page.waitForSelector('#scope-open');
    await page.selectOption('#scope-kind', 'label');
    await page.fill('#scope-value', 'role=dashboard');
    await page.click('#scope-open');
    await page.waitForSelector('#config-save');
    await page.fill('#config-doc', JSON.stringify({ app: { greeting: 'hello', workers: 2 } }, null, 2));
    await page.fill('#config-comment', 'first version');
    await page.click('#config-save');
    await page.waitForSelector('tr[data-version="1"]');
    await page.waitForSelector('#config-save:has-text("Save version 2")');
    await page.fill('#config-doc', JSON.stringify({ app: { greeting: 'hello', workers: 4 } }, null, 2));
    await page.fill('#config-comment', 'more workers');
    await page.click('#config-save');
    await page.waitForSelector('tr[data-version="2"]');
    await page.waitForSelector('#config-diff .diff .add');
    const added = await page.$$eval('#config-diff .diff .add', (n) => n.map((x) => x.textContent));
    const removed = await page.$$eval('#config-diff .diff .del', (n) => n.map((x) => x.textContent));
    check(added.length === 1 && added[0].includes('"workers": 4'), `the diff adds workers 4: ${added}`);
    check(removed.length === 1 && removed[0].includes('"workers": 2'), `the diff removes workers 2: ${removed}`);
    await shot(page, '05-config');
  });

  await step('approve a device flow in the dashboard', async () => {
    const { publicKey } = generateKeyPairSync('ed25519');
    const key = publicKey.export({ format: 'jwk' }).x;
    const res = await fetch(`${BASE}/oauth/device_authorization`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
      // Agents' data is hostile: markup in a hostname must show as text.
      body: new URLSearchParams({ client_id: 'tether-agent', public_key: key, hostname: HOSTILE }),
    });
    check(res.ok, `device authorization: HTTP ${res.status}`);
    const grant = await res.json();
    await page.click('#nav a[href="#/device"]');
    await page.waitForSelector('#device-code');
    await page.fill('#device-code', grant.user_code);
    await page.fill('#device-labels', 'via=dashboard');
    await page.click('#device-approve');
    await page.waitForSelector('[data-decision="approved"]');
    check((await page.textContent('#device-result')).includes(HOSTILE), 'the result names the device, as text');
    await shot(page, '06-device');
    const token = await fetch(`${BASE}/oauth/token`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({ grant_type: 'urn:ietf:params:oauth:grant-type:device_code', device_code: grant.device_code, client_id: 'tether-agent' }),
    });
    const body = await token.json();
    check(token.ok && body.access_token, `the approved device gets its tokens: ${JSON.stringify(body.error || token.status)}`);
    await page.click('#nav a[href="#/agents"]');
    await page.fill('#agents-q', 'browser-test-device');
    await page.waitForSelector(`table.agents tr[data-agent-id="${body.agent_id}"]`);
    check((await page.textContent(`table.agents tr[data-agent-id="${body.agent_id}"]`)).includes(HOSTILE), 'the hostname shows as text');
    check(await page.$('table.agents img') === null, 'no markup from the hostname reached the page');
  });

  await step('the other pages render', async () => {
    for (const [name, route, selector] of [['07-commands', '/commands', 'main table'], ['08-audit', '/audit', 'main table'], ['09-tokens', '/tokens', '#enroll-create'], ['10-users', '/users', '#user-create']]) {
      await page.click(`#nav a[href="#${route}"]`);
      await page.waitForSelector(selector);
      await shot(page, name);
    }
  });

  await step('a stopped agent turns offline', async () => {
    await page.click('#nav a[href="#/agents"]');
    await page.fill('#agents-q', agentName);
    await page.waitForSelector(`${row}[data-status="online"]`);
    const started = Date.now();
    process.kill(Number(env('AGENT_PID')), 'SIGTERM');
    try {
      await page.waitForSelector(`${row}[data-status="offline"]`, { timeout: 10000 });
    } catch {
      throw new Error('the agent did not show offline within 10 s of its process stopping');
    }
    const seconds = (Date.now() - started) / 1000;
    timing(`dashboard: agent shown offline ${seconds.toFixed(1)} s after SIGTERM (live: ${await page.textContent('#live')})`);
    await shot(page, '11-agent-offline');
  });

  await step('sign out', async () => {
    await page.click('#logout');
    await page.waitForSelector('#login-title');
  });
  await context.close();

  await step('a viewer sees no mutating controls', async () => {
    const viewer = await browser.newContext({ viewport: { width: 1300, height: 900 } });
    const vpage = await viewer.newPage();
    watch(vpage, 'viewer');
    vpage.setDefaultTimeout(15000);
    await login(vpage, env('VIEWER_USER'), env('VIEWER_PASS'));
    const nav = await vpage.$$eval('#nav a', (n) => n.map((a) => a.textContent));
    for (const hidden of ['Run command', 'Device approval', 'Users']) check(!nav.includes(hidden), `the viewer's menu has no ${hidden}: ${nav}`);
    const forbidden = /^(Run|Run command|Edit name and labels|Revoke|Delete|Roll back|Cancel|Cancel batch|Cancel the rest|Approve|Deny|Enroll agents|Open|Create user|Create enrollment token|Save version \d+|Create version 1|Set password)$/;
    const pages = [
      ['12-viewer-agents', '/agents', 'table.agents'],
      ['13-viewer-agent', `/agents/${agentId}`, '#agent-status'],
      ['14-viewer-commands', '/commands', 'main table'],
      ['15-viewer-configs', '/configs', 'main table'],
      ['16-viewer-config', `/configs/${encodeURIComponent('label:role=dashboard')}`, 'tr[data-version="2"]'],
      ['17-viewer-tokens', '/tokens', '#token-create'],
    ];
    for (const [name, route, selector] of pages) {
      await vpage.goto(`${BASE}/ui/#${route}`);
      await vpage.waitForSelector(selector);
      await vpage.waitForLoadState('networkidle');
      const controls = await vpage.$$eval('main button, main a.button, main textarea, main select[aria-label^="Role of"]', (n) =>
        n.filter((x) => x.offsetParent !== null).map((x) => (x.tagName === 'TEXTAREA' ? 'textarea' : x.textContent.trim())));
      const bad = controls.filter((t) => forbidden.test(t) || t === 'textarea');
      check(bad.length === 0, `${route} shows the viewer mutating controls: ${bad}`);
      await shot(vpage, name);
    }
    // The API refuses them anyway, with the viewer's own session and CSRF token.
    const session = await (await viewer.request.get(`${BASE}/api/v1/auth/session`)).json();
    check(session.data.user.role === 'viewer' && session.data.csrf_token, 'the session endpoint names the viewer and its CSRF token');
    const refused = await viewer.request.post(`${BASE}/api/v1/commands`, {
      headers: { 'X-CSRF-Token': session.data.csrf_token },
      data: { target: { agents: [agentId] }, name: 'ping' },
    });
    check(refused.status() === 403, `a viewer's command is refused with 403, got ${refused.status()}`);
    const relabel = await viewer.request.patch(`${BASE}/api/v1/agents/${agentId}`, {
      headers: { 'X-CSRF-Token': session.data.csrf_token },
      data: { labels: { owned: 'by-viewer' } },
    });
    check(relabel.status() === 403, `a viewer's relabel is refused with 403, got ${relabel.status()}`);
    await viewer.close();
  });
}

async function perf(count) {
  const context = await browser.newContext({ viewport: { width: 1300, height: 900 } });
  const page = await context.newPage();
  watch(page, 'perf');
  page.setDefaultTimeout(30000);
  await login(page, env('ADMIN_USER'), env('ADMIN_PASS'));

  // Navigation → first table of agents on screen, on a fresh page load.
  const paints = [];
  for (let i = 0; i < 3; i++) {
    await page.goto('about:blank');
    await page.goto(`${BASE}/ui/#/agents`);
    await page.waitForFunction(() => performance.getEntriesByName('agents-rendered').length > 0);
    paints.push(await page.evaluate(() => performance.getEntriesByName('agents-rendered')[0].startTime));
  }
  await page.waitForSelector('table.agents tbody tr[data-agent-id]');
  const rows = await page.$$eval('table.agents tbody tr[data-agent-id]', (n) => n.length);
  check(rows === 50, `the first page shows 50 agents, not ${rows}`);
  await shot(page, '20-perf-agents');

  /** In-page time from a change of `selector` to the table rendered again. */
  const change = (selector, value, eventName) => page.evaluate(([sel, val, ev]) => new Promise((resolve) => {
    const node = document.querySelector(sel);
    const t0 = performance.now();
    window.addEventListener('tether:agents-rendered', (e) => resolve({ ms: performance.now() - t0, rows: e.detail.rows }), { once: true });
    node.value = val;
    node.dispatchEvent(new Event(ev, { bubbles: true }));
  }), [selector, value, eventName]);

  const status = await change('#agents-status', 'offline', 'change');
  check(status.rows === 50, `status=offline shows a full page, not ${status.rows}`);
  const back = await change('#agents-status', '', 'change');
  const search = await change('#agents-q', 'perf-09999', 'input');
  check(search.rows === 1, `the search finds one agent, not ${search.rows}`);
  const cleared = await change('#agents-q', '', 'input');
  const label = await change('#agents-label', 'rack=r7', 'input');
  check(label.rows === 50, `the label filter shows a full page, not ${label.rows}`);
  await shot(page, '21-perf-filtered');
  const median = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  timing(`dashboard: ${count} agents: agents page first paint (navigation → table rendered) ${median(paints).toFixed(0)} ms (median of ${paints.map((p) => p.toFixed(0)).join(', ')})`);
  timing(`dashboard: ${count} agents: filter change status=offline → table updated ${status.ms.toFixed(0)} ms; back to any ${back.ms.toFixed(0)} ms`);
  timing(`dashboard: ${count} agents: typed search "perf-09999" → table updated ${search.ms.toFixed(0)} ms, label rack=r7 ${label.ms.toFixed(0)} ms, cleared ${cleared.ms.toFixed(0)} ms (each incl. the 200 ms typing debounce)`);
  await context.close();
}
