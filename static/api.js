/* Requests to this server, with the user's API key when the server wants one.
 *
 * A key arrives once in the page's own URL (/?api_key=...): it moves to sessionStorage (this tab only) and out
 * of the address bar, so it is not bookmarked, shared or left in the history. Every fetch sends it as X-API-Key;
 * a websocket cannot send headers, so its URL carries ?api_key=. Any 401 shows the key form (#key-form) and
 * retries the request once a key is entered; requests that fail together share one form.
 */

const STORAGE_KEY = 'llm.chat.apiKey';
const listeners = [];
let apiKey = storedKey();
let asking = null; // the key form's promise while it is shown

function storedKey() {
  try { return sessionStorage.getItem(STORAGE_KEY) || ''; } catch { return ''; }
}

function setKey(key) {
  apiKey = key;
  try { sessionStorage.setItem(STORAGE_KEY, key); } catch { /* storage off: the key lasts until a reload */ }
  for (const listener of listeners) listener();
}

/** Move ?api_key= from the address bar into sessionStorage. */
export function takeKeyFromUrl() {
  const url = new URL(window.location.href);
  if (!url.searchParams.has('api_key')) return;
  const key = url.searchParams.get('api_key').trim();
  url.searchParams.delete('api_key');
  window.history.replaceState(window.history.state, '', `${url.pathname}${url.search}${url.hash}`);
  if (key) setKey(key);
}

export function hasKey() { return Boolean(apiKey); }

/** Call back whenever the user enters a new key (e.g. to reconnect the socket at once). */
export function onKeyChange(listener) { listeners.push(listener); }

/** fetch() with the key; a 401 asks for a (new) key and tries again. */
export async function request(url, options = {}) {
  for (;;) {
    const sent = apiKey;
    const headers = new Headers(options.headers);
    if (sent) headers.set('X-API-Key', sent);
    const response = await fetch(url, { ...options, headers });
    if (response.status !== 401) return response;
    if (apiKey === sent) await askForKey(Boolean(sent)); // else another request already got a newer key
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

/** The websocket URL for a path, with the key as a query parameter (browsers cannot set its headers). */
export function socketUrl(path, params = {}) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
  if (apiKey) url.searchParams.set('api_key', apiKey);
  return url.href;
}

/** Save an attachment fetched with the key (a plain link cannot send it). */
export async function download(url) {
  const response = await request(url);
  if (!response.ok) throw httpError(response, await response.json().catch(() => ({})));
  const disposition = response.headers.get('Content-Disposition') || '';
  const match = /filename="?([^";]+)"?/i.exec(disposition);
  const link = document.createElement('a');
  link.href = URL.createObjectURL(await response.blob());
  link.download = match ? match[1] : 'download';
  document.body.append(link);
  link.click();
  link.remove();
  window.setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

/** Ask whether the key still works (after a websocket was refused, which the browser does not explain). */
export function probe() {
  return request('/personalities', { method: 'HEAD' }).catch(() => null);
}

function askForKey(rejected) {
  if (!asking) asking = new Promise((resolve) => showKeyForm(rejected, resolve)).finally(() => { asking = null; });
  return asking;
}

function showKeyForm(rejected, resolve) {
  const form = document.getElementById('key-form');
  const input = document.getElementById('api-key');
  const before = document.activeElement;
  document.getElementById('key-error').hidden = !rejected;
  form.hidden = false;
  input.value = '';
  input.focus();
  form.onsubmit = (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) { input.focus(); return; }
    form.hidden = true;
    const back = before && before !== document.body && before.isConnected ? before : document.getElementById('prompt');
    if (back) back.focus();
    setKey(key);
    resolve();
  };
}
