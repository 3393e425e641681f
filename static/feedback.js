/* Thumbs up / down on a stored answer, then an optional comment, sent with the answer's message id.
 *
 * The server keeps one rating and one comment per answer: a new rating replaces the old one (and clears its
 * comment), so a second click on the pressed button only offers the comment field again.
 */

import { json } from './api.js';
import { announce, button, element, icon } from './dom.js';
import { t } from './i18n.js';

const RATINGS = { 1: 'up', '-1': 'down' };
let serial = 0;

/** The "Rate this answer" group for an answer's footer. */
export function feedbackControls(article, { conversationId, messageId, rating = null }) {
  const group = element('div', 'feedback');
  group.setAttribute('role', 'group');
  group.setAttribute('aria-label', t('feedback.label'));
  const state = {
    article, conversationId, messageId, rating: RATINGS[rating] || null, busy: false, form: null, error: null,
    up: rateButton('up', t('feedback.good')), down: rateButton('down', t('feedback.bad')),
  };
  state.up.addEventListener('click', () => rate(state, 'up'));
  state.down.addEventListener('click', () => rate(state, 'down'));
  group.append(state.up, state.down);
  showPressed(state);
  return group;
}

function rateButton(kind, label) {
  const node = button('', `button icon rate ${kind}`);
  node.setAttribute('aria-label', label);
  node.append(icon('thumb'));
  return node;
}

function showPressed(state) {
  state.up.setAttribute('aria-pressed', String(state.rating === 'up'));
  state.down.setAttribute('aria-pressed', String(state.rating === 'down'));
}

function endpoint(state) {
  return `/conversations/${encodeURIComponent(state.conversationId)}/messages/${state.messageId}/feedback`;
}

async function rate(state, rating) {
  if (state.busy) return;
  if (state.rating === rating) { openComment(state); return; }
  const previous = state.rating;
  state.rating = rating;
  showPressed(state);
  state.busy = true;
  try {
    await json(endpoint(state), { method: 'POST', body: { rating } });
    showError(state, '');
    openComment(state);
    announce(t(rating === 'up' ? 'feedback.thanks_good' : 'feedback.thanks_bad'));
  } catch (error) {
    state.rating = previous;
    showPressed(state);
    showError(state, t('feedback.rating_failed', { error: error.message }));
  } finally {
    state.busy = false;
  }
}

function openComment(state) {
  if (state.form) state.form.remove();
  const id = `feedback-comment-${serial += 1}`;
  const form = element('form', 'feedback-comment');
  const question = t(state.rating === 'up' ? 'feedback.what_good' : 'feedback.what_wrong');
  const label = element('label', '', question);
  label.htmlFor = id;
  const area = element('textarea');
  Object.assign(area, { id, rows: 2, maxLength: 2000 });
  const send = button(t('feedback.send'), 'button secondary small', 'submit');
  const row = element('div', 'feedback-comment-row');
  row.append(area, send);
  form.append(label, row);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    if (area.value.trim()) sendComment(state, area.value.trim(), send);
    else area.focus();
  });
  state.form = form;
  state.article.append(form);
}

async function sendComment(state, comment, send) {
  send.disabled = true;
  try {
    await json(endpoint(state), { method: 'POST', body: { rating: state.rating, comment } });
  } catch (error) {
    send.disabled = false;
    send.focus();
    showError(state, t('feedback.comment_failed', { error: error.message }));
    return;
  }
  showError(state, '');
  const thanks = element('p', 'feedback-thanks', t('feedback.comment_sent'));
  state.form.replaceWith(thanks);
  state.form = thanks;
  (state.rating === 'up' ? state.up : state.down).focus(); // the form that had focus is gone
  announce(t('feedback.comment_sent_spoken'));
}

function showError(state, message) {
  if (state.error) state.error.remove();
  state.error = null;
  if (!message) return;
  state.error = element('p', 'error', message);
  state.error.setAttribute('role', 'alert');
  state.article.append(state.error);
}
