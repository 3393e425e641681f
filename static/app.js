/* The chat page: a personality picker, a websocket per personality (JSON frames), streamed Markdown answers.
 *
 * Modules: api.js (requests and the API key), messages.js (rendering, made inert), feedback.js (ratings),
 * history.js (the sidebar of past conversations), documents.js (the user's knowledge bases), dom.js (helpers). This one owns the socket and the answer
 * life cycle. The conversation id lives in localStorage per personality, so a reload restores the history
 * from GET /conversations/<id> and the new socket binds to it with a |SESSION|id|/SESSION| frame.
 *
 * Answers survive a dropped connection: every frame of an answer carries its id and a sequence number, so when
 * the socket drops mid-answer (a phone locks, Wi-Fi switches) the page reconnects with ?resume=<id>&after=<seq>
 * and the server, which went on generating, sends what was missed and then the rest; frames already seen are
 * ignored, so nothing shows twice. A Stop pressed while offline is sent as soon as the socket is back.
 */

import * as api from './api.js';
import { $, announce, element, nearBottom, scrollToEnd, speak } from './dom.js';
import * as i18n from './i18n.js';
import { t } from './i18n.js';
import { initDocuments } from './documents.js';
import * as history from './history.js';
import * as view from './messages.js';
import { setUpTheme } from './theme.js';

const STORAGE = 'llm.chat.';
const BACKOFF_MS = [1000, 2000, 4000, 8000, 16000, 30000];

const ui = {
  picker: $('personality'), info: $('personality-info'), connection: $('connection'),
  connectionText: $('connection-text'), newConversation: $('new-conversation'), banner: $('banner'),
  bannerText: $('banner-text'), reconnectNow: $('reconnect-now'),
  composer: $('composer'), prompt: $('prompt'), send: $('send'), stop: $('stop'),
  contextToggle: $('context-toggle'), contextPanel: $('context-panel'), context: $('context'),
  regenerate: $('regenerate'), statusLive: $('status-live'), shortcuts: $('shortcuts'),
  shortcutsButton: $('shortcuts-button'), languageToggle: $('language-toggle'),
};

const state = {
  personalities: [], personality: null, conversationId: null,
  socket: null, serial: 0, open: false,
  expecting: [], // one entry per bind or prompt frame sent: the server ends each with one end frame, in order
  current: null, lastPrompt: null, retries: 0, retryTimer: null,
  resuming: null, // the answer in progress when the socket dropped, to pick up on the next socket
};

const store = {
  get(key) { try { return localStorage.getItem(STORAGE + key); } catch { return null; } },
  set(key, value) { try { localStorage.setItem(STORAGE + key, value); } catch { /* private mode */ } },
};

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID().replaceAll('-', '');
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/* ---------- answer life cycle ---------- */

function addAnswer(prompt) {
  const article = view.appendMessage('assistant', t('answer.label'));
  const answer = {
    prompt, article, conversationId: state.conversationId, text: '', statuses: [], sources: [], stopped: false,
    done: false, id: null, seq: 0, spoken: 0, rendering: false, // spoken: how much the live region has read
    body: element('div', 'body markdown'), status: element('p', 'status-line'),
  };
  article.setAttribute('aria-busy', 'true');
  answer.status.append(element('span', 'spinner'), element('span', 'status-text', t('answer.thinking')));
  article.append(answer.body, answer.status);
  scrollToEnd(true);
  return answer;
}

function appendToken(answer, text) {
  answer.text += text;
  if (answer.text.trim()) answer.status.hidden = true;
  speakSentences(answer, false);
  if (answer.rendering) return;
  answer.rendering = true; // one render per frame, however many tokens arrived
  // A finished answer was rendered once more by finishAnswer (and got its code copy buttons): leave it.
  window.requestAnimationFrame(() => { answer.rendering = false; if (!answer.done) renderAnswer(answer); });
}

