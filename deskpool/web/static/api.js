// Calls to deskpool's REST API. The session cookie (HttpOnly, set by sign-in) authenticates;
// every answer comes back as {ok, status, data}, and errors carry the API's own sentence.

export async function api(method, path, body) {
  const init = { method, headers: { accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    return { ok: false, status: 0, data: null,
             error: `the broker did not answer (${err.message || err}); try again` };
  }
  let data = null;
  const text = await response.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = text; }
  }
  return { ok: response.ok, status: response.status, data,
           error: response.ok ? null : errorText(response.status, data) };
}

// The API's {"detail": ...} verbatim: a sentence, or FastAPI's list of field errors.
export function errorText(status, data) {
  const detail = data && typeof data === "object" ? data.detail : data;
  if (typeof detail === "string" && detail) return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const where = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body").join(".") : "";
      return where ? `${where}: ${d.msg}` : String(d.msg);
    }).join("; ");
  }
  return `the broker answered HTTP ${status}`;
}

// A DOM element with text (never HTML) and attributes.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "className") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

export function show(node, visible) {
  node.hidden = !visible;
}

// Where to go after signing in: only one of the portal's own pages (the portal, the admin
// page, a desktop's console), never another site. A relative path of printable characters
// only: no scheme, no "//host", no backslash (browsers read "/\host" as "//host"), no tab or
// newline (browsers drop those, so "/<tab>/host" would become "//host"). Then the browser's own
// URL parser must agree it is this origin.
const OWN_PAGES = /^\/(admin|console\/[0-9A-Fa-f-]{36})?$/;

export function safeNext(value) {
  if (typeof value !== "string" || !/^\/[\x21-\x7e]*$/.test(value)) return null;
  if (value.startsWith("//") || value.includes("\\")) return null;
  let url;
  try {
    url = new URL(value, location.origin);
  } catch {
    return null;
  }
  if (url.origin !== location.origin || !OWN_PAGES.test(url.pathname)) return null;
  return url.pathname + url.search + url.hash;
}
