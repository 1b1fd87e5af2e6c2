// The admin view: every table from /api/v1/admin, refreshed every few seconds; hosts can be
// added, drained and enabled, and a user's desktop logged off, from here.
import { api, el, show } from "./api.js";
import { addUser, auditPath, closeTokens, hostRemove, poolActions, profileActions,
         revokeButton, tokenRevoke, tokensPath, userActions, values,
         versionActions } from "./admin_manage.js";
import { startLayers } from "./admin_layers.js";

const $ = (id) => document.getElementById(id);
const MAX_DESKTOP_ROWS = 500;  // more is unreadable and slow; the filter narrows it
const HELD = new Set(["reserved", "in_use", "idle"]);  // a user holds the desktop
const DEFAULT_GRACE_MIN = 30;

const when = (iso) => {
  if (!iso) return "";
  const at = new Date(iso);
  return Number.isNaN(at.getTime()) ? iso : at.toLocaleString();
};
const span = (s) => {
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${Math.round(s / 3600)} h`;
};
const ago = (iso) => {
  const s = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
  return Number.isNaN(s) ? "" : span(s);
};
const ms = (v) => (v === null || v === undefined ? "" : String(v));
const mib = (bytes) => `${(bytes / 1048576).toFixed(0)} MiB`;
const gib = (mebibytes) => {
  const g = mebibytes / 1024;
  return `${g >= 10 ? g.toFixed(0) : g.toFixed(1)} GiB`;
};
const bytes = (b) => {
  if (b === null || b === undefined) return "";
  const t = b / 2 ** 40;
  return t >= 1 ? `${t.toFixed(1)} TiB` : `${(b / 2 ** 30).toFixed(1)} GiB`;
};
const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;
const badge = (prefix) => (v) => el("span", { className: `badge ${prefix}-${v}`, text: v });
const counts = (c) => Object.entries(c || {}).sort()
  .map(([state, n]) => `${state} ${n}`).join(" · ");
const fragment = (...nodes) => {
  const f = document.createDocumentFragment();
  for (const n of nodes) if (n !== null && n !== undefined) f.append(n);
  return f;
};

// --- hosts --------------------------------------------------------------------------------

// Sessions still open on a host: its desktops that a user holds (from the desktops table).
const sessionsOn = (host) => lastDesktops.filter((d) => d.host === host && HELD.has(d.state))
  .length;

function hostState(h) {
  const parts = [badge("host")(h.state)];
  if (h.state === "draining") {
    const deadline = new Date(h.drain_deadline);
    const left = Math.round((deadline.getTime() - Date.now()) / 1000);
    const due = Number.isNaN(left) ? "" : left > 0 ? ` (in ${span(left)})` : " (passed)";
    parts.push(
      el("div", { className: "drain-deadline", "data-deadline": h.drain_deadline || null,
                  text: h.drain_deadline ? `logs users off at ${when(h.drain_deadline)}${due}`
                                         : "no deadline" }),
      el("div", { className: "drain-progress",
                  text: `${plural(h.desktops ?? 0, "desktop", "desktops")} still on it · ` +
                        `${plural(sessionsOn(h.name), "session", "sessions")} still open` }));
  } else if (h.state === "maintenance") {
    parts.push(el("div", { className: "drain-progress",
                           text: "in maintenance: drained, no session left" }));
  }
  if (h.last_error) parts.push(el("div", { className: "host-error", text: h.last_error }));
  return fragment(...parts);
}

// A pool whose template disk cannot be used (missing or corrupt) says so, with why and when
// it is tried next.
function poolStatus(p) {
  if (!p.fault) return badge("pool")(p.status);
  return fragment(
    badge("pool")(p.status), " ", badge("pool")("broken"),
    el("div", { className: "pool-fault", text: p.fault }),
    el("div", { className: "drain-progress",
                text: `since ${when(p.fault_since)} · ${plural(p.fault_failures, "failed try",
                       "failed tries")} · next try ${when(p.fault_retry_at) || "now"}` }));
}

function hostLimits(h) {
  return [`CPU ${h.cpu_overcommit}:1`, `memory ${h.memory_overcommit}:1`,
          h.max_desktops === null || h.max_desktops === undefined ? "no desktop limit"
            : `at most ${plural(h.max_desktops, "desktop", "desktops")}`,
          `${h.max_provisioning} provisioning`, `${h.transfer_slots} transfers`].join(" · ");
}

function hostActions(h) {
  const buttons = [];
  if (h.state === "enabled" || h.state === "draining") {
    buttons.push(el("button", { type: "button", className: "drain",
                                text: h.state === "draining" ? "New deadline" : "Drain",
                                onclick: () => drainHost(h) }));
  }
  if (["draining", "maintenance", "down"].includes(h.state)) {
    buttons.push(el("button", { type: "button", className: "enable", text: "Enable",
                                onclick: () => enableHost(h) }));
  }
  buttons.push(hostRemove(h, ui));
  return fragment(...buttons);
}

function drainHost(h) {
  ask({
    title: h.state === "draining" ? `New drain deadline for ${h.name}` : `Drain ${h.name}`,
    text: `${h.name} takes no new desktops or sessions. Its users are warned now and logged ` +
          "off at the deadline; its free desktops are replaced on other hosts. When no " +
          "session is left it is in maintenance.",
    ok: "Drain", grace: true,
    action: (minutes) => api("POST", `/api/v1/admin/hosts/${encodeURIComponent(h.name)}/drain`,
                             { grace_s: Math.round(minutes * 60) }),
    done: (data) => ["hosts-message", `${data.name} is draining; users are logged off at ` +
                     `${when(data.drain_deadline)}`],
  });
}

async function enableHost(h) {
  const answer = await api("POST",
                           `/api/v1/admin/hosts/${encodeURIComponent(h.name)}/enable`);
  if (answer.ok) say("hosts-message", "ready", `${answer.data.name} is ${answer.data.state}`);
  else say("hosts-message", "error", answer.error);
  await refresh();
}

async function addHost(event) {
  event.preventDefault();
  const form = $("add-host-form");
  const button = $("add-host-button");
  const error = $("add-host-error");
  const body = { name: form.elements.name.value.trim(), uri: form.elements.uri.value.trim() };
  for (const field of ["cpu_overcommit", "memory_overcommit", "max_desktops",
                       "max_provisioning", "transfer_slots"]) {
    const raw = form.elements[field].value.trim();
    if (raw !== "") body[field] = Number(raw);
  }
  show(error, false);
  button.disabled = true;
  button.textContent = "Connecting…";
  let answer;
  try {
    answer = await api("POST", "/api/v1/admin/hosts", body);
  } finally {
    button.disabled = false;
    button.textContent = "Add host";
  }
  if (!answer.ok) {
    error.textContent = answer.error;
    show(error, true);
    return;
  }
  const h = answer.data;
  say("hosts-message", "ready", `added host ${h.name}: ${h.hypervisor} ${h.arch}, ` +
      `${h.vcpus} vCPUs, ${gib(h.memory_mib)} memory, ${bytes(h.storage_free_bytes)} free`);
  form.reset();
  $("add-host").open = false;
  await refresh();
}

// --- desktops -----------------------------------------------------------------------------

function desktopNotes(d) {
  return fragment(d.last_error ? el("div", { className: "desktop-error", text: d.last_error })
                               : null,
                  d.notice ? el("div", { className: "notice", text: d.notice }) : null);
}

function logOff(d) {
  ask({
    title: `Log off ${d.user || "the user"} from ${d.name}`,
    text: `The session on ${d.name} ends now and unsaved work in it is lost; the desktop ` +
          "then goes the way its pool's log-off policy says.",
    ok: "Log off",
    action: () => api("POST", `/api/v1/admin/desktops/${encodeURIComponent(d.id)}/logoff`),
    done: (data) => ["desktops-message", `logged off ${d.name}` +
                     (d.user ? ` (${d.user})` : "") + `; it is now ${data.state}`],
  });
}

// --- pools -------------------------------------------------------------------------------

// A rollout's progress: the pool's desktops by template version, newest first (retired ones
// left out), from the desktops table, which is read first.
function versionsOf(p) {
  const n = {};
  for (const d of lastDesktops) {
    if (d.pool === p.name && d.state !== "retired") n[d.version] = (n[d.version] || 0) + 1;
  }
  return Object.entries(n).sort(([a], [b]) => b - a).map(([v, c]) => `v${v} ${c}`)
    .join(" · ");
}

// --- the confirmation dialog and messages --------------------------------------------------

const dialog = { spec: null };

function ask(spec) {
  dialog.spec = spec;
  $("confirm-title").textContent = spec.title;
  $("confirm-text").textContent = spec.text;
  $("confirm-ok").textContent = spec.ok;
  $("confirm-ok").disabled = false;
  show($("confirm-error"), false);
  show($("confirm-grace-label"), Boolean(spec.grace));
  $("confirm-grace").value = String(DEFAULT_GRACE_MIN);
  // Number fields a dialog asks for: [name, label, value]; empty ones are left out.
  $("confirm-fields").replaceChildren(...(spec.fields || []).map(([name, label, value]) =>
    el("label", {}, `${label} `, el("input", { name, type: "number", min: "0", step: "1",
                                               value: String(value ?? "") }))));
  $("confirm").showModal();
  (spec.grace ? $("confirm-grace") : $("confirm-ok")).focus();
}

function dialogError(text) {
  $("confirm-error").textContent = text;
  show($("confirm-error"), true);
}

async function confirmed(event) {
  event.preventDefault();
  const spec = dialog.spec;
  if (!spec) return;
  let minutes = null;
  if (spec.fields) {
    minutes = {};
    for (const input of $("confirm-fields").querySelectorAll("input")) {
      const raw = input.value.trim();
      if (raw === "") continue;
      const n = Number(raw);
      if (!Number.isInteger(n) || n < 0) {
        dialogError(`${input.name} is a whole number, 0 or more`);
        return;
      }
      minutes[input.name] = n;
    }
  }
  if (spec.grace) {
    const raw = $("confirm-grace").value.trim();
    minutes = Number(raw);
    if (raw === "" || !Number.isFinite(minutes) || minutes < 0) {
      dialogError("the grace is a number of minutes, 0 or more");
      return;
    }
  }
  const ok = $("confirm-ok");
  ok.disabled = true;
  let answer;
  try {
    answer = await spec.action(minutes);
  } finally {
    ok.disabled = false;
  }
  if (!answer.ok) {
    dialogError(answer.error);
    return;
  }
  dialog.spec = null;
  $("confirm").close();
  const [where, text] = spec.done(answer.data);
  say(where, "ready", text);
  await refresh();
}

function say(id, kind, text) {
  const box = $(id);
  box.dataset.kind = kind;
  box.textContent = text;
  show(box, Boolean(text));
}

const ui = { ask, say, refresh: () => refresh() };

// --- the tables ---------------------------------------------------------------------------

// Each table: its columns as [heading, value of a row, class of the cell].
const TABLES = {
  desktops: {
    path: "/api/v1/admin/desktops",
    columns: [
      ["Name", (d) => d.name, "name"], ["Hostname", (d) => d.hostname, "hostname"],
      ["Pool", (d) => d.pool || ""],
      ["Host", (d) => el("span", { className: d.placement_reason ? "has-reason" : null,
                                   title: d.placement_reason || null, text: d.host }), "host"],
      ["v", (d) => d.version, "num"],
      ["State", (d) => badge("state")(d.state), "state"],
      ["Power", (d) => badge("power")(d.power_state), "power"],
      ["Task", (d) => d.task || ""], ["User", (d) => d.user || "", "user"],
      ["Consoles", (d) => d.console_connections, "num"],
      ["In state", (d) => ago(d.state_changed_at), "num"],
      ["Retries", (d) => d.retry_count, "num"],
      ["Last error / notice", desktopNotes, "notes"],
      ["", (d) => (HELD.has(d.state)
        ? el("button", { type: "button", className: "logoff", text: "Log off",
                         onclick: () => logOff(d) }) : ""), "actions"]],
    key: (d) => d.id,
    attrs: (d) => ({ "data-name": d.name, "data-state": d.state }),
  },
  pools: {
    path: "/api/v1/admin/pools",
    columns: [
      ["Name", (p) => p.name, "name"], ["Status", poolStatus, "pool-status"],
      ["Template", (p) => `${p.template} v${p.version}` +
                          (p.previous_version ? ` (was v${p.previous_version})` : "")],
      ["Kind", (p) => `${p.kind}, ${p.assignment}`], ["Clone", (p) => p.clone_mode],
      ["Min", (p) => p.min_size, "num"], ["Max", (p) => p.max_size, "num"],
      ["Spare", (p) => p.spare, "num"],
      ["Session start (s)", (p) => p.session_start_timeout_s, "num"],
      ["Roaming profiles", (p) => (p.roaming_profiles
        ? `yes; a second session: ${p.second_session.replace("_", "-")}` +
          (p.profile_exclusions.length ? `; kept out: ${p.profile_exclusions.join(", ")}` : "")
        : "")],
      ["Balancing", (p) => (p.balance ? "yes" : ""), "balance"],
      ["Redirected folders", (p) => (p.redirect_folders || []).join(", ")],
      ["Desktops by state", (p) => counts(p.counts), "counts"],
      ["By version", versionsOf, "versions"],
      ["", (p) => poolActions(p, ui), "actions"]],
    key: (p) => p.id,
    attrs: (p) => ({ "data-name": p.name, "data-status": p.status,
                     "data-balance": p.balance ? "yes" : "no",
                     "data-broken": p.fault ? "yes" : "no" }),
  },
  users: {
    path: "/api/v1/admin/users",
    columns: [
      ["Name", (u) => u.name, "name"], ["Display name", (u) => u.display_name],
      ["Source", (u) => u.source], ["Admin", (u) => (u.is_admin ? "yes" : "")],
      ["Groups", (u) => u.groups.join(", ")],
      ["Status", (u) => badge("user")(u.disabled ? "disabled" : "enabled"), "user-status"],
      ["Last sign-in", (u) => when(u.last_login_at)], ["", (u) => userActions(u, ui), "actions"]],
    key: (u) => u.name,
    attrs: (u) => ({ "data-name": u.name }),
  },
  tokens: {
    path: tokensPath,
    columns: [
      ["Kind", (t) => (t.kind === "api" ? "API token" : "browser session"), "kind"],
      ["Label", (t) => t.label, "name"], ["Created", (t) => when(t.created_at), "created"],
      ["Expires", (t) => (t.expires_at ? when(t.expires_at) : "never"), "expires"],
      ["", (t) => (t.current ? "this browser" : ""), "muted"],
      ["", (t) => tokenRevoke(t, ui), "actions"]],
    key: (t) => t.id,
    attrs: (t) => ({ "data-kind": t.kind, "data-label": t.label }),
  },
  entitlements: {
    path: "/api/v1/admin/entitlements",
    columns: [
      ["Pool", (g) => g.pool, "name"], ["To", (g) => g.kind], ["Name", (g) => g.principal, "user"],
      ["", (g) => revokeButton(g, ui), "actions"]],
    key: (g) => `${g.pool}/${g.kind}/${g.principal}`,
    attrs: (g) => ({ "data-name": `${g.pool}/${g.kind}/${g.principal}` }),
  },
  audit: {
    path: auditPath,
    columns: [
      ["At", (a) => when(a.at)], ["Actor", (a) => a.actor || "", "user"],
      ["From", (a) => a.address || ""], ["Action", (a) => a.action, "kind"],
      ["Target", (a) => a.target || "", "name"], ["Old", (a) => values(a.old), "msg"],
      ["New", (a) => values(a.new), "msg"]],
    key: (a) => a.id,
    attrs: (a) => ({ "data-action": a.action }),
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
      ["Session", (l) => ms(l.session_ms), "num session"],
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
      ["Host", (h) => fragment(el("div", { className: "name", text: h.name }),
                               el("div", { className: "uri", text: h.uri })), "host"],
      ["State", hostState, "state"],
      ["Hypervisor", (h) => [h.hypervisor, h.arch, h.domain_type].filter(Boolean).join(" · "),
       "hypervisor"],
      ["vCPUs", (h) => h.vcpus || "", "num vcpus"],
      ["Memory", (h) => (h.memory_mib ? gib(h.memory_mib) : ""), "num memory"],
      ["Free storage", (h) => bytes(h.storage_free_bytes)
        + (h.shared_storage ? ` · shared: ${h.shared_storage}` : ""), "num storage"],
      ["Limits", hostLimits, "limits"],
      ["Host set", (h) => (h.host_set || "default") + (h.set_balances ? " · balancing" : ""),
       "host-set"],
      ["Desktops", (h) => h.desktops ?? "", "num desktops"],
      ["Last seen", (h) => (h.last_seen_at
        ? el("span", { title: when(h.last_seen_at), text: `${ago(h.last_seen_at)} ago` })
        : "never"), "num last-seen"],
      ["", hostActions, "actions"]],
    key: (h) => h.id,
    attrs: (h) => ({ "data-name": h.name, "data-state": h.state,
                     "data-set": h.host_set || "", "data-balances": h.set_balances ? "yes" : "no",
                     className: h.state === "down" ? "host-down-row" : null }),
  },
  templates: {
    path: "/api/v1/admin/templates",
    columns: [
      ["Template", (t) => t.template, "name"], ["v", (t) => t.number, "num"],
      ["Size", (t) => mib(t.image_size_bytes), "num"], ["Customization", (t) => t.customization],
      ["Published", (t) => when(t.published_at)], ["", (t) => versionActions(t, ui), "actions"]],
    key: (t) => t.id,
    attrs: (t) => ({ "data-name": `${t.template}/${t.number}` }),
  },
  profiles: {
    path: "/api/v1/admin/profiles",
    columns: [
      ["User", (p) => p.user, "name"], ["Generation", (p) => p.generation, "num"],
      ["Kept", (p) => p.generations_kept, "num"],
      ["Size / quota", (p) => `${mib(p.size_bytes)} / ${mib(p.quota_bytes)}`, "num"],
      ["Last write-back", (p) => (p.committed_at ? `${when(p.committed_at)}, ` +
        `${mib(p.last_writeback_bytes)}` + (p.last_writeback_s == null ? ""
          : ` in ${p.last_writeback_s.toFixed(1)} s`) : "never")],
      ["Open on", (p) => p.open_sessions.join(", ")],
      ["Latest on", (p) => p.latest_on.join(", ") || "profile store"],
      ["Set aside", (p) => p.unclean.map(([d, why]) => `${d}: ${why}`).join("; "), "notes"],
      ["Conflicts", (p) => p.conflicts.join("; "), "notes"],
      ["", (p) => profileActions(p, ui), "actions"]],
    key: (p) => p.user,
    attrs: (p) => ({ "data-name": p.user }),
  },
  copies: {  // profile layers crossing to a host for a logon there
    path: "/api/v1/admin/profile-copies",
    columns: [["User", (c) => `${c.user} (generation ${c.generation})`, "name"],
      ["To host", (c) => c.host], ["Copied", (c) => `${mib(c.bytes_done)} of `
        + `${mib(c.bytes_total)}`, "num"], ["By", (c) => c.copier || ""]],
    key: (c) => `${c.layer_id}:${c.host}`,
    attrs: (c) => ({ "data-name": `${c.user}:${c.generation}:${c.host}` }),
  },
  credentials: {  // machine credentials: never their content
    path: "/api/v1/admin/machine-credentials",
    columns: [["Desktop", (c) => c.desktop, "name"], ["Path", (c) => c.path],
      ["Bytes", (c) => c.size, "num"], ["sha256", (c) => c.sha256.slice(0, 16)]],
    key: (c) => `${c.desktop}:${c.path}`,
    attrs: (c) => ({ "data-name": `${c.desktop}:${c.path}` }),
  },
};
// The hosts' drain progress counts sessions from the desktops, so desktops come first.
// A table whose path is null (the tokens, with no user chosen) is not fetched.
const ORDER = ["desktops", "hosts", "pools", "sessions", "logons", "events", "templates",
               "users", "tokens", "entitlements", "profiles", "copies", "credentials",
               "audit"];
const pathOf = (name) => (typeof TABLES[name].path === "function" ? TABLES[name].path()
                                                                    : TABLES[name].path);

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
    const attrs = { "data-id": spec.key(row), ...(spec.attrs ? spec.attrs(row) : {}) };
    body.append(el("tr", attrs, ...spec.columns.map(([, value, cls]) => {
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
                  d.last_error, d.notice].join(" ").toLowerCase();
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

function renderHosts(hosts) {
  render("hosts", hosts);
  const byState = {};
  for (const h of hosts) byState[h.state] = (byState[h.state] || 0) + 1;
  const unusual = Object.entries(byState).filter(([state]) => state !== "enabled").sort()
    .map(([state, n]) => `${n} ${state}`);
  $("hosts-count").textContent = `(${hosts.length}` +
    (unusual.length ? `; ${unusual.join(", ")})` : ")");
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
  const names = ORDER.filter((n) => pathOf(n) !== null);
  const answers = await Promise.all(names.map((n) => api("GET", pathOf(n))));
  const denied = answers.find((a) => a.status === 401 || a.status === 403);
  if (denied) {
    refused(denied.error, denied.status === 401);
    return;
  }
  const gone = names.indexOf("tokens");
  if (gone >= 0 && answers[gone].status === 404) {
    closeTokens();  // the user was deleted meanwhile: nothing left to show
    answers[gone] = { ok: false, status: 404, error: null };
  }
  const failed = answers.filter((a) => !a.ok && a.error).map((a) => a.error);
  $("admin-error").textContent = failed.join("; ");
  show($("admin-error"), failed.length > 0);
  names.forEach((name, i) => {
    if (!answers[i].ok) return;
    if (name === "desktops") {
      lastDesktops = answers[i].data;
      renderDesktops();
    } else if (name === "hosts") {
      renderHosts(answers[i].data);
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
  $("add-host-form").addEventListener("submit", addHost);
  $("add-user-form").addEventListener("submit", (event) => addUser(event, ui));
  for (const id of ["audit-actor", "audit-target"]) {
    $(id).addEventListener("change", () => refresh());
  }
  $("tokens-close").addEventListener("click", closeTokens);
  $("confirm-form").addEventListener("submit", confirmed);
  $("confirm-cancel").addEventListener("click", () => {
    dialog.spec = null;
    $("confirm").close();
  });
  $("confirm").addEventListener("close", () => { dialog.spec = null; });
  startLayers();
  await refresh();
}

start();