/** Screen readers hear the answer as it streams, a finished sentence (or line) at a time; `all`: the rest too. */
function speakSentences(answer, all) {
  const pending = answer.text.slice(answer.spoken);
  let end = pending.length;
  if (!all) {
    const boundaries = [...pending.matchAll(/[.!?…:;](?=\s)|\n/g)];
    if (!boundaries.length) return;
    end = boundaries[boundaries.length - 1].index + 1;
  }
  speak(pending.slice(0, end));
  answer.spoken += end;
}

function renderAnswer(answer) {
  const stick = nearBottom();
  answer.body.innerHTML = view.renderMarkdown(answer.text);
  scrollToEnd(stick);
}

function setStatus(answer, message, record = true) {
  if (answer && !answer.done) {
    if (record && !answer.statuses.includes(message)) answer.statuses.push(message);
    answer.status.querySelector('.status-text').textContent = message;
    answer.status.hidden = false;
  }
  ui.statusLive.textContent = message;
}

function errorText(frame) {
  if (frame.status === 503) return t('error.busy');
  if (frame.status === 429) return t('error.too_many');
  if (frame.status === 413) return `${t('error.too_long')} ${frame.message || ''}`.trim();
  return frame.message || t('error.generic');
}

function failAnswer(answer, message) {
  answer.error = message;
  const error = element('p', 'error', message);
  error.setAttribute('role', 'alert');
  answer.article.append(error);
}

function finishAnswer(answer, end = {}, note = '') {
  if (answer.done) return;
  answer.done = true;
  renderAnswer(answer);
  answer.status.remove();
  answer.article.removeAttribute('aria-busy');
  if (!answer.text && !answer.error && !note) answer.body.append(element('p', 'empty', t('answer.empty')));
  view.addSources(answer.article, answer.sources);
  if (end.message_id != null) answer.article.dataset.messageId = end.message_id;
  if (end.question_id != null && answer.question) view.addQuestionTools(answer.question, end.question_id);
  const stopped = answer.stopped || end.finish_reason === 'cancelled' ? t('answer.stopped') : '';
  const length = end.finish_reason === 'length' ? t('answer.cut_off') : '';
  view.addFooter(answer.article, answer.text, {
    usage: end.usage, trimmed: end.trimmed_turns || 0, note: note || stopped || length, statuses: answer.statuses,
    notices: end.notices || [],
    feedback: { conversationId: answer.conversationId, messageId: end.message_id },
  });
  if (state.current === answer) setStreaming(null);
  speakSentences(answer, true);
  announce(answer.error || t(stopped ? 'answer.stopped_spoken' : 'answer.finished'));
  ui.statusLive.textContent = '';
  scrollToEnd(nearBottom());
  if (end.message_id != null) history.refresh(); // a new conversation joins the list, an old one moves up
  if (answer.branch && end.message_id != null) redraw(); // shows the versions (1/2, 2/2) the server now keeps
}

function setStreaming(answer) {
  const hadFocus = document.activeElement;
  state.current = answer;
  const busy = answer !== null;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.stop.disabled = false;
  setText(ui.stop, 'composer.stop');
  ui.regenerate.hidden = busy || !state.lastPrompt;
  if (busy && hadFocus === ui.send) ui.stop.focus(); // keep keyboard focus on the control in that place
  if (!busy && (hadFocus === ui.stop || hadFocus === document.body)) ui.prompt.focus();
}

/** Ask a question; `branch` {edit: id} replaces an earlier question, {regenerate: true} answers the last
 * one again (both kept by the server as versions). */
function sendPrompt(prompt, branch = null) {
  if (state.current) return false;
  if (!state.open) {
    showBanner(t('connection.not_yet'), true);
    reconnectNow();
    return false;
  }
  state.lastPrompt = prompt;
  state.fresh = null; // from now on the server has turns to give back
  const question = branch && branch.regenerate ? null : view.addUserMessage(prompt);
  const answer = addAnswer(prompt);
  Object.assign(answer, { question, branch });
  let command = '';
  if (branch) command = branch.regenerate ? '|REGENERATE|' : `|EDIT|${branch.edit}|/EDIT|${prompt}`;
  // the session marker is harmless when bound and guards literal text
  state.socket.send(sessionMarker() + (command || prompt));
  state.expecting.push({ kind: 'answer', answer });
  setStreaming(answer);
  return true;
}

