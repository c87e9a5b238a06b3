// Malla's flow page: polls /api/flows with the form's filters, draws the graph (namespaces as
// columns of workloads and Services, one edge per source, Service, destination and verdict)
// and the table; a row's click shows its `malla policy trace` and the result (/api/trace).
// URL parameters prefill the filters (shareable links); `open=N` opens row N's trace once.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const FIELDS = ['from', 'to', 'namespace', 'verdict', 'policy', 'port', 'since'];
const OUTSIDE = '(nodes and outside)';
const form = document.getElementById('filters');
const live = document.getElementById('live');
let serverNow = null;
let loading = false;
let selected = null; // the selected flow's identity (see ident)
let openRow = null; // `open=N` from the URL, until done

function el(tag, attrs, text) {
  const e = tag.startsWith('svg:')
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// `30s`, `5m`, `2h`, `1d` or seconds, as `malla flows --since`.
function seconds(s) {
  const m = /^(\d+)([smhd]?)$/.exec(s.trim());
  if (!m) return null;
  return Number(m[1]) * { '': 1, s: 1, m: 60, h: 3600, d: 86400 }[m[2]];
}

// The form's filters as the API's query (since: unix seconds).
function apiQuery() {
  const q = new URLSearchParams();
  for (const f of FIELDS) {
    const v = form.elements[f].value.trim();
    if (!v) continue;
    if (f === 'since') {
      const s = seconds(v);
      if (s === null) throw new Error('since: ' + JSON.stringify(v) + ' is not like 30s, 5m, 2h or 1d');
      const now = serverNow || Math.floor(Date.now() / 1000);
      q.set('since', String(now - s));
    } else {
      q.set(f, v);
    }
  }
  return q.toString();
}

function pageQuery() {
  const q = new URLSearchParams();
  for (const f of FIELDS) {
    const v = form.elements[f].value.trim();
    if (v) q.set(f, v);
  }
  return q.toString();
}

function peerId(p) {
  if (p.kind === 'pod') return p.namespace + '/' + p.name;
  if (p.kind === 'node') return 'node/' + p.name;
  return p.ip;
}

function peerEntity(p) {
  if (p.kind === 'pod') return { id: peerId(p), kind: 'pod', group: p.namespace, label: p.name };
  return { id: peerId(p), kind: p.kind, group: OUTSIDE, label: p.name || p.ip };
}

function ident(f) {
  return [f.start, f.node, peerId(f.src), peerId(f.dst), f.service || '', f.port, f.proto, f.verdict].join('|');
}

function policyText(f) {
  return f.policies.length ? f.policies.join(', ') : '-';
}

function clock(t) {
  const s = t % 86400;
  const two = (n) => String(n).padStart(2, '0');
  return two(Math.floor(s / 3600)) + ':' + two(Math.floor(s / 60) % 60) + ':' + two(s % 60);
}

// ---- graph ----------------------------------------------------------------------------

function drawGraph(flows) {
  const svg = document.getElementById('graph');
  svg.replaceChildren();
  const ents = new Map();
  const edges = new Map();
  const add = (e) => { if (!ents.has(e.id)) ents.set(e.id, e); return e.id; };
  // Each node reports what it saw: the client's node may pass a connection out (no egress
  // policy) that the server's node then drops. The graph shows the connection's outcome: an
  // `allowed` report is left out where another node dropped the same connection in the window.
  const conn = (f) => [f.start, peerId(f.src), f.service || '', peerId(f.dst), f.port, f.proto].join('|');
  const dropped = new Set(flows.filter((f) => f.verdict !== 'allowed').map(conn));
  for (const f of flows) {
    if (f.verdict === 'allowed' && dropped.has(conn(f))) continue;
    const a = add(peerEntity(f.src));
    const b = add(peerEntity(f.dst));
    let via = '';
    if (f.service) {
      const [ns, name] = f.service.split('/');
      via = add({ id: 'svc:' + f.service, kind: 'svc', group: ns, label: name });
    }
    const key = [a, via, b, f.verdict].join('|');
    const e = edges.get(key) || { a, via, b, verdict: f.verdict, conns: 0, ports: new Set(), policies: new Set() };
    e.conns += f.started;
    e.ports.add(f.port + '/' + f.proto);
    f.policies.forEach((p) => e.policies.add(p));
    edges.set(key, e);
  }
  const groups = [...new Set([...ents.values()].map((e) => e.group))].sort((x, y) =>
    (x === OUTSIDE) - (y === OUTSIDE) || x.localeCompare(y));
  const colW = 210, rowH = 56, top = 40;
  const pos = new Map();
  let rows = 1;
  const layer = el('svg:g');
  groups.forEach((g, i) => {
    const members = [...ents.values()].filter((e) => e.group === g)
      .sort((x, y) => (x.kind === 'svc') - (y.kind === 'svc') || x.label.localeCompare(y.label));
    rows = Math.max(rows, members.length);
    const x = 20 + i * colW;
    const box = el('svg:g', { class: 'ns', 'data-namespace': g });
    box.append(el('svg:rect', { x, y: 8, width: colW - 30, height: 0, rx: 6 }));
    box.append(el('svg:text', { class: 'ns-name', x: x + 8, y: 26 }, g));
    layer.append(box);
    members.forEach((m, j) => {
      const cx = x + 28, cy = top + 20 + j * rowH;
      pos.set(m.id, { x: cx, y: cy, col: i });
      const g2 = el('svg:g', { class: 'ent ' + m.kind, 'data-id': m.id });
      g2.append(el('svg:title', {}, m.id));
      if (m.kind === 'svc') {
        g2.append(el('svg:rect', { class: 'svc', x: cx - 14, y: cy - 11, width: 28, height: 22, rx: 4 }));
        g2.append(el('svg:text', { x: cx + 20, y: cy + 4 }, m.label + ' (svc)'));
      } else {
        g2.append(el('svg:circle', { cx, cy, r: 12 }));
        g2.append(el('svg:text', { x: cx + 20, y: cy + 4 }, m.label));
      }
      layer.append(g2);
    });
  });
  const height = top + rows * rowH + 20;
  layer.querySelectorAll('.ns rect').forEach((r) => r.setAttribute('height', height - 16));
  svg.setAttribute('height', Math.max(height, 120));
  svg.setAttribute('viewBox', '0 0 ' + Math.max(groups.length * colW + 20, 400) + ' ' + Math.max(height, 120));
  svg.setAttribute('width', Math.max(groups.length * colW + 20, 400));

  const defs = el('svg:defs');
  for (const [id, colour] of [['allowed', '#2a2'], ['denied', '#d22']]) {
    const m = el('svg:marker', { id: 'arrow-' + id, viewBox: '0 0 10 10', refX: 22, refY: 5, markerWidth: 6, markerHeight: 6, orient: 'auto-start-reverse' });
    m.append(el('svg:path', { d: 'M0,0 L10,5 L0,10 z', fill: colour }));
    defs.append(m);
  }
  svg.append(defs);
  // A curve from p to q bending to one side (allowed and denied bend apart).
  const bend = (p, q, side) => {
    const mx = (p.x + q.x) / 2, my = (p.y + q.y) / 2;
    const dx = q.x - p.x, dy = q.y - p.y;
    const len = Math.hypot(dx, dy) || 1;
    const k = (p.col === q.col ? 16 + len * 0.3 : 18) * side;
    return 'Q' + (mx - dy / len * k) + ',' + (my + dx / len * k) + ' ' + q.x + ',' + q.y;
  };
  for (const e of edges.values()) {
    const a = pos.get(e.a), b = pos.get(e.b);
    const side = e.verdict === 'allowed' ? 1 : -1;
    let d = 'M' + a.x + ',' + a.y + ' ';
    if (e.via) {
      const v = pos.get(e.via);
      d += bend(a, v, side) + ' ' + bend(v, b, side);
    } else {
      d += bend(a, b, side);
    }
    const cls = e.verdict === 'allowed' ? 'allowed' : 'denied';
    const path = el('svg:path', {
      class: 'edge ' + e.verdict, d, 'marker-end': 'url(#arrow-' + cls + ')',
      'data-from': e.a, 'data-to': e.b, 'data-verdict': e.verdict,
    });
    if (e.via) path.setAttribute('data-service', e.via.slice(4));
    path.append(el('svg:title', {}, e.a + ' → ' + (e.via ? e.via.slice(4) + ' → ' : '') + e.b + ' ' +
      [...e.ports].join(',') + ': ' + e.verdict + ' (' + e.conns + ' conns) ' + [...e.policies].join(', ')));
    path.addEventListener('click', () => {
      form.elements.from.value = e.a.startsWith('node/') ? e.a.slice(5) : e.a;
      form.elements.to.value = e.via ? e.via.slice(4) : (e.b.startsWith('node/') ? e.b.slice(5) : e.b);
      changed();
    });
    layer.append(path);
  }
  svg.append(layer);
}

// ---- table and trace --------------------------------------------------------------------

function drawTable(flows) {
  const body = document.querySelector('#flows tbody');
  body.replaceChildren();
  flows.forEach((f, i) => {
    const to = peerId(f.dst) + (f.service ? ' (svc ' + f.service + ')' : '');
    const tr = el('tr', { 'data-verdict': f.verdict, 'data-index': i });
    const cells = [
      [clock(f.start)], [f.node], [peerId(f.src)], [to], [f.port + '/' + f.proto],
      [f.verdict, 'verdict ' + f.verdict], [policyText(f), 'policy'],
      [String(f.started), 'num'], [f.bytesOut + '/' + f.bytesIn, 'num'],
    ];
    for (const [text, cls] of cells) tr.append(el('td', cls ? { class: cls } : {}, text));
    if (ident(f) === selected) tr.classList.add('selected');
    tr.addEventListener('click', () => openTrace(f, tr));
    body.append(tr);
  });
  document.getElementById('count').textContent = '(' + flows.length + ')';
}

async function openTrace(f, tr) {
  selected = ident(f);
  document.querySelectorAll('#flows tr.selected').forEach((r) => r.classList.remove('selected'));
  tr.classList.add('selected');
  const box = document.getElementById('trace-box');
  box.hidden = false;
  document.getElementById('trace-flow').textContent = peerId(f.src) + ' → ' +
    (f.service ? f.service + ' → ' : '') + peerId(f.dst) + ' ' + f.port + '/' + f.proto + ': ' +
    f.verdict.toUpperCase() + ' by ' + policyText(f) + (f.endpoint ? ' (endpoint ' + f.endpoint + ')' : '');
  const cmd = document.getElementById('trace-command');
  const out = document.getElementById('trace-output');
  box.removeAttribute('data-state');
  if (!f.trace) {
    cmd.textContent = '';
    out.textContent = 'no policy trace for ' + f.proto;
    return;
  }
  cmd.textContent = f.trace;
  out.textContent = 'tracing…';
  // malla policy trace FROM TO --port P --protocol X
  const w = f.trace.split(' ');
  const q = new URLSearchParams({ from: w[3], to: w[4], port: w[6], protocol: w[8] });
  try {
    const r = await fetch('/api/trace?' + q);
    const t = r.ok ? await r.json() : { ok: false, output: await r.text() };
    out.textContent = t.output;
    box.setAttribute('data-state', t.ok ? 'done' : 'failed');
  } catch (e) {
    out.textContent = 'trace failed: ' + e;
    box.setAttribute('data-state', 'failed');
  }
}

// ---- polling ------------------------------------------------------------------------------

async function load() {
  if (loading) return;
  loading = true;
  const status = document.getElementById('status');
  const errors = document.getElementById('errors');
  try {
    const r = await fetch('/api/flows?' + apiQuery());
    if (!r.ok) throw new Error(await r.text());
    const a = await r.json();
    serverNow = a.now;
    errors.textContent = a.errors.join('\n');
    drawGraph(a.flows);
    drawTable(a.flows);
    status.textContent = 'updated ' + clock(a.now) + ' UTC';
    document.body.setAttribute('data-loaded', String(a.flows.length));
    if (openRow !== null) {
      const tr = document.querySelector('#flows tbody tr[data-index="' + openRow + '"]');
      if (tr) { openRow = null; tr.click(); }
    }
  } catch (e) {
    errors.textContent = String(e.message || e);
  } finally {
    loading = false;
  }
}

function changed() {
  history.replaceState(null, '', '?' + pageQuery());
  load();
}

const params = new URLSearchParams(location.search);
for (const f of FIELDS) if (params.has(f)) form.elements[f].value = params.get(f);
if (params.has('open')) openRow = Number(params.get('open'));
form.addEventListener('change', changed);
form.addEventListener('submit', (e) => { e.preventDefault(); changed(); });
setInterval(() => { if (live.checked) load(); }, 2000);
load();
