// The admin view's "User layers" section: for one pool, how many desktops run each template
// version, and the conflicts and failed rebases of the rollout to its current version.
import { api, el, show } from "./api.js";

const $ = (id) => document.getElementById(id);

function fill(id, heads, rows) {
  const table = $(id);
  table.tHead.replaceChildren(el("tr", {}, ...heads.map((h) => el("th", { text: h }))));
  const body = rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", { text: c }))));
  if (!body.length) {
    body.push(el("tr", { className: "empty" },
      el("td", { colspan: heads.length, className: "muted", text: "none" })));
  }
  table.tBodies[0].replaceChildren(...body);
  table.dataset.rows = String(rows.length);
}

async function showPool(event) {
  event.preventDefault();
  const name = $("layers-pool").value.trim();
  const error = $("layers-error");
  show(error, false);
  if (!name) return;
  const answer = await api("GET", `/api/v1/admin/pools/${encodeURIComponent(name)}/layers`);
  if (!answer.ok) {
    error.textContent = answer.error;
    show(error, true);
    show($("layers-view"), false);
    return;
  }
  const v = answer.data;
  $("layers-summary").textContent = `pool ${v.pool}, version ${v.current_version}: ` +
    `${v.rebased} rebased, ${v.failed} failed, ${v.conflicts} conflict(s), ` +
    `${v.notes} note(s)`;
  fill("layers-versions", ["Version", "Desktops", ""],
    v.versions.map((r) => [String(r.version), String(r.desktops), r.current ? "current" : ""]));
  fill("layers-conflicts", ["Desktop", "Path", "Why", "The user's copy"],
    v.conflict_list.map((c) => [c.desktop, c.path, c.reason,
                                c.user_copy || "(the user had deleted it)"])
      .concat(v.failures.map((f) => [f.desktop, "(rebase failed)", f.error, ""])));
  show($("layers-view"), true);
}

export function startLayers() {
  $("layers-form").addEventListener("submit", showPool);
}