/** Regenerate: a stored answer gets another version; one that failed (never stored) is asked again. */
function regenerateAnswer() {
  if (state.current || !state.lastPrompt || !state.open) return;
  const last = view.lastAnswer();
  if (last && last.dataset.messageId) {
    last.remove();
    sendPrompt(state.lastPrompt, { regenerate: true });
    return;
  }
  if (last) { // the failed exchange leaves the view; asked again, it continues the stored conversation
    const question = last.previousElementSibling;
    if (question && question.classList.contains('user')) question.remove();
    last.remove();
  }
  sendPrompt(state.lastPrompt);
}

/** Edit: the conversation from that question on is replaced in view (the server keeps it as a version). */
function editQuestion(messageId, text, article) {
  if (state.current || !state.open) return false;
  while (article.nextElementSibling) article.nextElementSibling.remove();
  article.remove();
  return sendPrompt(text, { edit: messageId });
}

/** Show another version of a message: the server answers with the conversation as it now reads. */
async function chooseVariant(messageId) {
  if (state.current) return;
  const id = state.conversationId;
  try {
    const data = await api.json(`/conversations/${encodeURIComponent(id)}/messages/${messageId}/choose`,
      { method: 'POST' });
    if (id !== state.conversationId) return;
    renderConversation(data);
    const shown = document.querySelector(`[data-message-id="${messageId}"] .variant-count`);
    announce(t('versions.showing', { version: shown ? shown.textContent : '' }));
    if (shown) shown.closest('.variants').querySelector('button:not(:disabled)')?.focus();
  } catch (error) {
    view.showNotice(t('versions.failed', { error: error.message }), 'error');
  }
}

function stopAnswer() {
  if (!state.current || state.current.stopped) return;
  state.current.stopped = true;
  setText(ui.stop, 'composer.stopping');
  ui.stop.disabled = true;
  if (state.open) state.socket.send('|STOP|'); // the end frame follows and finishes the answer
  // offline: sent as soon as the socket is back (onOpen), and the end frame follows then
}

function submitComposer() {
  const question = ui.prompt.value.trim();
  if (!question || state.current) return;
  const context = ui.context.value.replaceAll('|/CONTEXT|', '').replaceAll('|CONTEXT|', '').trim();
  const prompt = context ? `|CONTEXT|${context}|/CONTEXT| ${question}` : question;
  if (!sendPrompt(prompt)) return;
  ui.prompt.value = '';
  ui.context.value = '';
  toggleContext(false);
  autoGrow();
}

/* ---------- the socket ---------- */

function sessionMarker() { return `|SESSION|${state.conversationId}|/SESSION|`; }

function connect() {
  window.clearTimeout(state.retryTimer);
  closeSocket();
  const serial = state.serial;
  const path = `/gpt-socket/${encodeURIComponent(state.personality.name)}`;
  const resuming = state.resuming;
  const params = resuming ? { format: 'json', resume: resuming.id, after: resuming.seq } : { format: 'json' };
  const socket = new WebSocket(api.socketUrl(path, params));
  state.socket = socket;
  setConnection('connecting', state.retries ? 'connection.reconnecting' : 'connection.connecting');
  socket.onopen = () => serial === state.serial && onOpen(socket);
  socket.onmessage = (event) => serial === state.serial && onFrame(event.data);
  socket.onclose = () => serial === state.serial && onDrop();
}

function closeSocket() {
  state.serial += 1; // events from the old socket are ignored from here on
  if (state.socket) state.socket.close();
  state.socket = null;
  state.open = false;
  state.expecting = [];
}

function onOpen(socket) {
  state.open = true;
  if (state.resuming) { // the server sends the rest of that answer first
    state.expecting.push({ kind: 'answer', answer: state.resuming, resumed: true });
    if (state.resuming.stopped) socket.send('|STOP|');
    state.resuming = null;
  }
  socket.send(sessionMarker()); // binds (or re-binds) this socket to the conversation
  state.expecting.push({ kind: 'bind' });
}

