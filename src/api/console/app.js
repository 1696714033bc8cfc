// The operator console: drives the admin API with the key typed in. Every
// value from the server is put in the page as text (never as HTML).
'use strict';

const KEY = 'imagentx.console.key';
const LIVE_EVERY_MS = 2000;
const STATS_EVERY_MS = 10000;
const SVG = 'http://www.w3.org/2000/svg';
// Where the API is: the console's own path less `console` (so it also works behind a prefix).
const ROOT = location.pathname.replace(/console\/?$/, '');

const $ = (selector, root = document) => root.querySelector(selector);

/** An element with attributes and children (strings become text). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') node.addEventListener(name.slice(2), value);
    else if (name === 'class') node.className = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// ---- formatting -------------------------------------------------------------

const number = new Intl.NumberFormat();
function count(n) { return n === null || n === undefined ? '–' : number.format(n); }
function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n >= 100 || i === 0 ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}
function ms(n) {
  if (n === null || n === undefined) return '–';
  if (n < 1) return `${n.toFixed(2)} ms`;
  if (n < 1000) return `${n < 10 ? n.toFixed(1) : Math.round(n)} ms`;
  return `${(n / 1000).toFixed(n < 10000 ? 2 : 1)} s`;
}
function when(rfc3339) {
  if (!rfc3339) return '–';
  const d = new Date(rfc3339);
  return Number.isNaN(d.getTime()) ? rfc3339 : d.toLocaleString();
}
function percent(part, whole) { return whole > 0 ? Math.min(100, (100 * part) / whole) : 0; }

// ---- the API ----------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** An answer that came back after the view changed or the console signed out: dropped. */
class Superseded extends Error {}

// Each view switch, window change and sign-out starts a new generation: the
// requests of the previous one are aborted, and whatever they answer is dropped.
let generation = 0;
let inFlight = new AbortController();
function newGeneration() {
  generation += 1;
  inFlight.abort();
  inFlight = new AbortController();
}

async function api(method, path, body) {
  const mine = generation;
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ''}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let response;
  let data = null;
  try {
    response = await fetch(ROOT + path.replace(/^\//, ''), {
      method, headers, cache: 'no-store', signal: inFlight.signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    try { data = await response.json(); } catch (_) { /* not JSON: the status says it */ }
  } catch (e) {
    if (mine !== generation) throw new Superseded();
    throw new ApiFailure(0, 'unreachable', `the server did not answer (${e.message})`);
  }
  if (mine !== generation) throw new Superseded();
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiFailure(response.status, error.code || 'error', error.message || response.statusText);
  }
  problem('');
  return data;
}

function problem(text) {
  const p = $('#problem');
  p.textContent = text || '';
  p.hidden = !text;
}

/** Shows a failed request; a key that stopped working signs the console out. */
function failed(e) {
  if (e instanceof Superseded) return;
  if (e instanceof ApiFailure && e.status === 401) {
    signOut(`Signed out: the server no longer accepts this key (${e.message}).`);
  } else if (e instanceof ApiFailure && e.status === 403) {
    signOut(`Signed out: ${e.message} (403).`);
  } else {
    problem(e instanceof ApiFailure ? `${e.status || ''} ${e.message}`.trim() : String(e));
  }
}

// ---- signing in ---------------------------------------------------------------

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  let me;
  try {
    me = await api('GET', '/v1/me');
  } catch (e) {
    sessionStorage.removeItem(KEY);
    const why = e.status === 401 ? 'This key is not valid (401).' : `${e.status || ''} ${e.message}`.trim();
    $('#sign-in-error').textContent = why;
    return;
  }
  if (!me.admin) {
    sessionStorage.removeItem(KEY);
    $('#sign-in-error').textContent =
      `403: the key of user ${me.user} is not an admin's; the console needs an admin key.`;
    return;
  }
  $('#sign-in-error').textContent = '';
  $('#key').value = '';
  started(me);
}

function started(me) {
  $('#sign-in').hidden = true;
  $('#nav').hidden = false;
  $('#who').hidden = false;
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || 'local time';
  $('#who').textContent = `signed in as ${me.user} · times in ${zone}`;
  $('#sign-out').hidden = false;
  // Setting the hash routes (hashchange); routing here too would load everything twice.
  if (!location.hash) location.hash = '#overview';
  else route();
}

