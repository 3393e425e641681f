/* The sidebar: the user's past conversations, most recent first, paged; open, rename, delete and export.
 *
 * `items` mirrors a prefix of the server's list (GET /conversations, newest first), so the next page starts at
 * offset items.length; a refresh re-reads that prefix, which moves a conversation that just got an answer to
 * the top. Conversations without messages (a socket bound to a new id creates one) are kept in `items` for the
 * paging arithmetic but not shown. On narrow screens the sidebar is a drawer behind #sidebar-toggle.
 */

import { json } from './api.js';
import { $, announce, button, element, icon } from './dom.js';
import { fullDate, onLanguageChange, relativeDate, t } from './i18n.js';

const PAGE = 20;
const MAX_PAGE = 100;
const narrow = window.matchMedia('(max-width: 899px)');

const ui = {
  sidebar: $('sidebar'), toggle: $('sidebar-toggle'), close: $('sidebar-close'), backdrop: $('sidebar-backdrop'),
  heading: $('history-title'), list: $('history-list'), status: $('history-status'), more: $('history-more'),
  feedbackExport: $('feedback-export'), search: $('history-search'),
};
const SEARCH_DELAY_MS = 250;

const state = {
  items: [], entries: new Map(), hasMore: false, loaded: false, loadingMore: false, error: '', current: null,
  serial: 0, query: '', searchTimer: null,
  handlers: { open: () => {}, deleted: () => {} },
};

function conversationUrl(id, suffix = '') { return `/conversations/${encodeURIComponent(id)}${suffix}`; }

function titleOf(item) { return item.title || t('conversation.untitled'); }

/* ---------- loading ---------- */

async function fetchPage(limit, offset) {
  const query = state.query ? `&q=${encodeURIComponent(state.query)}` : '';
  const data = await json(`/conversations?limit=${limit}&offset=${offset}${query}`);
  return data.conversations || [];
}

/** Search as the user types (after a short pause): the list shows only matching conversations. */
function search() {
  window.clearTimeout(state.searchTimer);
  state.searchTimer = window.setTimeout(async () => {
    const query = ui.search.value.trim();
    if (query === state.query) return;
    state.query = query;
    await loadFirstPage();
    if (query) {
      const count = visibleItems().length;
      announce(count ? t(state.hasMore ? 'search.found_more' : 'search.found', { n: count }) : t('search.none'));
    }
  }, SEARCH_DELAY_MS);
}

async function loadFirstPage() {
  setStatus(t('status.loading'));
  const query = state.query;
  try {
    const items = await fetchPage(PAGE, 0);
    if (query !== state.query) return; // a newer search was typed meanwhile: its answer wins
    state.items = items;
    state.hasMore = items.length === PAGE;
    state.error = '';
  } catch (error) {
    state.error = t('sidebar.load_failed', { error: error.message });
  }
  state.loaded = true;
  render();
}

async function loadMore() {
  if (state.loadingMore) return;
  state.loadingMore = true; // not disabled: that would drop the keyboard focus resting on the button
  ui.more.setAttribute('aria-disabled', 'true');
  ui.more.textContent = t('status.loading');
  const shownBefore = visibleItems().length;
  try {
    const items = await fetchPage(PAGE, state.items.length);
    const known = new Set(state.items.map((item) => item.id));
    state.items.push(...items.filter((item) => !known.has(item.id)));
    state.hasMore = items.length === PAGE;
    state.error = '';
  } catch (error) {
    state.error = t('sidebar.more_failed', { error: error.message });
  }
  state.loadingMore = false;
  ui.more.removeAttribute('aria-disabled');
  ui.more.textContent = t('sidebar.more');
  render();
  const added = visibleItems().length - shownBefore;
  if (!state.error) announce(added ? t('sidebar.more_loaded', { n: added }) : t('sidebar.no_more'));
  if (ui.more.hidden) {
    const first = visibleItems()[shownBefore];
    (first ? state.entries.get(first.id).open : ui.heading).focus();
  }
}

/** Re-read the part of the list already shown, after an answer changed its order, title or dates. */
export async function refresh() {
  if (!state.loaded) return;
  const limit = Math.min(Math.max(state.items.length, PAGE), MAX_PAGE);
  let fresh;
  try {
    fresh = await fetchPage(limit, 0);
  } catch {
    return; // the list stays as it was; the next answer tries again
  }
  const known = new Set(fresh.map((item) => item.id));
  state.items = fresh.length < limit ? fresh : [...fresh, ...state.items.slice(limit).filter((i) => !known.has(i.id))];
  if (fresh.length < limit) state.hasMore = false;
  render();
}

/* ---------- rendering ---------- */

function visibleItems() { return state.items.filter((item) => item.messages > 0); }

