/* The interface in English and French: every word the page shows comes from static/locales/<lang>.json.
 *
 * The language is the one the user chose with the language button (kept in localStorage), else the one the
 * personality declares, else the browser's first English or French preference, else English. Static text in
 * index.html carries data-i18n (its text), data-i18n-label (aria-label), data-i18n-placeholder and
 * data-i18n-title attributes naming catalogue keys; scripts call t(key, values). A value that depends on a count
 * is an object of plural forms chosen by Intl.PluralRules ({"one": "{n} token", "other": "{n} tokens"}).
 * tests/test_i18n.py checks both catalogues have the same keys and placeholders and that no text is left out.
 */

export const LANGUAGES = ['en', 'fr'];
const KEY = 'llm.chat.language';
const ATTRIBUTES = { 'data-i18n-label': 'aria-label', 'data-i18n-placeholder': 'placeholder', 'data-i18n-title': 'title' };

async function load(lang) {
  const response = await fetch(`/static/locales/${lang}.json`, { credentials: 'same-origin' });
  return response.json();
}

const catalogues = Object.fromEntries(await Promise.all(LANGUAGES.map(async (lang) => [lang, await load(lang)])));
const listeners = [];
let current = 'en';

/** The language the interface is in now. */
export function language() { return current; }

/** A catalogue entry with its {placeholders} filled in; `values.n` chooses among plural forms. */
export function t(key, values = {}) {
  let text = catalogues[current][key] ?? catalogues.en[key] ?? key;
  if (typeof text === 'object') text = text[new Intl.PluralRules(current).select(values.n ?? 0)] ?? text.other;
  return text.replace(/\{(\w+)\}/g, (whole, name) => {
    if (!(name in values)) return whole;
    const value = values[name];
    return typeof value === 'number' ? value.toLocaleString(current) : String(value);
  });
}

/** Call back when the language changes (to redraw what scripts wrote). */
export function onLanguageChange(listener) { listeners.push(listener); }

function stored() {
  try { return localStorage.getItem(KEY); } catch { return null; }
}

/** The language to show: the user's choice, else the personality's, else the browser's, else English. */
export function preferred(personalityLanguage = '') {
  const choice = stored();
  if (LANGUAGES.includes(choice)) return choice;
  const declared = (personalityLanguage || '').slice(0, 2).toLowerCase();
  if (LANGUAGES.includes(declared)) return declared;
  const browser = (navigator.languages || [navigator.language]).map((tag) => (tag || '').slice(0, 2).toLowerCase());
  return browser.find((tag) => LANGUAGES.includes(tag)) || 'en';
}

/** The language button: the user's choice from now on. */
export function choose(lang) {
  try { localStorage.setItem(KEY, lang); } catch { /* private mode: this page only */ }
  apply(lang);
}

/** Show the interface in `lang`: the static text at once, the rest through the listeners. */
export function apply(lang) {
  const changed = lang !== current;
  current = LANGUAGES.includes(lang) ? lang : 'en';
  document.documentElement.lang = current;
  for (const node of document.querySelectorAll('[data-i18n]')) node.textContent = t(node.dataset.i18n);
  for (const [source, target] of Object.entries(ATTRIBUTES)) {
    for (const node of document.querySelectorAll(`[${source}]`)) node.setAttribute(target, t(node.getAttribute(source)));
  }
  if (changed) for (const listener of listeners) listener(current);
}

/** "just now", "5 minutes ago", "yesterday", "3 days ago", then the date, in the interface's language. */
export function relativeDate(seconds, now = Date.now()) {
  const diff = seconds - now / 1000;
  const ago = -diff;
  const relative = new Intl.RelativeTimeFormat(current, { numeric: 'auto' });
  if (ago < 45) return t('time.just_now');
  if (ago < 3600) return relative.format(Math.round(diff / 60), 'minute');
  if (ago < 86400) return relative.format(Math.round(diff / 3600), 'hour');
  if (ago < 7 * 86400) return relative.format(Math.round(diff / 86400), 'day');
  const date = new Date(seconds * 1000);
  const sameYear = date.getFullYear() === new Date(now).getFullYear();
  return date.toLocaleDateString(current, { day: 'numeric', month: 'short', year: sameYear ? undefined : 'numeric' });
}

/** A date and time in full, for tooltips. */
export function fullDate(seconds) {
  return new Intl.DateTimeFormat(current, { dateStyle: 'medium', timeStyle: 'short' }).format(new Date(seconds * 1000));
}