function onBound() {
  if (state.retries) announce(t('connection.reconnected'));
  state.retries = 0; // only now: a server that accepts then drops the socket keeps backing off
  hideBanner();
  setConnection('open', 'connection.open');
}

function onFrame(data) {
  let frame;
  try { frame = JSON.parse(data); } catch { return; }
  const head = state.expecting[0];
  const answer = head && head.kind === 'answer' ? head.answer : null;
  if (answer && frame.seq) {
    if (frame.seq <= answer.seq) return; // already shown before the connection dropped
    answer.id = frame.answer;
    answer.seq = frame.seq;
  }
  if (frame.type === 'start') return;
  if (frame.type === 'token' && answer) appendToken(answer, frame.text || '');
  else if (frame.type === 'status') setStatus(answer, frame.message || '');
  else if (frame.type === 'source' && answer) answer.sources.push(frame);
  else if (frame.type === 'error') onError(head, frame);
  else if (frame.type === 'end') {
    state.expecting.shift();
    if (answer) finishAnswer(answer, frame);
    else if (head && head.kind === 'bind') onBound();
  }
}

function onError(head, frame) {
  if (head && head.resumed && frame.status === 410) {
    // Kept no longer: the stored conversation has the answer as far as it got.
    state.expecting.shift();
    setStreaming(null);
    redraw().then(() => view.showNotice(t('resume.expired')));
  } else if (head && head.kind === 'answer') {
    failAnswer(head.answer, errorText(frame));
  } else if (head && head.kind === 'bind' && frame.status === 400) {
    // The stored id cannot be used (e.g. it belongs to another personality): start afresh.
    startConversation(newId(), true);
    view.showNotice(t('conversation.restarted'));
    connect();
  } else {
    showBanner(errorText(frame), false);
  }
}

function onDrop() {
  const refused = !state.open; // never opened: perhaps the API key is no longer accepted
  state.open = false;
  for (const entry of state.expecting) {
    if (entry.kind !== 'answer') continue;
    if (entry.answer.id && !state.resuming) { // the server goes on with it: pick it up after reconnecting
      state.resuming = entry.answer;
      setStatus(entry.answer, t('resume.waiting'), false);
    } else {
      failAnswer(entry.answer, t('answer.lost'));
      finishAnswer(entry.answer, {}, t('answer.interrupted'));
    }
  }
  state.expecting = [];
  if (refused) api.probe(); // a 401 there shows the key form, and a new key reconnects at once
  scheduleReconnect();
}

function scheduleReconnect() {
  const delay = BACKOFF_MS[Math.min(state.retries, BACKOFF_MS.length - 1)];
  state.retries += 1;
  const seconds = Math.round(delay / 1000);
  setConnection('down', 'connection.offline');
  showBanner(t('connection.lost', { n: seconds }), true);
  window.clearTimeout(state.retryTimer);
  state.retryTimer = window.setTimeout(connect, delay);
}

function reconnectNow() {
  if (state.open || !state.personality) return;
  state.retries = Math.max(state.retries, 1);
  connect();
}

/** The connection state, its words kept as a catalogue key so a change of language rewrites them. */
function setConnection(kind, key) {
  ui.connection.dataset.state = kind;
  setText(ui.connectionText, key);
}

function setText(node, key) {
  node.dataset.i18n = key;
  node.textContent = t(key);
}

function showBanner(text, offerReconnect) {
  ui.bannerText.textContent = text;
  ui.reconnectNow.hidden = !offerReconnect;
  ui.banner.hidden = false;
}

function hideBanner() { ui.banner.hidden = true; }

/* ---------- personalities and conversations ---------- */

/** Show a conversation (a new one has no stored turns to look up, so the page does not ask for them). */
function startConversation(id, fresh = false) {
  state.resuming = null; // an answer elsewhere is not picked up here
  state.conversationId = id;
  state.fresh = fresh ? id : null;
  state.lastPrompt = null;
  store.set(`conversation.${state.personality.name}`, id);
  history.setCurrent(id);
  setStreaming(null);
  view.showIntro(state.personality.intro);
}

