/* The conversation as the user sees it: Markdown made inert, user messages, answers and their footers.
 *
 * Model output is untrusted: markdown-it renders it with raw HTML off and images off (an image URL would leak
 * data to whoever the model was tricked into naming), then DOMPurify keeps only a short list of tags. Fenced
 * code that names a language highlight.js knows is highlighted (its output is escaped text in <span>s, and goes
 * through DOMPurify like the rest); a finished answer's code blocks get a copy button each.
 */

import { $, element, scrollToEnd } from './dom.js';
import { feedbackControls } from './feedback.js';
import { t } from './i18n.js';

const ALLOWED_TAGS = ['p', 'br', 'hr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'strong', 'em', 's', 'del', 'code',
  'pre', 'blockquote', 'ul', 'ol', 'li', 'a', 'table', 'thead', 'tbody', 'tr', 'th', 'td', 'span'];
const CONTEXT_PREFIX = /^\s*\|CONTEXT\|([\s\S]*?)\|\/CONTEXT\|\s*/;

const container = $('messages');
let language = '';
let actions = { edit: null, choose: null }; // set by app.js: what Edit and the variant arrows do

function highlight(code, lang) {
  const hljs = window.hljs;
  if (!hljs || !lang || !hljs.getLanguage(lang)) return ''; // markdown-it then escapes the code itself
  return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
}

const markdown = window.markdownit({ html: false, linkify: true, breaks: false, typographer: false, highlight });
markdown.disable('image');
window.DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer nofollow');
  }
});

export function renderMarkdown(text) {
  return window.DOMPurify.sanitize(markdown.render(text), {
    ALLOWED_TAGS, ALLOWED_ATTR: ['href', 'title', 'start', 'class'], ALLOW_DATA_ATTR: false,
  });
}

/** The personality's language, set on each message so screen readers pronounce it right. */
export function setLanguage(lang) { language = lang || ''; }

/** What editing a question (`edit(messageId, text, article)`) and choosing a variant (`choose(messageId)`) do. */
export function setActions(handlers) { actions = handlers; }

function splitContext(prompt) {
  const match = CONTEXT_PREFIX.exec(prompt);
  return match ? { context: match[1].trim(), question: prompt.slice(match[0].length) } : { context: '', question: prompt };
}

export function appendMessage(role, label) {
  const article = element('article', `message ${role}`);
  article.setAttribute('aria-label', label);
  if (language) article.lang = language;
  container.append(article);
  return article;
}

export function addUserMessage(prompt) {
  const { context, question } = splitContext(prompt);
  const article = appendMessage('user', t('question.label'));
  article.append(element('div', 'body plain', question));
  if (context) {
    const details = element('details', 'context-note');
    details.append(element('summary', '', t('context.added')), element('div', 'plain', context));
    article.append(details);
  }
  article.dataset.prompt = prompt;
  scrollToEnd(true);
  return article;
}

function smallButton(text, label, onClick) {
  const button = element('button', 'button small ghost', text);
  button.type = 'button';
  if (label) button.setAttribute('aria-label', label);
  button.addEventListener('click', onClick);
  return button;
}

/** "‹ 2/3 ›": the variants of a message (earlier questions before an edit, earlier answers before a
 * regeneration); the arrows show another one, and the conversation continues from there. */
function variantNavigator(variants, id, what) {
  const index = variants.indexOf(id);
  const nav = element('div', 'variants');
  nav.setAttribute('role', 'group');
  nav.setAttribute('aria-label', t(`versions.${what}`));
  const previous = smallButton('‹', t(`versions.previous_${what}`), () => actions.choose(variants[index - 1]));
  const next = smallButton('›', t(`versions.next_${what}`), () => actions.choose(variants[index + 1]));
  previous.disabled = index <= 0;
  next.disabled = index >= variants.length - 1;
  const count = element('span', 'variant-count', `${index + 1}/${variants.length}`);
  count.setAttribute('aria-label', t('versions.count', { index: index + 1, n: variants.length }));
  nav.append(previous, count, next);
  return nav;
}

/** Under a stored question: Edit (and the versions, when it was edited before). */
export function addQuestionTools(article, id, variants = []) {
  article.dataset.messageId = id;
  const tools = element('div', 'message-tools');
  if (variants.length > 1) tools.append(variantNavigator(variants, id, 'question'));
  tools.append(smallButton(t('question.edit'), t('question.edit_label'), () => editInPlace(article)));
  article.append(tools);
}

/** The question becomes a text box; sending it asks it again in its place (the earlier version is kept). */
function editInPlace(article) {
  if (article.querySelector('.editor')) return;
  const editor = element('form', 'editor');
  const box = element('textarea', 'edit-box');
  box.value = article.dataset.prompt || '';
  box.setAttribute('aria-label', t('question.edited'));
  box.rows = Math.min(10, box.value.split('\n').length + 1);
  const send = element('button', 'button primary small', t('composer.send'));
  send.type = 'submit';
  const cancel = smallButton(t('action.cancel'), '', () => close());
  const row = element('div', 'editor-row');
  row.append(send, cancel);
  editor.append(box, row);
  const close = () => { editor.remove(); article.classList.remove('editing'); };
  editor.addEventListener('submit', (event) => {
    event.preventDefault();
    const text = box.value.trim();
    if (text && actions.edit(Number(article.dataset.messageId), text, article) !== false) close();
  });
  box.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') { event.preventDefault(); event.stopPropagation(); close(); }
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) { event.preventDefault(); editor.requestSubmit(); }
  });
  article.classList.add('editing');
  article.append(editor);
  box.focus();
}

