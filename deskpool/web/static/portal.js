// The user portal: sign in, my pools (Connect), my desktops (console, SPICE and RDP files, disconnect,
// log off).
import { api, el, errorText, safeNext, show } from "./api.js";
import { openConsole } from "./console.js";

const RETRY_MS = 3000;     // a pending connect asks again this often
const RETRY_FOR_MS = 15 * 60 * 1000;  // and gives up after this long
const REFRESH_MS = 10000;  // the lists follow the desktops' states this often

const $ = (id) => document.getElementById(id);
const page = {
  user: null,
  console: null,    // the open console's handle
  retry: null,      // the pending connect's timer
  pendingSince: 0,  // when the pending connect began
  refresher: null,
  busy: new Set(),  // pools with a connect in flight
};

function setMessage(kind, text, note) {
  const message = $("message");
  message.dataset.kind = kind;
  message.replaceChildren(el("span", { className: "text", text }));
  if (note) message.append(" ", el("span", { className: "muted", text: note }));
  show(message, Boolean(text));
}

function signedOut(why) {
  stopRetry();
  closeConsole();
  clearInterval(page.refresher);
  page.user = null;
  $("portal").dataset.state = "signed-out";
  for (const id of ["home", "who", "signout", "admin-link"]) show($(id), false);
  show($("signin"), true);
  const error = $("signin-error");
  error.textContent = why || "";
  error.dataset.kind = "info";
  show(error, Boolean(why));
  $("password").value = "";
  $("username").focus();
}

function signedIn(user) {
  page.user = user;
  $("portal").dataset.state = "home";
  $("who").textContent = user.display_name && user.display_name !== user.name
    ? `${user.display_name} (${user.name})` : user.name;
  show($("signin"), false);
  for (const id of ["home", "who", "signout"]) show($(id), true);
  show($("admin-link"), user.is_admin);
  setMessage("info", "");
  clearInterval(page.refresher);
  page.refresher = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  return refresh();
}

// Every API answer goes through here: a 401 means the session is gone.
function expired(answer) {
  if (answer.status === 401 && page.user) {
    signedOut(`${answer.error}. Your session ended; sign in again.`);
    return true;
  }
  return false;
}

async function refresh() {
  if (!page.user) return;
  const [pools, desktops, messages] = await Promise.all([
    api("GET", "/api/v1/pools"), api("GET", "/api/v1/desktops"),
    api("GET", "/api/v1/messages")]);
  if (expired(pools) || expired(desktops)) return;
  if (messages.ok) renderMessages(messages.data);
  if (!pools.ok) setMessage("error", pools.error);
  else renderPools(pools.data);
  if (!desktops.ok) setMessage("error", desktops.error);
  else renderDesktops(desktops.data);
  $("home").dataset.loaded = "true";
}

function renderPools(pools) {
  const list = $("pools");
  list.replaceChildren(...pools.map((pool) => el("li", { "data-pool": pool.name },
    el("h3", { text: pool.name }),
    el("p", { className: "muted", text: `${pool.template} · ${pool.kind}, ${pool.assignment}` }),
    el("p", { className: "ready", text: pool.mine ? `yours: ${pool.mine}`
                                                  : `${pool.ready} ready` }),
    el("button", { type: "button", className: "connect", disabled: page.busy.has(pool.name),
                   text: pool.mine ? "Reconnect" : "Connect",
                   onclick: () => connect(pool.name) }))));
  show($("no-pools"), pools.length === 0);
}

// What happened to the user's desktops (a crash, a host down): the newest first.
function renderMessages(messages) {
  $("message-list").replaceChildren(...messages.map((m) => el("li",
    { className: `severity-${m.severity}` },
    el("time", { datetime: m.at, text: new Date(m.at).toLocaleString() }), " ", m.message)));
  show($("messages"), messages.length > 0);
}

function renderDesktops(desktops) {
  const body = $("desktops").tBodies[0];
  body.replaceChildren(...desktops.map((d) => {
    const open = page.console && page.console.desktopId === d.id && !page.console.closed;
    return el("tr", { "data-desktop-id": d.id, "data-name": d.name, "data-state": d.state },
      el("td", { className: "name" }, d.name,
        d.notice ? el("div", { className: "notice", text: d.notice }) : null),
      el("td", { className: "hostname", text: d.hostname }),
      el("td", { text: d.pool }),
      el("td", {}, el("span", { className: `badge state-${d.state}`, text: d.state })),
      el("td", { className: "actions" },
        el("button", { type: "button", className: "open-console", text: "Open console",
                       onclick: () => showConsole(d) }),
        el("button", { type: "button", className: "disconnect", text: "Disconnect",
                       disabled: !open, onclick: () => closeConsole() }),
        el("a", { className: "button spice-file", text: "SPICE file",
                  href: `/api/v1/desktops/${encodeURIComponent(d.id)}/console.vv`,
                  download: `${d.name}.vv`,
                  title: "a .vv file for remote-viewer, good for one connection within a minute" }),
        el("button", { type: "button", className: "rdp-file", text: "RDP file",
                       title: "an .rdp file for mstsc or xfreerdp, and its one-time password",
                       onclick: () => rdpFile(d) }),
        el("button", { type: "button", className: "logoff", text: "Log off",
                       onclick: () => logOff(d) })));
  }));
  show($("desktops"), desktops.length > 0);
  show($("no-desktops"), desktops.length === 0);
}

function stopRetry() {
  clearTimeout(page.retry);
  page.retry = null;
}