/** Render the stored turns; false when the user switched conversation meanwhile. */
async function restoreHistory() {
  const serial = state.serial;
  const id = state.conversationId;
  if (state.fresh === id) return true;
  let data;
  try {
    data = await api.json(`/conversations/${encodeURIComponent(id)}`);
  } catch (error) {
    if (serial !== state.serial) return false;
    if (error.status !== 404) view.showNotice(t('history.load_failed', { error: error.message }), 'error');
    return true;
  }
  if (serial !== state.serial) return false;
  renderConversation(data, false);
  return true;
}

/** The stored turns of the current conversation (`clear`: instead of what is shown). */
function renderConversation(data, clear = true) {
  if (clear) view.showIntro(state.personality.intro);
  if (data.trimmed_turns > 0) {
    view.showNotice(t('history.trimmed', { n: data.trimmed_turns }));
  }
  state.lastPrompt = null;
  for (const turn of data.turns || []) {
    if (turn.role === 'user') state.lastPrompt = turn.content;
    view.renderStoredTurn(turn, state.conversationId);
  }
  ui.regenerate.hidden = !state.lastPrompt;
  scrollToEnd(true);
}

/** Show the conversation as the server keeps it (after an edit or a regeneration: with its versions). */
async function redraw() {
  const id = state.conversationId;
  const data = await api.json(`/conversations/${encodeURIComponent(id)}`).catch(() => null);
  if (data && id === state.conversationId && !state.current) renderConversation(data);
}

/** Show a personality with the given conversation, or the one it had last (or a new one). */
async function selectPersonality(name, conversationId = null) {
  const personality = state.personalities.find((p) => p.name === name) || state.personalities[0];
  window.clearTimeout(state.retryTimer);
  closeSocket();
  setConnection('connecting', 'connection.connecting'); // until the new socket is bound, not the old one's state
  state.personality = personality;
  state.retries = 0;
  store.set('personality', personality.name);
  ui.picker.value = personality.name;
  document.title = `${personality.name} · ${t('page.title')}`;
  view.setLanguage(personality.language);
  i18n.apply(i18n.preferred(personality.interface_language));
  describePersonality(personality);
  const known = conversationId || store.get(`conversation.${personality.name}`);
  startConversation(known || newId(), !known);
  if (await restoreHistory()) connect();
}

/** The sidebar's "open": switch personality if needed and continue that conversation. */
async function openConversation(item) {
  if (!state.personalities.some((p) => p.name === item.personality)) {
    showBanner(t('conversation.personality_gone', { personality: item.personality }), false);
    return;
  }
  if (item.id === state.conversationId) return;
  await selectPersonality(item.personality, item.id);
  announce(t('conversation.opened', { title: item.title || t('conversation.untitled') }));
}

function conversationDeleted(id) {
  for (const personality of state.personalities) {
    if (personality !== state.personality && store.get(`conversation.${personality.name}`) === id) {
      store.set(`conversation.${personality.name}`, newId());
    }
  }
  if (id !== state.conversationId) return;
  startConversation(newId(), true);
  connect(); // a socket stays bound to one conversation
}

function describePersonality(personality) {
  ui.info.replaceChildren();
  if (personality.description) ui.info.append(element('span', 'description', personality.description));
  const model = element('span', 'model');
  model.append(t('personality.model'), element('strong', '', personality.model || t('personality.unknown')));
  if (personality.context_window) model.append(` · ${t('personality.context', { n: personality.context_window })}`);
  ui.info.append(model);
}

async function loadPersonalities() {
  try {
    state.personalities = (await api.json('/personalities')).personalities || [];
  } catch (error) {
    showBanner(t('personality.load_failed', { error: error.message }), false);
    return;
  }
  if (!state.personalities.length) {
    showBanner(t('personality.none'), false);
    return;
  }
  ui.picker.replaceChildren(...state.personalities.map((p) => {
    const option = element('option', '', p.name);
    option.value = p.name;
    option.title = p.description || '';
    return option;
  }));
  ui.picker.disabled = false;
  const addressed = /^\/chat\/([^/]+)/.exec(window.location.pathname); // /chat/<personality> picks one
  await selectPersonality(addressed ? decodeURIComponent(addressed[1]) : store.get('personality'));
}