function setStatus(text) {
  ui.status.textContent = text;
  ui.status.hidden = !text;
}

function render() {
  const visible = visibleItems();
  const active = ui.list.contains(document.activeElement) ? document.activeElement : null;
  const ids = new Set(visible.map((item) => item.id));
  for (const [id, entry] of state.entries) {
    if (!ids.has(id)) { entry.li.remove(); state.entries.delete(id); }
  }
  visible.forEach((item, index) => {
    const entry = state.entries.get(item.id) || createEntry(item);
    entry.item = item;
    updateEntry(entry);
    if (ui.list.children[index] !== entry.li) ui.list.insertBefore(entry.li, ui.list.children[index] || null);
  });
  if (active && active.isConnected && document.activeElement !== active) active.focus({ preventScroll: true });
  const empty = t(state.query ? 'search.empty' : 'sidebar.empty');
  setStatus(state.error || (visible.length ? '' : empty));
  ui.status.classList.toggle('error', Boolean(state.error));
  if (state.error) ui.status.setAttribute('role', 'alert');
  else ui.status.removeAttribute('role');
  ui.more.hidden = !state.hasMore;
  if (!state.loadingMore) ui.more.textContent = t('sidebar.more');
}

function createEntry(item) {
  const li = element('li', 'conversation');
  const row = element('div', 'conversation-row');
  const open = button('', 'conversation-open');
  const title = element('span', 'conversation-title');
  const personality = element('span', 'conversation-personality');
  const time = element('time');
  const meta = element('span', 'conversation-meta');
  meta.append(personality, element('span', 'separator', ' · '), time);
  open.append(title, meta);
  const more = button('', 'button icon-only conversation-more');
  more.append(icon('more'));
  const actions = element('div', 'conversation-actions');
  actions.id = `conversation-actions-${state.serial += 1}`;
  actions.hidden = true;
  more.setAttribute('aria-controls', actions.id);
  more.setAttribute('aria-expanded', 'false');
  row.append(open, more);
  li.append(row, actions);
  const entry = { item, li, row, open, title, personality, time, more, actions };
  open.addEventListener('click', () => openConversation(entry));
  more.addEventListener('click', () => (actions.hidden ? showActions(entry) : hideActions(entry)));
  state.entries.set(item.id, entry);
  return entry;
}

function updateEntry(entry) {
  const { item } = entry;
  entry.title.textContent = titleOf(item);
  entry.open.title = titleOf(item); // the whole title, where the list cuts it short
  entry.personality.textContent = item.personality;
  entry.time.dateTime = new Date(item.updated * 1000).toISOString();
  entry.time.title = fullDate(item.updated);
  entry.time.textContent = relativeDate(item.updated);
  entry.more.setAttribute('aria-label', t('conversation.actions', { title: titleOf(item) }));
  const current = item.id === state.current;
  entry.li.classList.toggle('current', current);
  if (current) entry.open.setAttribute('aria-current', 'true');
  else entry.open.removeAttribute('aria-current');
}

function updateDates() {
  for (const entry of state.entries.values()) entry.time.textContent = relativeDate(entry.item.updated);
}

/** Highlight the conversation on screen (null when it is new and not listed yet). */
export function setCurrent(id) {
  state.current = id;
  for (const entry of state.entries.values()) updateEntry(entry);
}

/* ---------- actions ---------- */

function openConversation(entry) {
  if (narrow.matches) setDrawer(false);
  state.handlers.open({ ...entry.item });
}

function showActions(entry) {
  for (const other of state.entries.values()) if (other !== entry) hideActions(other, false);
  const rename = button(t('conversation.rename'), 'button ghost small');
  const remove = button(t('conversation.delete_ellipsis'), 'button ghost small danger-text');
  const exports = element('span', 'exports');
  exports.append(element('span', 'exports-label', t('export.label')), exportLink(entry, 'md', 'Markdown'),
    exportLink(entry, 'json', 'JSON'));
  rename.addEventListener('click', () => startRename(entry));
  remove.addEventListener('click', () => confirmDelete(entry));
  entry.actions.replaceChildren(rename, remove, exports);
  entry.actions.hidden = false;
  entry.li.classList.add('expanded');
  entry.more.setAttribute('aria-expanded', 'true');
}

function hideActions(entry, focus = true) {
  if (entry.actions.hidden) return;
  entry.actions.hidden = true;
  entry.actions.replaceChildren();
  entry.li.classList.remove('expanded');
  entry.more.setAttribute('aria-expanded', 'false');
  if (focus) entry.more.focus();
}

function exportLink(entry, format, label) {
  const link = element('a', 'export-link', label);
  link.href = conversationUrl(entry.item.id, `/export?format=${format}`);
  link.download = '';
  link.setAttribute('aria-label', t('export.as', { format: label }));
  return link; // a plain link: the session cookie authenticates it
}