async function connect(pool, again = false) {
  stopRetry();
  if (!again) page.pendingSince = Date.now();
  if (page.busy.has(pool)) return;
  page.busy.add(pool);
  setButtons(pool, true);
  setMessage("info", `connecting to ${pool}…`);
  let answer;
  try {
    answer = await api("POST", `/api/v1/pools/${encodeURIComponent(pool)}/connect`);
  } finally {
    page.busy.delete(pool);
    setButtons(pool, false);
  }
  if (expired(answer) || !page.user) return;
  if (!answer.ok) {
    setMessage("error", answer.error);
  } else if (answer.data.status === "pending" && Date.now() - page.pendingSince > RETRY_FOR_MS) {
    setMessage("error", `${answer.data.message} — still not ready after ` +
               `${RETRY_FOR_MS / 60000} minutes; please try again later or ask your administrator`);
  } else if (answer.data.status === "pending") {
    setMessage("pending", answer.data.message,
               `(asking again every ${RETRY_MS / 1000} s)`);
    page.retry = setTimeout(() => connect(pool, true), RETRY_MS);
  } else {
    const d = answer.data;
    setMessage("ready", d.message);
    $("message").dataset.reconnect = String(d.reconnect);
    showConsole({ id: d.desktop_id, name: d.desktop, hostname: d.hostname });
  }
  await refresh();
}

function setButtons(pool, disabled) {
  const item = $("pools").querySelector(`li[data-pool="${CSS.escape(pool)}"] button`);
  if (item) item.disabled = disabled;
}

function showConsole(desktop) {
  const current = page.console;
  if (current && current.desktopId === desktop.id && !current.closed) return;
  closeConsole();
  $("console-desktop").textContent = desktop.name;
  $("console-hostname").textContent = desktop.hostname ? `hostname ${desktop.hostname}` : "";
  $("console").dataset.desktopId = desktop.id;
  $("console").dataset.hostname = desktop.hostname || "";
  $("console-window").href = `/console/${encodeURIComponent(desktop.id)}`;
  show($("console"), true);
  const handle = openConsole({
    desktopId: desktop.id, desktopName: desktop.name,
    screen: $("console-screen"), status: $("console-status"),
    onChange: (state) => {
      if (state === "signed-out") expired({ status: 401, error: "sign in first" });
      if (state === "connected" || state === "disconnected") {
        handle.closed = state === "disconnected";
        if (page.user) refresh();
      }
      $("console-disconnect").disabled = state === "disconnected" || state === "error";
    },
  });
  handle.closed = false;
  page.console = handle;
  $("console-disconnect").disabled = false;
}

function closeConsole() {
  const handle = page.console;
  page.console = null;
  if (handle) {
    handle.closed = true;
    handle.disconnect();
  }
  $("console-screen").replaceChildren();
  $("console-disconnect").disabled = true;
}

// The .rdp file is saved as a download; its one-time password (in a header: the file format
// has no clear-text password) is shown here, for the RDP client's password prompt.
async function rdpFile(desktop) {
  let response;
  try {
    response = await fetch(`/api/v1/desktops/${encodeURIComponent(desktop.id)}/console.rdp`,
                           { credentials: "same-origin" });
  } catch (err) {
    setMessage("error", `the broker did not answer (${err.message || err}); try again`);
    return;
  }
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    const answer = { ok: false, status: response.status, error: errorText(response.status, data) };
    if (!expired(answer)) setMessage("error", answer.error);
    return;
  }
  const password = response.headers.get("x-deskpool-rdp-password") || "";
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: `${desktop.name}.rdp` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  setMessage("rdp", `${desktop.name}.rdp saved: open it within a minute. One-time password:`);
  $("message").append(" ", el("code", { className: "rdp-password", text: password }));
}

async function logOff(desktop) {
  if (page.console && page.console.desktopId === desktop.id) closeConsole();
  const answer = await api("POST", `/api/v1/desktops/${encodeURIComponent(desktop.id)}/logoff`);
  if (expired(answer)) return;
  if (answer.ok) {
    setMessage("logged-off", `logged off ${desktop.name}; it is now ${answer.data.state}`);
    show($("console"), false);
  } else {
    setMessage("error", answer.error);
  }
  await refresh();
}

async function signIn(event) {
  event.preventDefault();
  const button = $("signin-button");
  button.disabled = true;
  show($("signin-error"), false);
  const answer = await api("POST", "/api/v1/auth/login",
                           { username: $("username").value, password: $("password").value });
  button.disabled = false;
  if (!answer.ok) {
    const error = $("signin-error");
    error.textContent = answer.error;
    error.dataset.kind = "error";
    show(error, true);
    $("password").select();
    return;
  }
  $("password").value = "";
  const next = safeNext(new URLSearchParams(location.search).get("next"));
  if (next) {
    location.assign(next);
    return;
  }
  await signedIn(answer.data.user);
}

async function signOut() {
  page.user = null;  // nothing still in flight may treat the coming 401s as an expiry
  stopRetry();
  closeConsole();
  const answer = await api("POST", "/api/v1/auth/logout");
  signedOut(answer.ok || answer.status === 401 ? "You are signed out." : answer.error);
}

async function start() {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  $("console-disconnect").addEventListener("click", () => closeConsole());
  window.addEventListener("pagehide", () => closeConsole());
  const me = await api("GET", "/api/v1/me");
  if (me.ok) await signedIn(me.data);
  else signedOut(me.status === 401 ? "" : me.error);
}

start();
