/* The chat page: a personality picker, a websocket per personality (JSON frames), Markdown answers.
 *
 * Model output is untrusted: markdown-it renders it with raw HTML off and images off (an image URL would
 * leak data to whoever the model was tricked into naming), then DOMPurify keeps only a short list of tags.
 * The conversation id lives in localStorage per personality, so a reload restores the history from
 * GET /conversations/<id> and the new socket binds to it with a |SESSION|id|/SESSION| frame.
 */
'use strict';

(() => {
  const STORAGE = 'llm.chat.';
  const BACKOFF_MS = [1000, 2000, 4000, 8000, 16000, 30000];
  const ALLOWED_TAGS = ['p', 'br', 'hr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'strong', 'em', 's', 'del', 'code',
    'pre', 'blockquote', 'ul', 'ol', 'li', 'a', 'table', 'thead', 'tbody', 'tr', 'th', 'td'];
  const CONTEXT_PREFIX = /^\s*\|CONTEXT\|([\s\S]*?)\|\/CONTEXT\|\s*/;

  const $ = (id) => document.getElementById(id);
  const ui = {
    picker: $('personality'), info: $('personality-info'), connection: $('connection'),
    connectionText: $('connection-text'), newConversation: $('new-conversation'), banner: $('banner'),
    bannerText: $('banner-text'), reconnectNow: $('reconnect-now'), messages: $('messages'),
    composer: $('composer'), prompt: $('prompt'), send: $('send'), stop: $('stop'),
    contextToggle: $('context-toggle'), contextPanel: $('context-panel'), context: $('context'),
    regenerate: $('regenerate'), announcer: $('announcer'), statusLive: $('status-live'),
  };

  const state = {
    personalities: [], personality: null, conversationId: null,
    socket: null, serial: 0, open: false,
    expecting: [], // one entry per bind or prompt frame sent: the server ends each with one end frame, in order
    current: null, lastPrompt: null, retries: 0, retryTimer: null,
  };

  /* ---------- small helpers ---------- */

  const store = {
    get(key) { try { return localStorage.getItem(STORAGE + key); } catch { return null; } },
    set(key, value) { try { localStorage.setItem(STORAGE + key, value); } catch { /* private mode */ } },
  };

  function newId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID().replaceAll('-', '');
    const bytes = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
    return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function plural(count, word) { return `${count} ${word}${count === 1 ? '' : 's'}`; }

  function announce(text) {
    ui.announcer.textContent = '';
    window.setTimeout(() => { ui.announcer.textContent = text; }, 50); // a change, even for repeated text
  }

  /* ---------- Markdown, made inert ---------- */

  const markdown = window.markdownit({ html: false, linkify: true, breaks: false, typographer: false });
  markdown.disable('image');
  window.DOMPurify.addHook('afterSanitizeAttributes', (node) => {
    if (node.tagName === 'A') {
      node.setAttribute('target', '_blank');
      node.setAttribute('rel', 'noopener noreferrer nofollow');
    }
  });

  function renderMarkdown(text) {
    return window.DOMPurify.sanitize(markdown.render(text), {
      ALLOWED_TAGS, ALLOWED_ATTR: ['href', 'title', 'start', 'class'], ALLOW_DATA_ATTR: false,
    });
  }

  /* ---------- messages ---------- */

  function splitContext(prompt) {
    const match = CONTEXT_PREFIX.exec(prompt);
    return match ? { context: match[1].trim(), question: prompt.slice(match[0].length) } : { context: '', question: prompt };
  }

  function appendMessage(role, label) {
    const article = element('article', `message ${role}`);
    article.setAttribute('aria-label', label);
    if (state.personality && state.personality.language) article.lang = state.personality.language;
    ui.messages.append(article);
    return article;
  }

  function addUserMessage(prompt) {
    const { context, question } = splitContext(prompt);
    const article = appendMessage('user', 'You');
    article.append(element('div', 'body plain', question));
    if (context) {
      const details = element('details', 'context-note');
      details.append(element('summary', '', 'Context added'), element('div', 'plain', context));
      article.append(details);
    }
    scrollToEnd(true);
  }

  function addAnswer(prompt) {
    const article = appendMessage('assistant', 'Answer');
    const answer = {
      prompt, article, text: '', statuses: [], sources: [], stopped: false, done: false, rendering: false,
      body: element('div', 'body markdown'), status: element('p', 'status-line'),
    };
    article.setAttribute('aria-busy', 'true');
    answer.status.append(element('span', 'spinner'), element('span', 'status-text', 'Thinking…'));
    article.append(answer.body, answer.status);
    scrollToEnd(true);
    return answer;
  }

  function showIntro() {
    ui.messages.replaceChildren();
    const intro = state.personality && state.personality.intro;
    if (!intro) return;
    const article = appendMessage('assistant intro', 'Introduction');
    article.append(element('div', 'body markdown'));
    article.firstChild.innerHTML = renderMarkdown(intro);
  }

  function showNotice(text, kind = 'notice') {
    const note = element('p', `notice ${kind}`, text);
    ui.messages.append(note);
    return note;
  }

  function appendToken(answer, text) {
    answer.text += text;
    if (answer.text.trim()) answer.status.hidden = true;
    if (answer.rendering) return;
    answer.rendering = true; // one render per frame, however many tokens arrived
    window.requestAnimationFrame(() => { answer.rendering = false; renderAnswer(answer); });
  }

  function renderAnswer(answer) {
    const stick = nearBottom();
    answer.body.innerHTML = renderMarkdown(answer.text);
    scrollToEnd(stick);
  }

  function setStatus(answer, message) {
    if (answer && !answer.done) {
      if (!answer.statuses.includes(message)) answer.statuses.push(message);
      answer.status.querySelector('.status-text').textContent = message;
      answer.status.hidden = false;
    }
    ui.statusLive.textContent = message;
  }

  function addSources(article, sources) {
    if (!sources.length) return;
    const box = element('div', 'sources');
    box.append(element('p', 'sources-title', 'Sources'));
    const list = element('ul');
    for (const source of sources) {
      const item = element('li');
      const title = source.title || source.url || 'Untitled';
      if (source.url && /^https?:\/\//i.test(source.url)) {
        const link = element('a', '', title);
        Object.assign(link, { href: source.url, target: '_blank', rel: 'noopener noreferrer nofollow' });
        item.append(link);
      } else {
        item.append(element('span', '', title));
      }
      list.append(item);
    }
    box.append(list);
    article.append(box);
  }

  function addCopyButton(article, text) {
    const button = element('button', 'button icon copy', 'Copy');
    button.type = 'button';
    button.setAttribute('aria-label', 'Copy answer');
    button.addEventListener('click', async () => {
      const ok = await copyText(text);
      button.textContent = ok ? 'Copied' : 'Copy failed';
      window.setTimeout(() => { button.textContent = 'Copy'; }, 2000);
    });
    return button;
  }

  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      const area = element('textarea'); // the clipboard API needs a secure context; this works without
      area.value = text;
      area.setAttribute('readonly', '');
      area.className = 'visually-hidden';
      document.body.append(area);
      area.select();
      const ok = document.execCommand('copy');
      area.remove();
      return ok;
    }
  }

  function usageText(usage) {
    if (!usage) return '';
    const parts = [];
    if (usage.completion_tokens != null) parts.push(plural(usage.completion_tokens, 'token'));
    if (usage.tokens_per_second) parts.push(`${usage.tokens_per_second.toFixed(1)} tokens/s`);
    return parts.join(' · ');
  }

  function usageDetails(usage) {
    if (!usage) return '';
    const parts = [];
    if (usage.prompt_tokens != null) parts.push(`Prompt: ${plural(usage.prompt_tokens, 'token')}`);
    if (usage.cached_tokens) parts.push(`reused from cache: ${usage.cached_tokens}`);
    if (usage.time_to_first_token != null) parts.push(`first token after ${usage.time_to_first_token.toFixed(2)} s`);
    return parts.join(', ');
  }

  function addFooter(article, text, { usage = null, trimmed = 0, note = '', statuses = [] } = {}) {
    const bits = [note, usageText(usage)].filter(Boolean);
    if (text || bits.length) {
      const footer = element('div', 'answer-footer');
      if (text) footer.append(addCopyButton(article, text));
      const meta = element('p', 'meta', bits.join(' · '));
      if (usage) meta.title = usageDetails(usage);
      footer.append(meta);
      article.append(footer);
    }
    if (statuses.length) {
      const details = element('details', 'status-notes');
      details.append(element('summary', '', plural(statuses.length, 'note')));
      for (const status of statuses) details.append(element('p', '', status));
      article.append(details);
    }
    if (trimmed > 0) {
      article.append(element('p', 'trimmed',
        `${plural(trimmed, 'earlier message')} ${trimmed === 1 ? 'was' : 'were'} left out to fit the model's context.`));
    }
  }

  /* ---------- answer life cycle ---------- */

  function errorText(frame) {
    if (frame.status === 503) return 'The server is busy right now. Please try again in a few seconds.';
    if (frame.status === 429) return 'Too many requests. Please wait a moment, then try again.';
    if (frame.status === 413) return `That message is too long for this model. ${frame.message || ''}`.trim();
    return frame.message || 'Something went wrong while answering.';
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
    if (!answer.text && !answer.error && !note) answer.body.append(element('p', 'empty', '(no answer)'));
    addSources(answer.article, answer.sources);
    const stopped = answer.stopped || end.finish_reason === 'cancelled' ? 'Stopped' : '';
    const length = end.finish_reason === 'length' ? 'Cut off at the length limit' : '';
    addFooter(answer.article, answer.text, {
      usage: end.usage, trimmed: end.trimmed_turns || 0, note: note || stopped || length, statuses: answer.statuses,
    });
    if (state.current === answer) setStreaming(null);
    announce(answer.error || `Answer: ${answer.body.textContent.trim()}${stopped ? ' (stopped)' : ''}`);
    ui.statusLive.textContent = '';
    scrollToEnd(nearBottom());
  }

  function setStreaming(answer) {
    const hadFocus = document.activeElement;
    state.current = answer;
    const busy = answer !== null;
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.stop.disabled = false;
    ui.stop.textContent = 'Stop';
    ui.regenerate.hidden = busy || !state.lastPrompt;
    if (busy && hadFocus === ui.send) ui.stop.focus(); // keep keyboard focus on the control in that place
    if (!busy && (hadFocus === ui.stop || hadFocus === document.body)) ui.prompt.focus();
  }

  function sendPrompt(prompt) {
    if (state.current) return false;
    if (!state.open) {
      showBanner('Not connected to the server yet. Reconnecting…', true);
      reconnectNow();
      return false;
    }
    state.lastPrompt = prompt;
    addUserMessage(prompt);
    const answer = addAnswer(prompt);
    state.socket.send(sessionMarker() + prompt); // the marker is harmless when bound and guards literal text
    state.expecting.push({ kind: 'answer', answer });
    setStreaming(answer);
    return true;
  }

  function stopAnswer() {
    if (!state.current || state.current.stopped) return;
    state.current.stopped = true;
    ui.stop.textContent = 'Stopping…';
    ui.stop.disabled = true;
    if (state.open) state.socket.send('|STOP|'); // the end frame follows and finishes the answer
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
    const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    const name = encodeURIComponent(state.personality.name);
    const socket = new WebSocket(`${scheme}//${window.location.host}/gpt-socket/${name}?format=json`);
    state.socket = socket;
    setConnection('connecting', state.retries ? 'Reconnecting…' : 'Connecting…');
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
    socket.send(sessionMarker()); // binds (or re-binds) this socket to the conversation
    state.expecting.push({ kind: 'bind' });
  }

  function onBound() {
    if (state.retries) announce('Reconnected.');
    state.retries = 0; // only now: a server that accepts then drops the socket keeps backing off
    hideBanner();
    setConnection('open', 'Connected');
  }

  function onFrame(data) {
    let frame;
    try { frame = JSON.parse(data); } catch { return; }
    const head = state.expecting[0];
    const answer = head && head.kind === 'answer' ? head.answer : null;
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
    if (head && head.kind === 'answer') {
      failAnswer(head.answer, errorText(frame));
    } else if (head && head.kind === 'bind' && frame.status === 400) {
      // The stored id cannot be used (e.g. it belongs to another personality): start afresh.
      startConversation(newId());
      showNotice('The previous conversation could not be continued, so a new one was started.');
      connect();
    } else {
      showBanner(errorText(frame), false);
    }
  }

  function onDrop() {
    state.open = false;
    for (const entry of state.expecting) {
      if (entry.kind === 'answer') {
        failAnswer(entry.answer, 'The connection was lost, so this answer was cut off.');
        finishAnswer(entry.answer, {}, 'Interrupted');
      }
    }
    state.expecting = [];
    scheduleReconnect();
  }

  function scheduleReconnect() {
    const delay = BACKOFF_MS[Math.min(state.retries, BACKOFF_MS.length - 1)];
    state.retries += 1;
    const seconds = Math.round(delay / 1000);
    setConnection('down', 'Offline');
    showBanner(`Connection to the server lost. Reconnecting in ${plural(seconds, 'second')}…`, true);
    window.clearTimeout(state.retryTimer);
    state.retryTimer = window.setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (state.open || !state.personality) return;
    state.retries = Math.max(state.retries, 1);
    connect();
  }

  function setConnection(kind, text) {
    ui.connection.dataset.state = kind;
    ui.connectionText.textContent = text;
  }

  function showBanner(text, offerReconnect) {
    ui.bannerText.textContent = text;
    ui.reconnectNow.hidden = !offerReconnect;
    ui.banner.hidden = false;
  }

  function hideBanner() { ui.banner.hidden = true; }

  /* ---------- personalities and conversations ---------- */

  async function fetchJson(url) {
    const response = await fetch(url, { headers: { Accept: 'application/json' } });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = new Error((body.error && body.error.message) || `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function startConversation(id) {
    state.conversationId = id;
    state.lastPrompt = null;
    store.set(`conversation.${state.personality.name}`, id);
    setStreaming(null);
    showIntro();
  }

  /** Render the stored turns; false when the user switched personality meanwhile. */
  async function restoreHistory() {
    const serial = state.serial;
    let data;
    try {
      data = await fetchJson(`/conversations/${encodeURIComponent(state.conversationId)}`);
    } catch (error) {
      if (serial !== state.serial) return false;
      if (error.status !== 404) showNotice(`The earlier messages could not be loaded: ${error.message}`, 'error');
      return true;
    }
    if (serial !== state.serial) return false;
    if (data.trimmed_turns > 0) {
      showNotice(`${plural(data.trimmed_turns, 'earlier message')} ${data.trimmed_turns === 1 ? 'is' : 'are'} `
        + "no longer in the model's context.");
    }
    for (const turn of data.turns || []) renderTurn(turn);
    ui.regenerate.hidden = !state.lastPrompt;
    scrollToEnd(true);
    return true;
  }

  function renderTurn(turn) {
    if (turn.role === 'user') {
      state.lastPrompt = turn.content;
      addUserMessage(turn.content);
      return;
    }
    const article = appendMessage('assistant', 'Answer');
    const body = element('div', 'body markdown');
    body.innerHTML = renderMarkdown(turn.content || '');
    article.append(body);
    addSources(article, turn.sources || []);
    addFooter(article, turn.content || '');
  }

  async function selectPersonality(name) {
    const personality = state.personalities.find((p) => p.name === name) || state.personalities[0];
    window.clearTimeout(state.retryTimer);
    closeSocket();
    state.personality = personality;
    state.retries = 0;
    store.set('personality', personality.name);
    ui.picker.value = personality.name;
    document.title = `${personality.name} · Chat`;
    describePersonality(personality);
    startConversation(store.get(`conversation.${personality.name}`) || newId());
    if (await restoreHistory()) connect();
  }

  function describePersonality(personality) {
    ui.info.replaceChildren();
    if (personality.description) ui.info.append(element('span', 'description', personality.description));
    const model = element('span', 'model');
    model.append('Model: ', element('strong', '', personality.model || 'unknown'));
    if (personality.context_window) model.append(` · ${personality.context_window.toLocaleString('en')} token context`);
    ui.info.append(model);
  }

  async function loadPersonalities() {
    try {
      state.personalities = (await fetchJson('/personalities')).personalities || [];
    } catch (error) {
      showBanner(`Could not load the personalities: ${error.message}. Reload the page to try again.`, false);
      return;
    }
    if (!state.personalities.length) {
      showBanner('No personalities are configured on this server.', false);
      return;
    }
    ui.picker.replaceChildren(...state.personalities.map((p) => {
      const option = element('option', '', p.name);
      option.value = p.name;
      option.title = p.description || '';
      return option;
    }));
    ui.picker.disabled = false;
    await selectPersonality(store.get('personality'));
  }

  /* ---------- layout and input ---------- */

  function nearBottom() {
    const box = document.scrollingElement;
    return box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  }

  function scrollToEnd(force) {
    if (force) window.scrollTo({ top: document.scrollingElement.scrollHeight });
  }

  function autoGrow() {
    ui.prompt.style.height = 'auto';
    ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, window.innerHeight * 0.4)}px`;
  }

  function toggleContext(open) {
    ui.contextPanel.hidden = !open;
    ui.contextToggle.setAttribute('aria-expanded', String(open));
    ui.contextToggle.textContent = open ? 'Hide context' : (ui.context.value.trim() ? 'Context added' : 'Add context');
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
    document.addEventListener('keydown', (event) => {
      if (event.key === 'Escape' && state.current) { event.preventDefault(); stopAnswer(); }
    });
    ui.stop.addEventListener('click', stopAnswer);
    ui.regenerate.addEventListener('click', () => state.lastPrompt && sendPrompt(state.lastPrompt));
    ui.newConversation.addEventListener('click', () => {
      if (!state.personality) return;
      startConversation(newId());
      connect(); // a socket stays bound to one conversation
      ui.prompt.focus();
      announce('New conversation started.');
    });
    ui.picker.addEventListener('change', () => selectPersonality(ui.picker.value));
    ui.contextToggle.addEventListener('click', () => toggleContext(ui.contextPanel.hidden));
    ui.reconnectNow.addEventListener('click', reconnectNow);
    window.addEventListener('online', reconnectNow);
  }

  bindEvents();
  loadPersonalities();
})();