/* ---------- layout and input ---------- */

function autoGrow() {
  ui.prompt.style.height = 'auto';
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, window.innerHeight * 0.4)}px`;
}

function toggleContext(open) {
  ui.contextPanel.hidden = !open;
  ui.contextToggle.setAttribute('aria-expanded', String(open));
  setText(ui.contextToggle, open ? 'context.hide' : (ui.context.value.trim() ? 'context.added' : 'context.add'));
  if (open) ui.context.focus();
}

function bindEvents() {
  ui.composer.addEventListener('submit', (event) => { event.preventDefault(); submitComposer(); });
  ui.prompt.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitComposer();
    }
  });
  ui.prompt.addEventListener('input', autoGrow);
  document.addEventListener('keydown', onShortcut);
  ui.shortcutsButton.addEventListener('click', () => ui.shortcuts.showModal());
  ui.languageToggle.addEventListener('click', () => i18n.choose(i18n.language() === 'fr' ? 'en' : 'fr'));
  i18n.onLanguageChange(languageChanged);
  ui.stop.addEventListener('click', stopAnswer);
  ui.regenerate.addEventListener('click', regenerateAnswer);
  ui.newConversation.addEventListener('click', () => {
    if (!state.personality) return;
    startConversation(newId(), true);
    connect(); // a socket stays bound to one conversation
    ui.prompt.focus();
    announce(t('conversation.started'));
  });
  ui.picker.addEventListener('change', () => selectPersonality(ui.picker.value));
  ui.contextToggle.addEventListener('click', () => toggleContext(ui.contextPanel.hidden));
  ui.reconnectNow.addEventListener('click', reconnectNow);
  window.addEventListener('online', reconnectNow);
  api.onKeyChange(() => { if (!state.open) reconnectNow(); });
}

/** What scripts wrote is written again in the new language (the static text already is). */
function languageChanged(lang) {
  ui.languageToggle.lang = lang === 'fr' ? 'en' : 'fr';
  if (!state.personality) return;
  document.title = `${state.personality.name} · ${t('page.title')}`;
  describePersonality(state.personality);
  if (!state.current && state.fresh !== state.conversationId) redraw();
  else if (!state.current) view.showIntro(state.personality.intro);
}

/** The keyboard shortcuts listed in the #shortcuts dialog. */
function onShortcut(event) {
  const typing = /^(INPUT|TEXTAREA|SELECT)$/.test(event.target.tagName) || event.target.isContentEditable;
  const command = event.ctrlKey || event.metaKey;
  if (event.key === 'Escape' && state.current && !document.querySelector('dialog[open]')) {
    event.preventDefault();
    stopAnswer();
  } else if (command && event.shiftKey && event.key.toLowerCase() === 'o') {
    event.preventDefault();
    ui.newConversation.click();
  } else if (!typing && !command && event.key === '/') {
    event.preventDefault();
    ui.prompt.focus();
  } else if (!typing && event.key === '?' && !ui.shortcuts.open) {
    event.preventDefault();
    ui.shortcuts.showModal();
  }
}

/** While the server is still loading (or assembling) its model, say so instead of leaving a dead page. */
async function watchModelLoading() {
  for (let shown = false; ;) {
    const health = await fetch('/health', { cache: 'no-store' }).then((r) => r.json()).catch(() => null);
    if (health && health.status === 'loading') {
      if (!shown) showBanner(t('model.loading', { model: health.model || '' }), false);
      shown = true;
    } else {
      if (shown && health && health.status === 'ok') { hideBanner(); announce(t('model.ready')); }
      return;
    }
    await new Promise((resolve) => { window.setTimeout(resolve, 1500); });
  }
}

i18n.apply(i18n.preferred());
setUpTheme($('theme-toggle'));
view.setActions({ edit: editQuestion, choose: chooseVariant });
bindEvents();
history.initHistory({ open: openConversation, deleted: conversationDeleted });
initDocuments();
watchModelLoading();
loadPersonalities();
