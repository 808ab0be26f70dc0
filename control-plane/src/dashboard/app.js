// The weft dashboard: reads the control plane's /api/* JSON and draws it.
// Every name shown comes from the cluster or a proxy, so text is only ever
// set as text nodes (never as HTML).
"use strict";

const REFRESH_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    node.setAttribute(name, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    node.setAttribute(name, value);
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

async function api(path) {
  const response = await fetch(path, { headers: { accept: "application/json" } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function table(id, headings, rows) {
  const node = document.getElementById(id);
  node.replaceChildren(
    el("thead", {}, el("tr", {}, ...headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", {}, c))))),
  );
}

function yesNo(value, yes, no) {
  return el("span", { class: value ? "yes" : "no" }, value ? yes : no);
}

function duration(seconds) {
  if (seconds < 0) return "expired";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function card(figure, label, good) {
  const attributes = { class: "card" };
  const value = el("div", { class: "figure" + (good === false ? " no" : "") }, figure);
  return el("div", attributes, value, el("div", { class: "label" }, label));
}

const pages = {
  async overview() {
    const o = await api("/api/overview");
    const cert = o.soonest_certificate_expiry;
    document.getElementById("overview-cards").replaceChildren(
      card(`${o.nodes.connected} / ${o.nodes.known}`, "nodes whose proxy is connected", o.nodes.connected === o.nodes.known),
      card(`${o.nodes.up_to_date} / ${o.nodes.known}`, "proxies on their latest config", o.nodes.up_to_date === o.nodes.known),
      card(o.nodes.with_nack, "proxies that refused a config", o.nodes.with_nack === 0),
      card(`${o.workloads.meshed} / ${o.workloads.total}`, "workloads in the mesh"),
      card(`${o.policies.total - o.policies.not_accepted} / ${o.policies.total}`, "policies accepted", o.policies.not_accepted === 0),
      card(cert ? duration(cert.expires_in_seconds) : "none", cert ? `until ${cert.identity} expires on ${cert.node}` : "certificates reported", cert ? cert.expires_in_seconds > 3600 : undefined),
      card(o.traffic.connections, `connections in the last ${Math.round(o.traffic.window_seconds / 60)} min`),
      card(o.traffic.denied, "connections refused by policy", o.traffic.denied === 0 ? undefined : false),
      card(`${o.replicas.asked - o.replicas.unanswered.length} / ${o.replicas.asked}`,
        o.replicas.unanswered.length ? `other replicas answered; not: ${o.replicas.unanswered.join("; ")}` : "other control-plane replicas merged into this view",
        o.replicas.unanswered.length === 0),
    );
  },

  async nodes() {
    const nodes = await api("/api/nodes");
    table("nodes-table", ["node", "pods", "proxy", "config", "last refusal", "certificates"], nodes.map((n) => [
      n.name,
      n.pods,
      n.connected ? el("span", { class: "yes" }, `connected, ${n.proxy_version}`) : el("span", { class: "no" }, "no proxy connected"),
      n.connected ? yesNo(n.up_to_date, `applied v${n.acked_version}`, `v${n.acked_version} of v${n.sent_version}`) : "",
      n.last_nack ? el("span", { class: "no" }, `v${n.last_nack.version}: ${n.last_nack.reason}`) : "",
      el("div", {}, ...n.certificates.map((c) => el("div", { class: c.expires_in_seconds > 3600 ? "" : "warn" }, `${c.identity} (${duration(c.expires_in_seconds)})`))),
    ]));
  },

  async workloads() {
    const namespace = document.getElementById("workloads-namespace");
    const q = document.getElementById("workloads-q").value;
    const query = new URLSearchParams({ namespace: namespace.value, q });
    const w = await api(`/api/workloads?${query}`);
    const chosen = namespace.value;
    namespace.replaceChildren(el("option", { value: "" }, "all"), ...w.namespaces.map((n) => el("option", { value: n }, n)));
    namespace.value = chosen;
    document.getElementById("workloads-count").textContent =
      w.total > w.workloads.length ? `${w.workloads.length} of ${w.total} shown; narrow by namespace or name` : `${w.total} workloads`;
    table("workloads-table", ["pod", "node", "meshed", "identity", "mTLS", "policies", "certificate"], w.workloads.map((p) => [
      el("div", {}, p.uid, el("div", { class: "muted" }, `${p.workload} · ${p.ips.join(", ")}`)),
      p.node,
      p.quarantine ? el("span", { class: "no" }, `quarantined: ${p.quarantine}`) : yesNo(p.meshed, "yes", "no"),
      p.identity,
      p.meshed ? `${p.mtls}${p.mtls_policy ? ` (${p.mtls_policy})` : ""}` : "",
      el("div", {}, ...p.policies.map((name) => el("div", { class: p.invalid_policies.includes(name) ? "no" : "" }, name))),
      p.certificate ? duration(p.certificate.expires_in_seconds) : p.meshed ? el("span", { class: "warn" }, "none reported") : "",
    ]));
  },

  async traffic() {
    const namespace = document.getElementById("traffic-namespace").value;
    const t = await api(`/api/traffic?${new URLSearchParams({ namespace })}`);
    document.getElementById("traffic-window").textContent =
      `the last ${Math.round(t.window_seconds / 60)} minutes, as the proxies reported it` +
      (t.matching > t.edges.length ? `; the busiest ${t.edges.length} of ${t.matching} pairs` : "") +
      (t.left_out ? `; ${t.left_out} connection events left out (bounds)` : "");
    drawGraph(t.edges);
    table("traffic-table", ["source", "destination", "service", "security", "connections", "bytes (to / from server)", "refused", "audited"], t.edges.map((e) => [
      e.source,
      e.destination,
      e.service,
      el("span", { class: e.security === "none" ? "warn" : "yes" }, e.security === "mutual_tls" ? "mTLS" : e.security === "node_local" ? "same node" : "plaintext"),
      e.opened,
      `${bytes(e.bytes_received)} / ${bytes(e.bytes_sent)}`,
      el("div", {}, ...Object.entries(e.denied).map(([policy, n]) => el("div", { class: "no" }, `${n} by ${policy}`))),
      el("div", {}, ...Object.entries(e.audited).map(([policy, n]) => el("div", {}, `${n} by ${policy}`))),
    ]));
  },

  async policies() {
    const policies = await api("/api/policies");
    table("policies-table", ["kind", "policy", "conditions"], policies.map((p) => [
      p.kind,
      p.object,
      el("div", {}, ...p.conditions.map((c) => el("div", { class: c.status ? "yes" : "no" }, `${c.type}: ${c.status ? "True" : "False"} (${c.reason})${c.message ? ` ${c.message}` : ""}`))),
    ]));
  },

  async explain() {},
};

// A circle of the workloads seen, one line per pair: green for mutual TLS,
// blue for the same node, orange for plaintext, dashed red for refusals.
function drawGraph(edges) {
  const graph = document.getElementById("traffic-graph");
  const names = [...new Set(edges.flatMap((e) => [e.source, e.destination]))].sort();
  const [cx, cy] = [400, 280];
  const radius = names.length > 1 ? 200 : 0;
  const at = new Map(names.map((name, i) => {
    const angle = (2 * Math.PI * i) / Math.max(names.length, 1) - Math.PI / 2;
    return [name, [cx + radius * Math.cos(angle), cy + radius * Math.sin(angle)]];
  }));
  const shapes = [];
  for (const e of edges) {
    const [x1, y1] = at.get(e.source);
    const [x2, y2] = at.get(e.destination);
    const refused = Object.keys(e.denied).length > 0;
    if (e.opened > 0 || !refused) {
      shapes.push(svg("line", { x1, y1, x2, y2, class: e.security, "stroke-width": Math.min(1 + Math.log2(1 + e.opened), 8) }));
    }
    if (refused) {
      shapes.push(svg("line", { x1: x1 + 4, y1: y1 + 4, x2: x2 + 4, y2: y2 + 4, class: "denied", "stroke-width": 2, "data-edge": `${e.source} -> ${e.destination}` }));
    }
  }
  for (const [name, [x, y]] of at) {
    shapes.push(svg("circle", { cx: x, cy: y, r: 7, "data-workload": name }));
    const right = x >= cx;
    shapes.push(svg("text", { x: x + (right ? 11 : -11), y: y + 4, "text-anchor": right ? "start" : "end" }, name));
  }
  if (names.length === 0) {
    shapes.push(svg("text", { x: cx, y: cy, "text-anchor": "middle" }, "no traffic reported in the window"));
  }
  graph.replaceChildren(...shapes);
}

let current = "overview";

async function refresh() {
  try {
    await pages[current]();
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = current;
  } catch (error) {
    document.getElementById("updated").textContent = `could not load: ${error.message}`;
  }
}

// A hash of "#explain?from=...&to=..." fills the form and explains: an
// explanation can be linked to.
function show(hash) {
  const [tab, query] = hash.split("?");
  current = pages[tab] ? tab : "overview";
  if (current === "explain" && query) {
    const params = new URLSearchParams(query);
    for (const name of ["from", "to", "from_ip"]) {
      if (params.has(name)) document.getElementById(`explain-${name.replace("_", "-")}`).value = params.get(name);
    }
    document.getElementById("explain-plaintext").checked = params.get("plaintext") === "true";
    if (params.has("from") && params.has("to")) explain();
  }
  for (const section of document.querySelectorAll(".tab")) {
    section.classList.toggle("active", section.id === current);
  }
  for (const link of document.querySelectorAll("#tabs a")) {
    link.classList.toggle("active", link.dataset.tab === current);
  }
  refresh();
}

async function explain() {
  const query = new URLSearchParams({
    from: document.getElementById("explain-from").value,
    to: document.getElementById("explain-to").value,
    plaintext: document.getElementById("explain-plaintext").checked ? "true" : "false",
    from_ip: document.getElementById("explain-from-ip").value,
  });
  const verdict = document.getElementById("explain-verdict");
  const report = document.getElementById("explain-report");
  try {
    const answer = await api(`/api/explain?${query}`);
    verdict.replaceChildren(yesNo(answer.allowed, "allowed", "denied"));
    report.textContent = answer.report;
  } catch (error) {
    verdict.replaceChildren(el("span", { class: "no" }, error.message));
    report.textContent = "";
  }
  document.body.dataset.explained = "true";
}

document.getElementById("explain-form").addEventListener("submit", (event) => {
  event.preventDefault();
  explain();
});
document.getElementById("workloads-filter").addEventListener("input", () => refresh());
document.getElementById("traffic-filter").addEventListener("input", () => refresh());
document.getElementById("traffic-filter").addEventListener("submit", (event) => event.preventDefault());
document.getElementById("workloads-filter").addEventListener("submit", (event) => event.preventDefault());
window.addEventListener("hashchange", () => show(location.hash.slice(1)));
show(location.hash.slice(1) || "overview");
setInterval(refresh, REFRESH_MS);
