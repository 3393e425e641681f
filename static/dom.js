/* Small DOM helpers shared by the chat page's modules. */

export const $ = (id) => document.getElementById(id);

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function button(label, className, type = 'button') {
  const node = element('button', className, label);
  node.type = type;
  return node;
}

/** Say something through the polite live region (a change is made even when the text repeats). */
export function announce(text) {
  const region = $('announcer');
  region.textContent = '';
  window.setTimeout(() => { region.textContent = text; }, 50);
}

const SPOKEN_KEPT = 30; // pieces left in the answer's live region (older ones were read long ago)

/** Read a piece of a streaming answer politely: each piece is added to a live region, so a screen reader reads
 * it after what it is reading now, and nothing already read is read again. Markdown marks are left out. */
export function speak(text) {
  const plain = text.replace(/```[^\n]*\n?|[*_`#>|]+/g, ' ').replace(/\s+/g, ' ').trim();
  if (!plain) return;
  const region = $('answer-live');
  region.append(element('p', '', plain));
  while (region.childElementCount > SPOKEN_KEPT) region.firstElementChild.remove();
}

export function nearBottom() {
  const box = document.scrollingElement;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 120;
}

export function scrollToEnd(force) {
  if (force) window.scrollTo({ top: document.scrollingElement.scrollHeight });
}

// Stroke icons drawn for this page (24 × 24, currentColor), so no icon font or emoji font is needed.
const ICONS = {
  more: 'M5 12h.01M12 12h.01M19 12h.01',
  thumb: 'M3 11h4v9H3zM7 11l3.2-7a1.9 1.9 0 0 1 3.6 1.1L13 9h6a2 2 0 0 1 2 2.4l-1.4 6.9A2 2 0 0 1 17.6 20H7',
};

export function icon(name) {
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('focusable', 'false');
  svg.setAttribute('class', `icon-svg icon-${name}`);
  const path = document.createElementNS(ns, 'path');
  path.setAttribute('d', ICONS[name]);
  svg.append(path);
  return svg;
}
