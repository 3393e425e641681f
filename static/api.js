/* Requests to this server, authenticated the way browsers should be.
 *
 * When the server wants an API key, the page asks for it once (#key-form) and posts it to /auth/session, which
 * answers with an HttpOnly, SameSite=Strict cookie: every later fetch and the websocket handshake carry it, no
 * script can read it, and the key never appears in a URL (where logs, history and referrers would keep it).
 * Any 401 shows the key form and retries the request once a key is accepted; requests that fail together share
 * one form.
 */

const listeners = [];
let asking = null; // the key form's promise while it is shown

/** Call back whenever the user enters a new key (e.g. to reconnect the socket at once). */
export function onKeyChange(listener) { listeners.push(listener); }

/** fetch() with the session cookie; a 401 asks for a (new) key and tries again. */
export async function request(url, options = {}) {
  let rejected = false;
  for (;;) {
    const response = await fetch(url, { credentials: 'same-origin', ...options });
    if (response.status !== 401) return response;
    await askForKey(rejected);
    rejected = true;
  }
}

function httpError(response, body) {
  const error = new Error((body.error && body.error.message) || `HTTP ${response.status}`);
  error.status = response.status;
  return error;
}

/** A JSON request: an object body is sent as JSON; an error status throws with the server's message. */
export async function json(url, { body, ...options } = {}) {
  const headers = { Accept: 'application/json', ...options.headers };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const encoded = body === undefined ? undefined : JSON.stringify(body);
  const response = await request(url, { ...options, headers, body: encoded });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw httpError(response, data);
  return data;
}

/** The websocket URL for a path (its handshake carries the session cookie). */
export function socketUrl(path, params = {}) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
  return url.href;
}

/** Ask whether the key still works (after a websocket was refused, which the browser does not explain). */
export function probe() {
  return request('/personalities', { method: 'HEAD' }).catch(() => null);
}

function askForKey(rejected) {
  if (!asking) asking = new Promise((resolve) => showKeyForm(rejected, resolve)).finally(() => { asking = null; });
  return asking;
}

/** Exchange the key for the session cookie; false when the server refuses it. */
async function startSession(key) {
  const response = await fetch('/auth/session', {
    method: 'POST', credentials: 'same-origin', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ api_key: key }),
  }).catch(() => null);
  return Boolean(response && response.ok);
}

function showKeyForm(rejected, resolve) {
  const form = document.getElementById('key-form');
  const input = document.getElementById('api-key');
  const error = document.getElementById('key-error');
  const before = document.activeElement;
  error.hidden = !rejected;
  form.hidden = false;
  input.value = '';
  input.focus();
  form.onsubmit = async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) { input.focus(); return; }
    if (!(await startSession(key))) {
      error.hidden = false;
      input.value = '';
      input.focus();
      return;
    }
    form.hidden = true;
    const back = before && before !== document.body && before.isConnected ? before : document.getElementById('prompt');
    if (back) back.focus();
    for (const listener of listeners) listener();
    resolve();
  };
}
