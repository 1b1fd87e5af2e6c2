// The full-window console of one desktop: /console/{desktop_id}.
import { el, show } from "./api.js";
import { openConsole } from "./console.js";

const $ = (id) => document.getElementById(id);
const desktopId = $("console-page").dataset.desktopId;
let handle = null;

function start() {
  show($("console-error"), false);
  show($("reconnect"), false);
  $("disconnect").disabled = false;
  handle = openConsole({
    desktopId, screen: $("screen"), status: $("status"),
    onChange: (state, text) => {
      document.title = `${handle ? handle.name : "console"} · deskpool`;
      if (state === "connected") return;
      if (state === "connecting" || state === "reconnecting") return;
      $("disconnect").disabled = true;
      show($("reconnect"), state !== "signed-out");
      if (state === "signed-out") {
        const error = $("console-error");
        error.replaceChildren(`${text}: `, el("a", {
          href: `/?next=${encodeURIComponent(location.pathname)}`, text: "sign in" }));
        show(error, true);
      } else if (state === "error") {
        $("console-error").textContent = text;
        show($("console-error"), true);
      }
    },
  });
}

$("disconnect").addEventListener("click", () => {
  if (handle) handle.disconnect();
  $("screen").replaceChildren();
});
$("reconnect").addEventListener("click", () => start());
window.addEventListener("pagehide", () => { if (handle) handle.disconnect(); });
start();
