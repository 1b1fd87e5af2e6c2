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

// A console that was connected and drops without the user closing it (the desktop moved live to
// another host, the broker's proxy restarted) reconnects by itself with a fresh ticket, which
// leads to wherever the desktop runs now; it gives up after RECONNECT_FOR_MS of failed tries.
const RECONNECT_FOR_MS = 90_000;
const RECONNECT_DELAYS_MS = [250, 500, 1000, 2000, 4000, 8000];
// Ticket answers that no retry can change: signed out, not yours, no such desktop.
const FINAL_TICKET_STATUSES = new Set([401, 403, 404]);

// status: the element whose text and data-state ("connecting", "connected", "reconnecting",
// "disconnected", "error") say where the console is. onChange(state, text) hears of every
// change.
export function openConsole({ desktopId, desktopName, screen, status, onChange }) {
  let rfb = null;
  let closed = false;
  let name = desktopName || "the desktop";
  // While reconnecting: when the connection dropped and how many tries have failed since.
  let droppedAt = null;
  let tries = 0;

  function set(state, text) {
    status.dataset.state = state;
    status.textContent = text;
    if (onChange) onChange(state, text);
  }

  function retryOrGiveUp(why) {
    if (droppedAt === null || closed) return false;
    if (Date.now() - droppedAt >= RECONNECT_FOR_MS) {
      closed = true;
      set("disconnected", `disconnected: the connection to ${name} was lost and did not ` +
        `come back (${why})`);
      return true;
    }
    const delay = RECONNECT_DELAYS_MS[Math.min(tries, RECONNECT_DELAYS_MS.length - 1)];
    tries += 1;
    set("reconnecting", `the connection to ${name} dropped; reconnecting…`);
    setTimeout(() => {
      if (!closed) start().catch((err) => set("error", `the console failed: ${err.message || err}`));
    }, delay);
    return true;
  }

  async function start() {
    if (droppedAt === null) set("connecting", `getting a console ticket for ${name}…`);
    const ticket = await api("POST", `/api/v1/desktops/${encodeURIComponent(desktopId)}/console`);
    if (closed) return;
    if (!ticket.ok) {
      if (!FINAL_TICKET_STATUSES.has(ticket.status) && retryOrGiveUp(ticket.error)) return;
      if (droppedAt !== null) {  // the desktop went away (logged off, retired): no retry
        closed = true;
        if (ticket.status !== 401) {
          set("disconnected", `disconnected: ${ticket.error}`);
          return;
        }
      }
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
    if (droppedAt === null) set("connecting", `connecting to ${name}…`);
    screen.replaceChildren();
    try {
      rfb = new RFB(screen, url, { shared: true });
    } catch (err) {
      if (retryOrGiveUp(err.message)) return;
      set("error", `the console could not start: ${err.message}`);
      return;
    }
    rfb.scaleViewport = true;
    rfb.resizeSession = false;
    rfb.background = "#1b1b1b";
    rfb.addEventListener("connect", () => {
      droppedAt = null;
      tries = 0;
      set("connected", `connected to ${name}`);
      rfb.focus();
    });
    rfb.addEventListener("disconnect", (event) => {
      const wasConnected = status.dataset.state === "connected";
      rfb = null;
      const failed = status.dataset.state === "error";
      if (closed) return;
      if (!failed && (wasConnected || droppedAt !== null)) {
        // Not the user's doing: the desktop may have moved, or the proxy restarted.
        if (droppedAt === null) droppedAt = Date.now();
        if (retryOrGiveUp("the console did not answer")) return;
      }
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