/** Empty the conversation and show the personality's introduction, if it has one. */
export function showIntro(intro) {
  container.replaceChildren();
  if (!intro) return;
  const article = appendMessage('assistant intro', t('intro.label'));
  article.append(element('div', 'body markdown'));
  article.firstChild.innerHTML = renderMarkdown(intro);
}

export function showNotice(text, kind = 'notice') {
  const note = element('p', `notice ${kind}`, text);
  container.append(note);
  return note;
}

export function addSources(article, sources) {
  if (!sources.length) return;
  const box = element('div', 'sources');
  box.append(element('p', 'sources-title', t('sources.title')));
  const list = element('ul');
  for (const source of sources) {
    const item = element('li');
    const named = source.title || source.url || t('sources.untitled');
    const title = source.number ? `[${source.number}] ${named}` : named;  // how the answer cites it
    // Web pages, and documents of the user's knowledge bases (same origin: the session cookie opens them).
    if (source.url && (/^https?:\/\//i.test(source.url) || source.url.startsWith('/knowledge/'))) {
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

function copyButton(text, what = 'answer', className = 'button icon copy') {
  const button = element('button', className, t('copy.button'));
  button.type = 'button';
  button.setAttribute('aria-label', t(`copy.${what}`));
  button.addEventListener('click', async () => {
    const ok = await copyText(text);
    button.textContent = t(ok ? 'copy.done' : 'copy.failed');
    window.setTimeout(() => { button.textContent = t('copy.button'); }, 2000);
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
  if (usage.completion_tokens != null) parts.push(t('usage.tokens', { n: usage.completion_tokens }));
  if (usage.tokens_per_second) parts.push(t('usage.speed', { speed: Number(usage.tokens_per_second.toFixed(1)) }));
  return parts.join(' · ');
}

function usageDetails(usage) {
  if (!usage) return '';
  const parts = [];
  if (usage.prompt_tokens != null) parts.push(t('usage.prompt', { n: usage.prompt_tokens }));
  if (usage.cached_tokens) parts.push(t('usage.cached', { n: usage.cached_tokens }));
  if (usage.time_to_first_token != null) {
    parts.push(t('usage.first_token', { seconds: Number(usage.time_to_first_token.toFixed(2)) }));
  }
  return parts.join(', ');
}

/**
 * Copy button, rating buttons (when the answer was stored: `feedback.messageId`), usage figures, notes.
 * `feedback` is {conversationId, messageId, rating}.
 */
export function addFooter(article, text, options = {}) {
  const {
    usage = null, trimmed = 0, note = '', statuses = [], notices = [], feedback = null, variants = [],
  } = options;
  const bits = [note, usageText(usage)].filter(Boolean);
  const rated = feedback && feedback.messageId != null;
  for (const pre of article.querySelectorAll('.body pre')) {
    pre.append(copyButton(pre.textContent, 'code', 'button small code-copy'));
  }
  if (text || bits.length || rated) {
    const footer = element('div', 'answer-footer');
    if (variants.length > 1) footer.append(variantNavigator(variants, feedback.messageId, 'answer'));
    if (text) footer.append(copyButton(text));
    if (rated) footer.append(feedbackControls(article, feedback));
    const meta = element('p', 'meta', bits.join(' · '));
    if (usage) meta.title = usageDetails(usage);
    footer.append(meta);
    article.append(footer);
  }
  for (const notice of notices) { // what went wrong (a page that could not be read) is shown, not folded away
    const shown = element('p', 'notice warning', notice);
    shown.setAttribute('role', 'note');
    article.append(shown);
  }
  const progress = statuses.filter((status) => !notices.includes(status));
  if (progress.length) {
    const details = element('details', 'status-notes');
    details.append(element('summary', '', t('answer.notes', { n: progress.length })));
    for (const status of progress) details.append(element('p', '', status));
    article.append(details);
  }
  if (trimmed > 0) {
    article.append(element('p', 'trimmed', t('answer.trimmed', { n: trimmed })));
  }
}

/** One turn from GET /conversations/<id>, as it looked when it was answered. */
export function renderStoredTurn(turn, conversationId) {
  if (turn.role === 'user') {
    addQuestionTools(addUserMessage(turn.content), turn.id, turn.variants || []);
    return;
  }
  const article = appendMessage('assistant', t('answer.label'));
  article.dataset.messageId = turn.id;
  const body = element('div', 'body markdown');
  body.innerHTML = renderMarkdown(turn.content || '');
  article.append(body);
  addSources(article, turn.sources || []);
  addFooter(article, turn.content || '', {
    feedback: { conversationId, messageId: turn.id, rating: turn.rating }, variants: turn.variants || [],
  });
}

/** The last answer shown (not the introduction), if any. */
export function lastAnswer() {
  const shown = container.querySelectorAll('article.message.assistant:not(.intro)');
  return shown.length ? shown[shown.length - 1] : null;
}
