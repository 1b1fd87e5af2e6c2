// A desktop's console in an element: a one-time ticket from the broker, then noVNC's RFB over
// a WebSocket to the console proxy. Used by the portal and by the full-window console page.
import { api } from "./api.js";

let rfbModule = null;

async function loadRfb() {
  if (!rfbModule) {
    rfbModule = import("/novnc/core/rfb.js").catch((err) => {
      rfbModule = null;
      throw err;
    });
  }
  return (await rfbModule).default;
}

// status: the element whose text and data-state ("connecting", "connected", "disconnected",
// "error") say where the console is. onChange(state, text) hears of every change.
export function openConsole({ desktopId, desktopName, screen, status, onChange }) {
  let rfb = null;
  let closed = false;
  let name = desktopName || "the desktop";

  function set(state, text) {
    status.dataset.state = state;
    status.textContent = text;
    if (onChange) onChange(state, text);
  }

  async function start() {
    set("connecting", `getting a console ticket for ${name}…`);
    const ticket = await api("POST", `/api/v1/desktops/${encodeURIComponent(desktopId)}/console`);
    if (closed) return;
    if (!ticket.ok) {
      set(ticket.status === 401 ? "signed-out" : "error", ticket.error);
      return;
    }
    name = ticket.data.desktop || name;
    if (!ticket.data.websocket_port) {
      set("error", "this broker runs no console proxy, so the console cannot open in the browser");
      return;
    }
    let RFB;
    try {
      RFB = await loadRfb();
    } catch (err) {
      set("error", `the browser console (noVNC) is not installed on this broker: ${err.message}`);
      return;
    }
    if (closed) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.hostname}:${ticket.data.websocket_port}/` +
      `?token=${encodeURIComponent(ticket.data.token)}`;
    set("connecting", `connecting to ${name}…`);
    screen.replaceChildren();
    try {
      rfb = new RFB(screen, url, { shared: true });
    } catch (err) {
      set("error", `the console could not start: ${err.message}`);
      return;
    }
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.background = "#1b1b1b";
    rfb.addEventListener("connect", () => {
      set("connected", `connected to ${name}`);
      rfb.focus();
    });
    rfb.addEventListener("disconnect", (event) => {
      rfb = null;
      const failed = status.dataset.state === "error";
      if (closed) return;
      closed = true;
      if (failed) return;  // the error already says why
      set("disconnected", event.detail && event.detail.clean
        ? "disconnected"
        : "disconnected: the console connection was lost or refused");
    });
    rfb.addEventListener("securityfailure", (event) => {
      set("error", `the desktop refused the console: ${event.detail.reason || "security failure"}`);
    });
    rfb.addEventListener("credentialsrequired", () => {
      set("error", "the desktop's console asks for a password the broker does not have");
      if (rfb) rfb.disconnect();
    });
  }

  const handle = {
    desktopId,
    get name() { return name; },
    get connected() { return status.dataset.state === "connected"; },
    canvas() { return screen.querySelector("canvas"); },
    disconnect() {
      if (closed) return;
      closed = true;
      if (rfb) {
        const r = rfb;
        rfb = null;
        r.disconnect();
      }
      set("disconnected", "disconnected");
    },
  };
  start().catch((err) => set("error", `the console failed: ${err.message || err}`));
  return handle;
}
