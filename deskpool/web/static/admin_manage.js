// The admin view's actions beyond hosts and log-offs: pools (resize, disable, enable,
// rollout with canaries, rollback, clear a template fault, delete), hosts removed, template
// versions deleted, users (disable, enable, new password, delete, their tokens listed and
// revoked), roaming profiles (reset, roll back) and the audit log. Every action asks first
// through the page's dialog (``ui.ask``) and says what happened (``ui.say``); the API
// decides and audits.
import { api, el } from "./api.js";

const q = encodeURIComponent;
const button = (text, className, onclick) => el("button", { type: "button", className, text,
                                                            onclick });
const group = (...nodes) => {
  const f = document.createDocumentFragment();
  for (const n of nodes) if (n) f.append(n);
  return f;
};

// --- pools ----------------------------------------------------------------------------------

export function poolActions(p, ui) {
  if (p.status === "deleting") {
    return el("span", { className: "muted", text: "deleting: desktops retire as users leave" });
  }
  return group(
    button("Resize", "resize", () => resizePool(p, ui)),
    button("Roll out", "rollout", () => rolloutPool(p, ui)),
    p.previous_version ? button(`Roll back to v${p.previous_version}`, "rollback",
                                () => rollbackPool(p, ui)) : null,
    p.status === "disabled" ? button("Enable", "enable", () => simple(p, "enable", ui))
                            : button("Disable", "disable", () => disablePool(p, ui)),
    p.fault ? button("Clear fault", "clear-fault", () => clearFault(p, ui)) : null,
    button("Delete", "delete danger", () => deletePool(p, ui)));
}

function clearFault(p, ui) {
  ui.ask({
    title: `Clear the template fault of ${p.name}`,
    text: "Once its template disk is fixed by hand: the next reconciler pass tries at once, " +
          "and marks the pool again if the disk is still missing or corrupt.",
    ok: "Clear fault",
    action: () => api("POST", `/api/v1/admin/pools/${q(p.name)}/clear-fault`),
    done: (data) => ["pools-message", `${data.name}: fault cleared`],
  });
}

function resizePool(p, ui) {
  ui.ask({
    title: `Resize ${p.name}`,
    text: "Desktops are added or retired by the reconciler; a desktop a user holds is " +
          "never taken away.",
    ok: "Resize",
    fields: [["min_size", "Min", p.min_size], ["spare", "Spare", p.spare],
             ["max_size", "Max", p.max_size]],
    action: (v) => api("POST", `/api/v1/admin/pools/${q(p.name)}/resize`, v),
    done: (data) => ["pools-message", `${data.name}: min ${data.min_size}, spare ` +
                     `${data.spare}, max ${data.max_size}`],
  });
}

function rolloutPool(p, ui) {
  ui.ask({
    title: `Roll out a template version to ${p.name}`,
    text: `New desktops come from the version given (empty: the latest of ${p.template}). ` +
          "Free old desktops are replaced once the canaries are ready; held ones when their " +
          "users leave.",
    ok: "Roll out",
    fields: [["version", "Version", ""], ["canary", "Canary desktops", p.canary ?? 0]],
    action: (v) => api("POST", `/api/v1/admin/pools/${q(p.name)}/rollout`, v),
    done: (data) => ["pools-message", `${data.name} now makes version ${data.version}`],
  });
}

function rollbackPool(p, ui) {
  ui.ask({
    title: `Roll ${p.name} back to version ${p.previous_version}`,
    text: "New desktops come from the earlier version again; free desktops of the newer one " +
          "are replaced.",
    ok: "Roll back",
    action: () => api("POST", `/api/v1/admin/pools/${q(p.name)}/rollback`),
    done: (data) => ["pools-message", `${data.name} is back on version ${data.version}`],
  });
}

function disablePool(p, ui) {
  ui.ask({
    title: `Disable ${p.name}`,
    text: "No new sessions start in this pool; users keep, and may reconnect to, the " +
          "desktops they hold.",
    ok: "Disable",
    action: () => api("POST", `/api/v1/admin/pools/${q(p.name)}/disable`),
    done: (data) => ["pools-message", `${data.name} is ${data.status}`],
  });
}

