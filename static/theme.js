/* The colour theme: the system's (default), light or dark. The choice is kept in localStorage and applied as
 * data-theme on <html>, which sets the CSS color-scheme every light-dark() colour follows. */

import { t } from './i18n.js';

const KEY = 'llm.chat.theme';
const NEXT = { system: 'light', light: 'dark', dark: 'system' };

function saved() {
  try {
    const value = localStorage.getItem(KEY);
    return value in NEXT ? value : 'system';
  } catch { return 'system'; }
}

function apply(button, theme) {
  if (theme === 'system') delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  button.dataset.theme = theme;
  for (const [marker, attribute] of [['data-i18n-label', 'aria-label'], ['data-i18n-title', 'title']]) {
    button.setAttribute(marker, `theme.${theme}`); // so a change of language relabels it
    button.setAttribute(attribute, t(`theme.${theme}`));
  }
}

/** Apply the saved theme and make the button cycle system, light, dark. */
export function setUpTheme(button) {
  apply(button, saved());
  button.addEventListener('click', () => {
    const theme = NEXT[button.dataset.theme] || 'system';
    try { localStorage.setItem(KEY, theme); } catch { /* private mode: this page only */ }
    apply(button, theme);
  });
}