function signOut(why) {
  sessionStorage.removeItem(KEY);
  newGeneration();
  stopTimers();
  for (const dialog of document.querySelectorAll('dialog[open]')) dialog.close();
  for (const view of document.querySelectorAll('.view')) view.hidden = true;
  // Nothing of what was shown stays in the page.
  const shown = '.view tbody, .view .cards, .chart, #anomaly-list, #warm, #user-title, #user-actions, '
    + '#record-title, #record-body, #suspend-name, #suspend-error, #updated, #who';
  for (const node of document.querySelectorAll(shown)) node.replaceChildren();
  for (const form of document.querySelectorAll('form')) form.reset();
  auditQuery = null;
  auditBefore = null;
  suspending = null;
  $('#nav').hidden = true;
  $('#who').hidden = true;
  $('#sign-out').hidden = true;
  $('#sign-in').hidden = false;
  $('#sign-in-error').textContent = why || '';
  problem('');
}

// ---- views --------------------------------------------------------------------

let timers = [];
function stopTimers() {
  for (const t of timers) clearTimeout(t);
  timers = [];
}
/** Runs `fn` now and again `msBetween` after each run ends (never two at once),
 * until the generation changes; skipped while the tab is hidden. */
function every(msBetween, fn) {
  const mine = generation;
  const tick = async () => {
    if (mine !== generation) return;
    if (document.visibilityState !== 'hidden') await fn();
    if (mine === generation) timers.push(setTimeout(tick, msBetween));
  };
  tick();
}

function route() {
  if (!sessionStorage.getItem(KEY)) return;
  newGeneration();
  stopTimers();
  problem('');
  const [name, raw] = location.hash.slice(1).split('/');
  let arg = raw || '';
  try { arg = decodeURIComponent(arg); } catch (_) { /* shown as typed */ }
  const view = ['overview', 'anomalies', 'users', 'user', 'audit'].includes(name) ? name : 'overview';
  for (const section of document.querySelectorAll('.view')) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll('#nav a')) {
    link.classList.toggle('current', link.dataset.view === view || (view === 'user' && link.dataset.view === 'users'));
  }
  if (view === 'overview') {
    every(LIVE_EVERY_MS, showLive);
    every(STATS_EVERY_MS, showStats);
  } else if (view === 'anomalies') {
    every(STATS_EVERY_MS, showAnomalies);
  } else if (view === 'users') {
    every(STATS_EVERY_MS, showUsers);
  } else if (view === 'user') {
    every(STATS_EVERY_MS, () => showUser(arg));
  } else if (view === 'audit') {
    showAudit(false);
  }
}

function card(label, value, sub, fill) {
  return el('div', { class: 'card' },
    el('div', { class: 'label' }, label),
    el('div', { class: 'value' }, value),
    sub ? el('div', { class: 'sub' }, sub) : null,
    fill === undefined ? null
      : el('div', { class: fill > 85 ? 'bar hot' : 'bar' }, el('span', { style: null, 'data-fill': fill })));
}

/** Bars get their width from script (the style policy forbids inline styles in markup). */
function fillBars(root) {
  for (const span of root.querySelectorAll('[data-fill]')) span.style.width = `${span.dataset.fill}%`;
}

function rows(tbody, items, render, empty) {
  tbody.replaceChildren(...(items.length
    ? items.map(render)
    : [el('tr', { class: 'empty' }, el('td', { colspan: tbody.parentElement.tHead.rows[0].cells.length }, empty))]));
}

/** A user's name, linked to their page (`-`: nobody could be named, e.g. a bad key). */
function userLink(name) {
  if (!name || name === '-') return el('span', { class: 'muted' }, 'unknown');
  return el('a', { href: `#user/${encodeURIComponent(name)}` }, name);
}