async function simple(p, verb, ui) {
  const answer = await api("POST", `/api/v1/admin/pools/${q(p.name)}/${verb}`);
  ui.say("pools-message", answer.ok ? "ready" : "error",
         answer.ok ? `${p.name} is ${answer.data.status}` : answer.error);
  await ui.refresh();
}

function deletePool(p, ui) {
  ui.ask({
    title: `Delete ${p.name}`,
    text: "No new sessions; its free desktops are retired now and each held one when its " +
          "user logs off. The pool, its entitlements and pins go when no desktop is left.",
    ok: "Delete",
    action: () => api("DELETE", `/api/v1/admin/pools/${q(p.name)}`),
    done: (data) => ["pools-message", `${data.name} is being deleted`],
  });
}

// --- hosts and template versions ---------------------------------------------------------------

export function hostRemove(h, ui) {
  if (h.desktops) return null;
  return button("Remove", "remove danger", () => ui.ask({
    title: `Remove ${h.name}`,
    text: `deskpool forgets ${h.name} (${h.uri}); nothing on the host itself is touched.`,
    ok: "Remove",
    action: () => api("DELETE", `/api/v1/admin/hosts/${q(h.name)}`),
    done: () => ["hosts-message", `host ${h.name} removed`],
  }));
}

export function versionActions(t, ui) {
  return button("Delete", "delete danger", () => ui.ask({
    title: `Delete ${t.template} version ${t.number}`,
    text: "Its image files are deleted too. Refused while a pool makes desktops from it, " +
          "may roll back to it, or a desktop runs it.",
    ok: "Delete",
    action: () => api("DELETE", `/api/v1/admin/templates/${q(t.template)}/versions/${t.number}`),
    done: () => ["templates-message", `${t.template} version ${t.number} deleted`],
  }));
}

// --- users ----------------------------------------------------------------------------------

export function userActions(u, ui) {
  return group(
    button("Tokens", "tokens", () => showTokens(u.name, ui)),
    u.disabled ? button("Enable", "enable", () => userPost(u, "enable", ui))
               : button("Disable", "disable", () => ui.ask({
                 title: `Disable ${u.name}`,
                 text: `${u.name} can no longer sign in and every session and token of ` +
                       "theirs stops working now.",
                 ok: "Disable",
                 action: () => api("POST", `/api/v1/admin/users/${q(u.name)}/disable`),
                 done: () => ["users-message", `${u.name} is disabled`],
               })),
    u.source === "local" ? button("New password", "password", () => ui.ask({
      title: `New password for ${u.name}`,
      text: "A random password replaces theirs; it is shown once. Their sessions end.",
      ok: "Make one",
      action: () => api("POST", `/api/v1/admin/users/${q(u.name)}/password`),
      done: (data) => ["users-message", `new password for ${data.user} (shown once): ` +
                       data.password],
    })) : null,
    button("Delete", "delete danger", () => ui.ask({
      title: `Delete ${u.name}`,
      text: "Their account, tokens, group memberships and entitlements go. Refused while " +
            "they hold a desktop.",
      ok: "Delete",
      action: () => api("DELETE", `/api/v1/admin/users/${q(u.name)}`),
      done: () => ["users-message", `${u.name} deleted`],
    })));
}

export function profileActions(p, ui) {
  return group(
    button("Reset", "reset", () => ui.ask({
      title: `Reset the profile of ${p.user}`,
      text: `${p.user} gets a fresh home at their next logon. Generation ${p.generation} ` +
            "is kept, so a rollback can bring it back.",
      ok: "Reset",
      action: () => api("POST", `/api/v1/admin/profiles/${q(p.user)}/reset`),
      done: (data) => ["profiles-message",
                       `profile of ${data.user} reset: generation ${data.generation}`],
    })),
    ...p.rollback_to.map((g) => button(`Back to ${g}`, "rollback", () => ui.ask({
      title: `Roll the profile of ${p.user} back to generation ${g}`,
      text: `Generation ${g} becomes generation ${p.generation + 1}; the ones between ` +
            "stay kept.",
      ok: "Roll back",
      action: () => api("POST", `/api/v1/admin/profiles/${q(p.user)}/rollback`,
                        { generation: g }),
      done: (data) => ["profiles-message",
                       `profile of ${data.user} is generation ${data.generation}`],
    }))));
}