function showActionError(place, message) {
  const old = place.querySelector('.error');
  if (old) old.remove();
  const note = element('p', 'error', message);
  note.setAttribute('role', 'alert');
  place.append(note);
}

function startRename(entry) {
  const form = element('form', 'rename-form');
  const input = element('input');
  Object.assign(input, { type: 'text', value: entry.item.title, maxLength: 200, required: true });
  input.setAttribute('aria-label', t('conversation.title'));
  const save = button(t('action.save'), 'button primary small', 'submit');
  const cancel = button(t('action.cancel'), 'button secondary small');
  const buttons = element('div', 'rename-buttons');
  buttons.append(save, cancel);
  form.append(input, buttons);
  hideActions(entry, false);
  entry.row.hidden = true;
  entry.li.insertBefore(form, entry.actions);
  input.focus();
  input.select();
  const end = () => { form.remove(); entry.row.hidden = false; entry.open.focus(); };
  input.addEventListener('keydown', (event) => {
    if (event.key !== 'Escape') return;
    event.preventDefault();
    event.stopPropagation(); // neither stop an answer nor close the drawer
    end();
  });
  cancel.addEventListener('click', end);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const title = input.value.trim();
    if (!title) { input.focus(); return; }
    save.disabled = true;
    try {
      const data = await json(conversationUrl(entry.item.id), { method: 'PATCH', body: { title } });
      entry.item.title = data.title;
      updateEntry(entry);
      end();
      announce(t('conversation.renamed', { title: data.title }));
    } catch (error) {
      save.disabled = false;
      input.focus();
      showActionError(form, t('conversation.rename_failed', { error: error.message }));
    }
  });
}

function confirmDelete(entry) {
  const question = element('p', 'confirm-text', t('conversation.confirm_delete'));
  question.id = `${entry.actions.id}-question`;
  const group = element('div', 'confirm');
  group.setAttribute('role', 'group');
  group.setAttribute('aria-labelledby', question.id);
  const yes = button(t('conversation.delete'), 'button danger small');
  const no = button(t('action.cancel'), 'button secondary small');
  group.append(question, yes, no);
  entry.actions.replaceChildren(group);
  no.focus(); // the harmless choice first
  no.addEventListener('click', () => { showActions(entry); entry.more.focus(); });
  yes.addEventListener('click', () => deleteConversation(entry, yes));
}

async function deleteConversation(entry, yes) {
  yes.disabled = true;
  try {
    await json(conversationUrl(entry.item.id), { method: 'DELETE' });
  } catch (error) {
    yes.disabled = false;
    yes.focus();
    showActionError(entry.actions, t('conversation.delete_failed', { error: error.message }));
    return;
  }
  const visible = visibleItems();
  const index = visible.indexOf(entry.item);
  const neighbour = visible[index + 1] || visible[index - 1];
  state.items = state.items.filter((item) => item.id !== entry.item.id);
  render();
  (neighbour ? state.entries.get(neighbour.id).open : ui.heading).focus();
  announce(t('conversation.deleted', { title: titleOf(entry.item) }));
  state.handlers.deleted(entry.item.id);
}

/* ---------- the drawer on narrow screens ---------- */

function setDrawer(open, moveFocus = true) {
  ui.sidebar.dataset.open = String(open);
  ui.toggle.setAttribute('aria-expanded', String(open));
  ui.backdrop.hidden = !open;
  for (const node of document.querySelectorAll('[data-behind-drawer]')) node.inert = open && narrow.matches;
  if (!moveFocus) return;
  if (open) {
    const current = state.current && state.entries.get(state.current);
    const first = visibleItems()[0];
    (current ? current.open : first ? state.entries.get(first.id).open : ui.close).focus();
  } else {
    ui.toggle.focus();
  }
}

function bindEvents() {
  ui.toggle.addEventListener('click', () => setDrawer(ui.sidebar.dataset.open !== 'true'));
  ui.close.addEventListener('click', () => setDrawer(false));
  ui.backdrop.addEventListener('click', () => setDrawer(false));
  ui.sidebar.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && narrow.matches && ui.sidebar.dataset.open === 'true') {
      event.stopPropagation();
      setDrawer(false);
    }
  });
  narrow.addEventListener('change', () => setDrawer(false, false));
  ui.more.addEventListener('click', loadMore);
  ui.search.addEventListener('input', search);
  window.setInterval(updateDates, 60000);
}

/** Wire the sidebar: `open(item)` shows a conversation, `deleted(id)` hears that one was deleted. */
export function initHistory({ open, deleted }) {
  state.handlers = { open, deleted };
  bindEvents();
  onLanguageChange(() => { if (state.loaded) render(); });
  setDrawer(false, false);
  return loadFirstPage();
}
