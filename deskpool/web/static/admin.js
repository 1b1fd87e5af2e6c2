// The admin view: every table from /api/v1/admin, refreshed every few seconds.
import { api, el, show } from "./api.js";

const $ = (id) => document.getElementById(id);
const MAX_DESKTOP_ROWS = 500;  // more is unreadable and slow; the filter narrows it

const when = (iso) => {
  if (!iso) return "";
  const at = new Date(iso);
  return Number.isNaN(at.getTime()) ? iso : at.toLocaleString();
};
const ago = (iso) => {
  const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
  if (Number.isNaN(s)) return "";
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
};
const ms = (v) => (v === null || v === undefined ? "" : String(v));
const mib = (bytes) => `${(bytes / 1048576).toFixed(0)} MiB`;
const badge = (prefix) => (v) => el("span", { className: `badge ${prefix}-${v}`, text: v });
const counts = (c) => Object.entries(c || {}).sort()
  .map(([state, n]) => `${state} ${n}`).join(" · ");

// Each table: its columns as [heading, value of a row, class of the cell].
const TABLES = {
  desktops: {
    path: "/api/v1/admin/desktops",
    columns: [
      ["Name", (d) => d.name, "name"], ["Hostname", (d) => d.hostname, "hostname"],
      ["Pool", (d) => d.pool || ""], ["Host", (d) => el("span", { title: d.placement_reason || null, text: d.host })], ["v", (d) => d.version, "num"],
      ["State", (d) => badge("state")(d.state), "state"],
      ["Power", (d) => badge("power")(d.power_state), "power"],
      ["Task", (d) => d.task || ""], ["User", (d) => d.user || "", "user"],
      ["Consoles", (d) => d.console_connections, "num"],
      ["In state", (d) => ago(d.state_changed_at), "num"],
      ["Retries", (d) => d.retry_count, "num"],
      ["Last error", (d) => [d.last_error, d.notice].filter(Boolean).join(" — "),
       "last-error"]],
    key: (d) => d.id,
  },
  pools: {
    path: "/api/v1/admin/pools",
    columns: [
      ["Name", (p) => p.name, "name"], ["Template", (p) => `${p.template} v${p.version}`],
      ["Kind", (p) => `${p.kind}, ${p.assignment}`], ["Clone", (p) => p.clone_mode],
      ["Min", (p) => p.min_size, "num"], ["Max", (p) => p.max_size, "num"],
      ["Spare", (p) => p.spare, "num"], ["Desktops by state", (p) => counts(p.counts), "counts"]],
    key: (p) => p.id,
  },
  sessions: {
    path: "/api/v1/admin/sessions",
    columns: [
      ["Desktop", (s) => s.desktop, "name"], ["User", (s) => s.user || "", "user"],
      ["State", (s) => badge("state")(s.state)], ["Reserved", (s) => when(s.reserved_at)],
      ["Consoles", (s) => s.console_connections, "num"],
      ["Disconnected", (s) => when(s.disconnected_at)],
      ["Guest user", (s) => s.guest_user || ""]],
    key: (s) => s.desktop_id,
  },
  logons: {
    path: "/api/v1/admin/logons?limit=50",
    columns: [
      ["At", (l) => when(l.requested_at)], ["User", (l) => l.user, "user"],
      ["Pool", (l) => l.pool], ["Desktop", (l) => l.desktop || "", "name"],
      ["Outcome", (l) => badge("outcome")(l.outcome), "outcome"],
      ["Reconnect", (l) => (l.reconnect ? "yes" : "")],
      ["Queue", (l) => ms(l.queue_ms), "num queue"], ["Claim", (l) => ms(l.claim_ms), "num claim"],
      ["Power on", (l) => ms(l.power_on_ms), "num power-on"],
      ["Ready", (l) => ms(l.ready_ms), "num ready"],
      ["Connect", (l) => ms(l.connect_ms), "num connect"],
      ["Message", (l) => l.message || "", "msg"]],
    key: (l) => l.id,
  },
  events: {
    path: "/api/v1/admin/events?limit=100",
    columns: [
      ["At", (e) => when(e.at)], ["Severity", (e) => badge("severity")(e.severity)],
      ["Kind", (e) => e.kind, "kind"], ["User", (e) => e.user || ""],
      ["Pool", (e) => e.pool || ""], ["Desktop", (e) => e.desktop || ""],
      ["Message", (e) => e.message, "msg"]],
    key: (e) => e.id,
  },
  hosts: {
    path: "/api/v1/admin/hosts",
    columns: [
      ["Name", (h) => h.name, "name"], ["URI", (h) => h.uri],
      ["State", (h) => badge("host")(h.state)], ["Type", (h) => h.domain_type],
      ["CPUs", (h) => h.vcpus || "", "num"],
      ["Memory", (h) => (h.memory_mib ? `${(h.memory_mib / 1024).toFixed(1)} GiB` : ""), "num"],
      ["Desktops", (h) => h.desktops ?? "", "num"],
      ["Last error", (h) => h.last_error || "", "last-error"]],
    key: (h) => h.id,
  },
  templates: {
    path: "/api/v1/admin/templates",
    columns: [
      ["Template", (t) => t.template, "name"], ["v", (t) => t.number, "num"],
      ["Size", (t) => mib(t.image_size_bytes), "num"], ["Customization", (t) => t.customization],
      ["Published", (t) => when(t.published_at)]],
    key: (t) => t.id,
  },
};

