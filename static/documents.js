/* The user's documents (knowledge bases): the #documents dialog lists their bases and each base's documents,
 * takes files by drag and drop or the file picker, and uploads them one by one with a progress bar and the
 * server's verdict per file (indexed with its passages, or refused with the reason). Files dropped anywhere on the
 * page open the dialog and upload to the base shown. The first upload of a user without a base creates one.
 *
 * Answers then use passages of these documents and cite them as [1], [2]... (messages.js links each source to its
 * document, at its page for PDFs).
 */

import * as api from './api.js';
import { $, announce, button, element } from './dom.js';
import { t } from './i18n.js';

const ACCEPT = '.pdf,.docx,.html,.htm,.md,.markdown,.txt';
const ui = {
  dialog: $('documents'), open: $('documents-button'), bases: $('knowledge-base'), newBase: $('new-base'),
  createBase: $('create-base'), drop: $('dropzone'), input: $('document-files'), uploads: $('uploads'),
  list: $('document-list'), empty: $('documents-empty'),
};
let bases = [];

async function loadBases(selected) {
  bases = (await api.json('/knowledge/bases')).bases;
  ui.bases.replaceChildren(...bases.map((base) => {
    const option = element('option', '', t('documents.base_option', { name: base.name, n: base.documents }));
    option.value = String(base.id);
    return option;
  }));
  ui.bases.disabled = !bases.length;
  if (selected) ui.bases.value = String(selected);
  await loadDocuments();
}

async function loadDocuments() {
  const base = ui.bases.value;
  const documents = base ? (await api.json(`/knowledge/bases/${base}/documents`)).documents : [];
  ui.empty.hidden = documents.length > 0;
  ui.list.replaceChildren(...documents.map((document) => documentItem(base, document)));
}

function documentItem(base, document) {
  const item = element('li', 'document');
  const link = element('a', '', document.name);
  Object.assign(link, { href: `/knowledge/bases/${base}/documents/${document.id}/file`, target: '_blank',
    rel: 'noopener' });
  const facts = element('span', 'document-facts', document.pages
    ? t('documents.facts_pages', { n: document.passages, pages: document.pages })
    : t('documents.facts', { n: document.passages }));
  const remove = button(t('documents.delete'), 'button ghost small');
  remove.setAttribute('aria-label', t('documents.delete_named', { name: document.name }));
  remove.addEventListener('click', async () => {
    await api.request(`/knowledge/bases/${base}/documents/${document.id}`, { method: 'DELETE' });
    announce(t('documents.deleted', { name: document.name }));
    await loadBases(base);
  });
  item.append(link, facts, remove);
  return item;
}

async function createBase(name) {
  const base = await api.json('/knowledge/bases', { method: 'POST', body: { name } });
  await loadBases(base.id);
  return base.id;
}

/** One file to the base, its progress shown as it goes; resolves with the server's verdict for it. */
function sendFile(base, file, row) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    const form = new FormData();
    form.append('file', file, file.name);
    xhr.open('POST', `/knowledge/bases/${base}/documents`);
    xhr.withCredentials = true;
    xhr.upload.onprogress = (event) => {
      if (!event.lengthComputable) return;
      row.progress.value = event.loaded / event.total;
      row.status.textContent = t('documents.uploading', { percent: Math.round((100 * event.loaded) / event.total) });
    };
    xhr.upload.onload = () => { row.progress.removeAttribute('value'); row.status.textContent = t('documents.reading'); };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch { /* not JSON: the status says enough */ }
      const verdict = (body.documents || [])[0];
      if (verdict && verdict.status === 'indexed') resolve({ ok: true, passages: verdict.document.passages });
      else resolve({ ok: false, message: (verdict && verdict.error.message) || (body.error && body.error.message)
        || t('documents.failed', { status: xhr.status }) });
    };
    xhr.onerror = () => resolve({ ok: false, message: t('documents.network') });
    xhr.send(form);
  });
}

function uploadRow(file) {
  const item = element('li', 'upload');
  const progress = element('progress');
  progress.max = 1;
  progress.value = 0;
  progress.setAttribute('aria-label', file.name);
  const status = element('span', 'upload-status', t('documents.waiting'));
  item.append(element('span', 'upload-name', file.name), progress, status);
  ui.uploads.append(item);
  return { item, progress, status };
}

/** Upload the files in turn (a refused one does not stop the others), then show the base again. */
async function upload(files) {
  if (!files.length) return;
  if (!ui.dialog.open) ui.dialog.showModal();
  await api.json('/knowledge/bases'); // asks for the API key first if the server wants one
  const base = ui.bases.value || await createBase(t('documents.default_base'));
  const rows = files.map(uploadRow);
  let added = 0;
  for (const [index, file] of files.entries()) {
    const row = rows[index];
    const verdict = await sendFile(base, file, row);
    row.progress.value = 1;
    row.item.dataset.state = verdict.ok ? 'indexed' : 'refused';
    row.status.textContent = verdict.ok ? t('documents.indexed', { n: verdict.passages }) : verdict.message;
    if (verdict.ok) added += 1;
  }
  announce(t('documents.uploaded', { n: added, total: files.length }));
  await loadBases(base);
}

function hasFiles(event) {
  return Array.from(event.dataTransfer ? event.dataTransfer.types : []).includes('Files');
}

export function initDocuments() {
  ui.input.accept = ACCEPT;
  ui.open.addEventListener('click', async () => {
    ui.dialog.showModal();
    await loadBases(ui.bases.value);
  });
  ui.bases.addEventListener('change', loadDocuments);
  ui.createBase.addEventListener('click', async () => {
    const name = ui.newBase.value.trim();
    if (!name) { ui.newBase.focus(); return; }
    try {
      await createBase(name);
      ui.newBase.value = '';
      announce(t('documents.base_created', { name }));
    } catch (error) {
      announce(error.message);
      ui.newBase.setCustomValidity(error.message);
      ui.newBase.reportValidity();
      ui.newBase.setCustomValidity('');
    }
  });
  ui.input.addEventListener('change', () => { upload(Array.from(ui.input.files)); ui.input.value = ''; });
  ui.drop.addEventListener('click', (event) => { if (event.target === ui.drop) ui.input.click(); });
  for (const target of [ui.drop, document]) {
    target.addEventListener('dragover', (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      ui.drop.dataset.over = 'true';
    });
    target.addEventListener('drop', (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      event.stopPropagation();
      delete ui.drop.dataset.over;
      upload(Array.from(event.dataTransfer.files));
    });
  }
  ui.drop.addEventListener('dragleave', () => { delete ui.drop.dataset.over; });
}