async function showLive() {
  let live;
  try { live = await api('GET', '/v1/live'); } catch (e) { failed(e); return; }
  const cards = $('#live-cards');
  cards.replaceChildren(
    card('Calls in flight', `${live.in_flight} / ${live.capacity}`,
      `instance pool; ${live.session_slots} more places held by code sessions`,
      percent(live.in_flight + live.session_slots, live.capacity)),
    card('Code sessions', count(live.sessions_open), `${live.session_slots} pool places, ${bytes(live.sessions_memory_bytes)}`),
    card('Guest memory', bytes(live.memory_in_use_bytes), `of ${bytes(live.memory_budget_bytes)} budget`, percent(live.memory_in_use_bytes, live.memory_budget_bytes)),
    card('Guest descriptors', count(live.descriptors_in_use), `of ${count(live.descriptors_max)}`, percent(live.descriptors_in_use, live.descriptors_max)),
  );
  fillBars(cards);
  rows($('#live-calls tbody'), live.calls, (c) => el('tr', {},
    el('td', {}, userLink(c.user)), el('td', {}, c.tool), el('td', {}, when(c.started)), el('td', { class: 'num' }, ms(c.running_ms))),
  'No call is running.');
  $('#warm').replaceChildren(...(live.warm.length ? [el('p', { class: 'muted' },
    'Warm jails: ', live.warm.map((w) => `${w.tool} ${w.ready} ready, ${w.warming} warming (${bytes(w.memory_bytes)})`).join('; '))] : []));
  $('#updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function totalsCards(t) {
  return [
    card('Calls', count(t.calls)),
    card('Errors', count(t.errors), t.calls ? `${percent(t.errors, t.calls).toFixed(1)} % of calls` : null),
    card('Limit hits', count(t.limit_hits)),
    card('CPU per call', ms(t.cpu_ms.p50), `p95 ${ms(t.cpu_ms.p95)} · p99 ${ms(t.cpu_ms.p99)}`),
    card('Peak memory', bytes(t.peak_memory_bytes.p50), `p95 ${bytes(t.peak_memory_bytes.p95)}`),
    card('Bytes written', bytes(t.bytes_written)),
    card('Security events', count(t.security_events),
      Object.entries(t.security_by_kind).map(([k, v]) => `${k} ${v}`).join(' · ') || null),
  ];
}

/** Calls (ok and errors stacked) and security events per step of the window. */
function chart(container, series) {
  const width = 1000;
  const height = 180;
  const bottom = 18;
  const max = Math.max(1, ...series.map((p) => Math.max(p.calls, p.security_events)));
  const step = width / Math.max(1, series.length);
  const scale = (v) => ((height - bottom - 12) * v) / max;
  const plot = svg('svg', { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': 'calls and errors over time' });
  series.forEach((p, i) => {
    const x = i * step + step * 0.1;
    const w = Math.max(1, step * 0.8);
    const ok = p.calls - p.errors;
    const title = `${when(p.at)}: ${p.calls} calls, ${p.errors} errors, ${p.security_events} security events`;
    const group = svg('g', {}, svg('title', {}, title));
    group.append(svg('rect', { x, width: w, y: height - bottom - scale(p.calls), height: scale(ok), fill: '#2f9e63' }));
    group.append(svg('rect', { x, width: w, y: height - bottom - scale(p.errors), height: scale(p.errors), fill: '#d2453a' }));
    if (p.security_events) {
      group.append(svg('circle', { cx: x + w / 2, cy: height - bottom - scale(p.security_events), r: 3, fill: '#8a4fd1' }));
    }
    plot.append(group);
  });
  plot.append(svg('line', { x1: 0, x2: width, y1: height - bottom, y2: height - bottom, stroke: '#c7ccd6' }));
  plot.append(svg('text', { x: 4, y: 11, 'font-size': 11, fill: '#667085' }, `${count(max)}`));
  if (series.length) {
    const label = (p) => new Date(p.at).toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
    plot.append(svg('text', { x: 2, y: height - 4, 'font-size': 11, fill: '#667085' }, label(series[0])));
    plot.append(svg('text', { x: width - 2, y: height - 4, 'font-size': 11, fill: '#667085', 'text-anchor': 'end' }, label(series[series.length - 1])));
  }
  const legend = el('div', { class: 'legend' },
    el('span', {}, el('i', { class: 'ok' }), 'calls ok'),
    el('span', {}, el('i', { class: 'err' }), 'errors'),
    el('span', {}, el('i', { class: 'sec' }), 'security events'));
  container.replaceChildren(plot, legend);
}

function groupRow(g, link) {
  return el('tr', {},
    el('td', {}, link ? userLink(g.key) : (g.key || '–')),
    el('td', { class: 'num' }, count(g.calls)),
    el('td', { class: 'num' }, count(g.errors)),
    el('td', { class: 'num' }, count(g.limit_hits)),
    el('td', { class: 'num' }, ms(g.cpu_ms.p95)),
    el('td', { class: 'num' }, link ? count(g.security_events) : bytes(g.peak_memory_bytes.p95)));
}

async function showStats() {
  const span = $('#window').value;
  let byUser;
  let byTool;
  try {
    [byUser, byTool] = await Promise.all([
      api('GET', `/v1/stats?window=${span}&by=user`),
      api('GET', `/v1/stats?window=${span}&by=tool`),
    ]);
  } catch (e) { failed(e); return; }
  $('#totals').replaceChildren(...totalsCards(byUser.totals));
  chart($('#chart'), byUser.series);
  rows($('#top-users tbody'), byUser.groups.slice(0, 10), (g) => groupRow(g, true), 'No calls in this window.');
  rows($('#top-tools tbody'), byTool.groups.filter((g) => g.key).slice(0, 10), (g) => groupRow(g, false), 'No calls in this window.');
}

function showRecord(title, value) {
  $('#record-title').textContent = title;
  $('#record-body').textContent = JSON.stringify(value, null, 2);
  $('#record-dialog').showModal();
}

async function showExecution(id) {
  try {
    showRecord(`Execution ${id}`, await api('GET', `/v1/executions/${encodeURIComponent(id)}`));
  } catch (e) {
    if (e instanceof Superseded || e.status === 401 || e.status === 403) failed(e);
    else showRecord(`Execution ${id}`, { error: e.message, status: e.status });
  }
}

/** A row that opens `record` when clicked (not when a link or button in it is). */
function recordRow(title, record, ...cells) {
  const open = (event) => { if (!event.target.closest('a, button')) showRecord(title, record); };
  return el('tr', { class: 'clickable', onclick: open }, ...cells);
}

function evidence(detail) {
  const list = el('dl');
  const found = (detail && detail.evidence) || {};
  for (const [name, value] of Object.entries(found)) {
    if (name === 'executions') continue;
    const shown = (v) => (typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v));
    list.append(el('dt', {}, name.replaceAll('_', ' ')),
      el('dd', {}, ...(Array.isArray(value) ? value.map((v) => el('div', {}, shown(v))) : [shown(value)])));
  }
  const executions = Array.isArray(found.executions) ? found.executions : [];
  if (executions.length) {
    list.append(el('dt', {}, 'executions'), el('dd', {}, ...executions.map((id) =>
      el('button', { type: 'button', class: 'link execution', onclick: () => showExecution(String(id)) },
        String(id).slice(0, 8)))
      .flatMap((b) => [b, ' '])));
  }
  return list;
}

function anomalyCard(r) {
  const actions = Array.isArray(r.detail && r.detail.actions) ? r.detail.actions : [];
  return el('div', { class: 'anomaly', 'data-seq': r.seq },
    el('header', {},
      el('span', { class: 'rule' }, r.outcome),
      el('span', {}, 'user ', userLink(r.user)),
      r.tool ? el('span', {}, 'tool ', r.tool) : null,
      el('span', { class: 'muted' }, when(r.at)),
      el('span', {}, ...actions.map((a) => el('span', { class: `badge ${a}` }, a)))),
    evidence(r.detail));
}

async function showAnomalies() {
  let anomalies;
  let alerts;
  try {
    [anomalies, alerts] = await Promise.all([
      api('GET', '/v1/audit?kind=anomaly&limit=100'),
      api('GET', '/v1/alerts?limit=100'),
    ]);
  } catch (e) { failed(e); return; }
  const list = $('#anomaly-list');
  list.replaceChildren(...(anomalies.records.length
    ? anomalies.records.map(anomalyCard)
    : [el('p', { class: 'muted' }, 'No anomaly has been found.')]));
  rows($('#alert-list tbody'), alerts.records, (r) => recordRow(`Alert #${r.seq}`, r,
    el('td', {}, when(r.at)), el('td', {}, r.outcome), el('td', {}, userLink(r.user)), el('td', {}, r.tool || '–'),
    el('td', {}, summary(r.detail))), 'No alert.');
}

function summary(detail) {
  if (!detail || typeof detail !== 'object') return '';
  const text = Object.entries(detail).filter(([, v]) => typeof v !== 'object')
    .map(([k, v]) => `${k}: ${v}`).join(', ');
  return text.length > 160 ? `${text.slice(0, 157)}…` : text;
}

function restriction(u) {
  return [
    u.suspended_until ? el('span', { class: 'badge suspended' }, `suspended until ${when(u.suspended_until)}`) : null,
    u.throttled_until ? el('span', { class: 'badge throttled' }, `throttled until ${when(u.throttled_until)}`) : null,
  ];
}

function userActions(u, after) {
  const unsuspend = async () => {
    try { await api('POST', `/v1/users/${encodeURIComponent(u.id)}/unsuspend`); } catch (e) { failed(e); return; }
    after();
  };
  const restricted = u.suspended_until || u.throttled_until;
  return [
    el('button', { type: 'button', class: 'suspend', 'data-user': u.id, onclick: () => askSuspend(u.id, after) }, 'Suspend…'),
    restricted ? el('button', { type: 'button', class: 'unsuspend', 'data-user': u.id, onclick: unsuspend },
      u.suspended_until ? 'Unsuspend' : 'Lift throttle') : null,
  ];
}

let suspending = null;
function askSuspend(user, after) {
  suspending = { user, after };
  $('#suspend-name').textContent = user;
  $('#suspend-error').textContent = '';
  $('#suspend-form').reset();
  $('#suspend-dialog').showModal();
}

/** The dialog's form was submitted (the button, or Enter in the reason). */
async function confirmSuspend(event) {
  event.preventDefault();
  const form = $('#suspend-form');
  const confirm = $('#suspend-confirm');
  if (!suspending || confirm.disabled) return;
  const body = { for_s: Number(form.elements.for_s.value) };
  if (form.elements.reason.value.trim()) body.reason = form.elements.reason.value.trim();
  const { user, after } = suspending;
  confirm.disabled = true;
  try {
    await api('POST', `/v1/users/${encodeURIComponent(user)}/suspend`, body);
  } catch (e) {
    if (e instanceof Superseded || e.status === 401 || e.status === 403) {
      failed(e);
    } else {
      // The last admin cannot be suspended (409): say so in the dialog.
      $('#suspend-error').textContent = `${e.status} ${e.message}`;
    }
    return;
  } finally {
    confirm.disabled = false;
  }
  $('#suspend-dialog').close();
  suspending = null;
  after();
}

async function showUsers() {
  let list;
  try { list = await api('GET', '/v1/users'); } catch (e) { failed(e); return; }
  rows($('#user-table tbody'), list.users, (u) => el('tr', { 'data-user': u.id },
    el('td', {}, userLink(u.id)), el('td', {}, u.tier), el('td', {}, u.admin ? 'admin' : ''),
    el('td', { class: 'num' }, count(u.active_keys)), el('td', {}, when(u.created_at)),
    el('td', { class: 'restricted' }, ...restriction(u)),
    el('td', {}, ...userActions(u, showUsers))), 'No users yet.');
}

function auditRow(r, withUser) {
  return recordRow(`Audit record #${r.seq}`, r,
    el('td', { class: 'num' }, r.seq), el('td', {}, when(r.at)), el('td', {}, r.kind),
    withUser ? el('td', {}, userLink(r.user)) : null,
    el('td', {}, r.tool || '–'), el('td', {}, r.outcome), el('td', {}, r.actor || '–'));
}

async function showUser(name) {
  let list;
  let stats;
  let audit;
  try {
    [list, stats, audit] = await Promise.all([
      api('GET', '/v1/users'),
      api('GET', `/v1/stats?window=24h&by=tool&user=${encodeURIComponent(name)}`),
      api('GET', `/v1/audit?user=${encodeURIComponent(name)}&limit=50`),
    ]);
  } catch (e) { failed(e); return; }
  const u = list.users.find((x) => x.id === name);
  $('#user-title').textContent = u ? `User ${name}` : `No user ${name}`;
  if (!u) {
    $('#user-info').replaceChildren();
    $('#user-actions').replaceChildren();
    return;
  }
  $('#user-info').replaceChildren(
    card('Tier', u.tier), card('Admin', u.admin ? 'yes' : 'no'), card('Active keys', count(u.active_keys)),
    card('Since', when(u.created_at)),
    card('Restricted', u.suspended_until || u.throttled_until ? '' : 'no'));
  $('#user-info .card:last-child .value').append(...restriction(u).filter(Boolean));
  $('#user-actions').replaceChildren(...userActions(u, () => showUser(name)).filter(Boolean));
  $('#user-totals').replaceChildren(...totalsCards(stats.totals));
  chart($('#user-chart'), stats.series);
  rows($('#user-tools tbody'), stats.groups.filter((g) => g.key), (g) => groupRow(g, false), 'No calls in the last 24 hours.');
  rows($('#user-audit tbody'), audit.records, (r) => auditRow(r, false), 'No audit record.');
}

// The filters the shown pages were asked with, and where the next page starts.
let auditQuery = null;
let auditBefore = null;
// The last page asked for: an answer to an earlier one (the section's first
// load overtaken by a filter, say) is dropped, so the table is always the
// answer to the filters as last submitted.
let auditAsked = 0;

/** The filters as typed; a time that is no date throws a RangeError. */
function auditFilters() {
  const form = $('#audit-filters');
  const q = new URLSearchParams({ limit: '100' });
  for (const name of ['user', 'tool', 'kind']) {
    const v = form.elements[name].value.trim();
    if (v) q.set(name, v);
  }
  for (const name of ['since', 'until']) {
    const v = form.elements[name].value;
    // The picker gives local time; the API takes RFC 3339.
    if (v) q.set(name, new Date(v).toISOString());
  }
  return q;
}

/** The first page of the filters as typed, or (`older`) the next page of the shown ones. */
async function showAudit(older) {
  const tbody = $('#audit-table tbody');
  const button = $('#audit-older');
  let q;
  if (older && auditQuery && auditBefore !== null) {
    q = new URLSearchParams(auditQuery);
    q.set('before', auditBefore);
  } else {
    try { q = auditFilters(); } catch (e) {
      auditAsked += 1; // an answer still on its way is not drawn over this
      tbody.replaceChildren();
      problem(`A time in the filter is not a valid date (${e.message}).`);
      return;
    }
    older = false;
  }
  button.disabled = true;
  const mine = ++auditAsked;
  let page;
  try {
    page = await api('GET', `/v1/audit?${q}`);
  } catch (e) {
    if (mine !== auditAsked) return;
    button.disabled = false;
    if (e.status === 400) {
      tbody.replaceChildren();
      button.hidden = true;
      problem(`The filter was refused: ${e.message}`);
      return;
    }
    failed(e);
    return;
  }
  if (mine !== auditAsked) return;
  button.disabled = false;
  const render = (r) => auditRow(r, true);
  if (older) tbody.append(...page.records.map(render));
  else rows(tbody, page.records, render, 'No record matches.');
  if (!older) {
    auditQuery = q;
    auditQuery.delete('before');
  }
  auditBefore = page.next_before;
  button.hidden = auditBefore === null;
}

// ---- start --------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  $('#sign-in-form').addEventListener('submit', (event) => {
    event.preventDefault();
    signIn($('#key').value.trim());
  });
  $('#sign-out').addEventListener('click', () => signOut(''));
  $('#window').addEventListener('change', () => {
    // Figures of the old window still on their way are dropped.
    newGeneration();
    stopTimers();
    every(LIVE_EVERY_MS, showLive);
    every(STATS_EVERY_MS, showStats);
  });
  $('#suspend-form').addEventListener('submit', confirmSuspend);
  $('#suspend-cancel').addEventListener('click', () => { $('#suspend-dialog').close(); suspending = null; });
  $('#record-close').addEventListener('click', () => $('#record-dialog').close());
  $('#audit-filters').addEventListener('submit', (event) => { event.preventDefault(); showAudit(false); });
  // Clearing the filters shows everything again (signing out clears them too, and shows nothing).
  $('#audit-filters').addEventListener('reset', () => setTimeout(() => {
    if (sessionStorage.getItem(KEY)) showAudit(false);
  }));
  $('#audit-older').addEventListener('click', () => showAudit(true));
  window.addEventListener('hashchange', route);
  resume();
});

/** A reloaded tab keeps its key: sign back in with it, unless the server now refuses it. */
function resume() {
  if (!sessionStorage.getItem(KEY)) return;
  api('GET', '/v1/me').then((me) => (me.admin ? started(me) : signOut('')), (e) => {
    if (e.status === 401 || e.status === 403) {
      signOut('');
    } else {
      problem(`${e.message}; trying again`);
      setTimeout(resume, 3000);
    }
  });
}