let timer = null;
let refreshes = 0;
let lastDesktops = [];

function render(name, rows) {
  const table = $(name);
  const spec = TABLES[name];
  if (!table.tHead.rows.length) {
    table.tHead.append(el("tr", {}, ...spec.columns.map(([h, , cls]) =>
      el("th", { className: cls || null, text: h }))));
  }
  const body = document.createDocumentFragment();
  for (const row of rows) {
    body.append(el("tr", { "data-id": spec.key(row) }, ...spec.columns.map(([, value, cls]) => {
      const v = value(row);
      return el("td", { className: cls || null }, v instanceof Node ? v : String(v ?? ""));
    })));
  }
  if (!rows.length) {
    body.append(el("tr", { className: "empty" },
      el("td", { colspan: spec.columns.length, className: "muted", text: "none" })));
  }
  table.tBodies[0].replaceChildren(body);
  table.dataset.rows = String(rows.length);
}

function renderDesktops() {
  const words = $("desktop-filter").value.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const matching = lastDesktops.filter((d) => {
    const text = [d.name, d.hostname, d.user, d.state, d.pool, d.host, d.power_state,
                  d.last_error].join(" ").toLowerCase();
    return words.every((w) => text.includes(w));
  });
  render("desktops", matching.slice(0, MAX_DESKTOP_ROWS));
  const more = $("desktops-more");
  more.textContent = `showing ${MAX_DESKTOP_ROWS} of ${matching.length}; filter to narrow`;
  show(more, matching.length > MAX_DESKTOP_ROWS);
  const errors = lastDesktops.filter((d) => d.state === "error").length;
  $("desktops-count").textContent = `(${lastDesktops.length}` +
    (errors ? `, ${errors} in error)` : ")");
}

function refused(text, signIn) {
  const box = $("admin-refused");
  box.replaceChildren(text);
  if (signIn) {
    box.append(" ", el("a", { href: `/?next=${encodeURIComponent("/admin")}`, text: "Sign in" }));
  }
  show(box, true);
  show($("admin-data"), false);
  $("admin").dataset.state = "refused";
  clearTimeout(timer);
}

async function refresh() {
  clearTimeout(timer);
  const names = Object.keys(TABLES);
  const answers = await Promise.all(names.map((n) => api("GET", TABLES[n].path)));
  const denied = answers.find((a) => a.status === 401 || a.status === 403);
  if (denied) {
    refused(denied.error, denied.status === 401);
    return;
  }
  const failed = answers.filter((a) => !a.ok).map((a) => a.error);
  $("admin-error").textContent = failed.join("; ");
  show($("admin-error"), failed.length > 0);
  names.forEach((name, i) => {
    if (!answers[i].ok) return;
    if (name === "desktops") {
      lastDesktops = answers[i].data;
      renderDesktops();
    } else {
      render(name, answers[i].data);
    }
  });
  refreshes += 1;
  const stamp = $("refreshed");
  stamp.dataset.count = String(refreshes);
  stamp.textContent = `updated ${new Date().toLocaleTimeString()}`;
  $("admin").dataset.state = "loaded";
  schedule();
}

function schedule() {
  clearTimeout(timer);
  const every = Number($("interval").value);
  if (every > 0) {
    timer = setTimeout(() => (document.hidden ? schedule() : refresh()), every);
  }
}

async function start() {
  const me = await api("GET", "/api/v1/me");
  if (!me.ok) {
    refused(me.status === 401 ? "Sign in first to see the admin view." : me.error,
            me.status === 401);
    return;
  }
  $("who").textContent = me.data.name;
  show($("who"), true);
  if (!me.data.is_admin) {
    refused(`${me.data.name} is not an administrator: this view is for administrators only.`,
            false);
    return;
  }
  show($("admin-data"), true);
  $("desktop-filter").addEventListener("input", renderDesktops);
  $("interval").addEventListener("change", () => refresh());
  await refresh();
}

start();