async function userPost(u, verb, ui) {
  const answer = await api("POST", `/api/v1/admin/users/${q(u.name)}/${verb}`);
  ui.say("users-message", answer.ok ? "ready" : "error",
         answer.ok ? `${u.name} is ${answer.data.disabled ? "disabled" : "enabled"}`
                   : answer.error);
  await ui.refresh();
}

// --- one user's tokens ------------------------------------------------------------------------

// The user whose tokens the page shows (null: none), refreshed with the other tables.
const tokensOf = { user: null };

export const tokensPath = () => (tokensOf.user === null ? null
  : `/api/v1/admin/users/${q(tokensOf.user)}/tokens`);

async function showTokens(name, ui) {
  tokensOf.user = name;
  document.getElementById("tokens-user").textContent = name;
  ui.say("tokens-message", "ready", "");
  document.getElementById("user-tokens").hidden = false;
  await ui.refresh();
}

export function closeTokens() {
  tokensOf.user = null;
  document.getElementById("user-tokens").hidden = true;
}

export function tokenRevoke(t, ui) {
  const what = t.kind === "api" ? "API token" : "browser session";
  const named = t.label ? ` "${t.label}"` : "";
  return button("Revoke", "revoke danger", () => ui.ask({
    title: `Revoke ${t.user}'s ${what}${named}`,
    text: t.current ? "This is your own session in this browser: you are signed out at once."
                    : `It opens nothing from now on: whatever uses it must sign in again.`,
    ok: "Revoke",
    action: () => api("DELETE", `/api/v1/admin/users/${q(t.user)}/tokens/${q(t.id)}`),
    done: () => ["tokens-message", `revoked ${t.user}'s ${what}${named}`],
  }));
}

export function revokeButton(g, ui) {
  return button("Revoke", "revoke danger", () => ui.ask({
    title: `Revoke ${g.kind} ${g.principal}'s entitlement to ${g.pool}`,
    text: "New sessions in the pool are refused to them; a desktop they hold now is kept " +
          "until they log off.",
    ok: "Revoke",
    action: () => api("DELETE", `/api/v1/admin/pools/${q(g.pool)}/entitlements/` +
                                `${q(g.kind)}/${q(g.principal)}`),
    done: () => ["users-message", `${g.kind} ${g.principal} may no longer use ${g.pool}`],
  }));
}

// Adds a local user from the "Add user" form: groups comma-separated.
export async function addUser(event, ui) {
  event.preventDefault();
  const form = event.target;
  const error = document.getElementById("add-user-error");
  const body = {
    name: form.elements.name.value.trim(), password: form.elements.password.value,
    display_name: form.elements.display_name.value.trim(),
    is_admin: form.elements.is_admin.checked,
    groups: form.elements.groups.value.split(",").map((g) => g.trim()).filter(Boolean),
  };
  const answer = await api("POST", "/api/v1/admin/users", body);
  error.hidden = answer.ok;
  if (!answer.ok) {
    error.textContent = answer.error;
    return;
  }
  form.reset();
  ui.say("users-message", "ready", `user ${answer.data.name} added`);
  await ui.refresh();
}

// --- the audit log -----------------------------------------------------------------------------

export function auditPath() {
  const params = new URLSearchParams({ limit: "100" });
  const actor = document.getElementById("audit-actor").value.trim();
  const target = document.getElementById("audit-target").value.trim();
  if (actor) params.set("actor", actor);
  if (target) params.set("target", target);
  return `/api/v1/admin/audit?${params}`;
}

export const values = (v) => (v === null || v === undefined ? "" : JSON.stringify(v));
