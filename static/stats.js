// The stats page: reads /stats.json and draws small inline SVG charts, each with a title, a description for
// screen readers and its data as a table. No library: every node is built with createElement(NS) and
// textContent, so names coming from the server are never parsed as HTML. An API key is handled as the chat
// page does (static/api.js): taken once from ?api_key= into this tab's sessionStorage, sent as X-API-Key. Its
// words come from the chat page's catalogues (static/i18n.js), in the language chosen there or the browser's.

import { apply, language, preferred, t } from './i18n.js';

const SVG = "http://www.w3.org/2000/svg";
const HEIGHT = 200, PAD = { left: 44, right: 12, top: 12, bottom: 26 };
const REFRESH_MS = 10000;
let timer = null;
let uid = 0;
let last = null; // the latest figures, redrawn when the window is resized
let WIDTH = 640; // each chart is drawn at its container's pixel width so text keeps its real size

function sizeTo(container) {
  WIDTH = Math.max(280, Math.round(container.clientWidth || 640));
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

const whole = new Intl.NumberFormat(language(), { maximumFractionDigits: 1 });
const small = new Intl.NumberFormat(language(), { maximumSignificantDigits: 2 });
const fmt = (value) => (value === null || value === undefined ? "–"
  : (Math.abs(value) < 10 ? small : whole).format(value));
const clock = (epoch) => new Date(epoch * 1000).toLocaleTimeString(language(), { hour: "2-digit", minute: "2-digit",
  hourCycle: "h23" });

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  const step = [1, 2, 2.5, 5, 10].find((m) => m * power >= value);
  return step * power;
}

// An <svg role="img"> with its <title> and <desc>, a y axis with three grid lines and time labels on x.
function frame(title, desc, max, minutes) {
  const id = `chart-${++uid}`;
  const svg = svgEl("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "plot",
    "aria-labelledby": `${id}-title ${id}-desc` });
  svg.append(svgEl("title", { id: `${id}-title` }, title), svgEl("desc", { id: `${id}-desc` }, desc));
  const innerH = HEIGHT - PAD.top - PAD.bottom;
  for (const fraction of [0, 0.5, 1]) {
    const y = PAD.top + innerH * (1 - fraction);
    svg.append(svgEl("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y, y2: y, class: "grid" }));
    svg.append(svgEl("text", { x: PAD.left - 6, y: y + 4, class: "axis", "text-anchor": "end" },
      fmt(max * fraction)));
  }
  if (minutes) {
    const last = minutes.length - 1;
    minutes.forEach((minute, i) => {
      if (!(WIDTH < 450 ? [0, 30, last] : [0, 15, 30, 45, last]).includes(i)) return;
      const anchor = i === 0 ? "start" : i === last ? "end" : "middle";
      const x = i === 0 ? PAD.left : i === last ? WIDTH - PAD.right : xOf(i, minutes.length);
      svg.append(svgEl("text", { x, y: HEIGHT - 8, class: "axis", "text-anchor": anchor }, clock(minute.start)));
    });
  }
  return svg;
}

const barWidth = (count) => (WIDTH - PAD.left - PAD.right) / count;
const xOf = (index, count) => PAD.left + index * barWidth(count);
const yOf = (value, max) => PAD.top + (HEIGHT - PAD.top - PAD.bottom) * (1 - value / max);

function legend(series) {
  const list = el("ul", { class: "legend" });
  for (const item of series) {
    const entry = el("li");
    entry.append(el("span", { class: `swatch ${item.cls}`, "aria-hidden": "true" }), item.label);
    list.append(entry);
  }
  return list;
}

function dataTable(caption, headers, rows) {
  const details = el("details", { class: "data" });
  details.append(el("summary", {}, t("stats.show_data")));
  if (!rows.length) {
    details.append(el("p", { class: "empty" }, t("stats.nothing")));
    return details;
  }
  const table = el("table");
  table.append(el("caption", { class: "visually-hidden" }, caption));
  const head = el("tr");
  headers.forEach((header) => head.append(el("th", { scope: "col" }, header)));
  const thead = el("thead");
  thead.append(head);
  table.append(thead);
  const body = el("tbody");
  rows.forEach((row) => {
    const tr = el("tr");
    row.forEach((cell, i) => tr.append(el(i ? "td" : "th", i ? {} : { scope: "row" }, String(cell))));
    body.append(tr);
  });
  table.append(body);
  details.append(table);
  return details;
}

// Minutes with activity, as table rows: time, then each series' value.
function minuteRows(minutes, series) {
  return minutes.filter((m) => series.some((s) => s.value(m) > 0))
    .map((m) => [clock(m.start), ...series.map((s) => fmt(s.value(m)))]);
}

function stackedBars(container, title, minutes, series) {
  sizeTo(container);
  const totals = minutes.map((m) => series.reduce((sum, s) => sum + s.value(m), 0));
  const max = niceMax(Math.max(...totals));
  const sum = totals.reduce((a, b) => a + b, 0);
  const busiest = Math.max(...totals);
  const svg = frame(title, t("stats.bars_desc", { sum, busiest }), max, minutes);
  const width = Math.max(1, barWidth(minutes.length) - 2);
  minutes.forEach((minute, i) => {
    let base = 0;
    for (const s of series) {
      const value = s.value(minute);
      if (!value) continue;
      const top = yOf(base + value, max);
      svg.append(svgEl("rect", { x: xOf(i, minutes.length) + 1, y: top, width, height: yOf(base, max) - top,
        class: s.cls }));
      base += value;
    }
  });
  container.replaceChildren(svg, legend(series),
    dataTable(title, [t("stats.minute"), ...series.map((s) => s.label)], minuteRows(minutes, series)));
}

function lines(container, title, minutes, series) {
  sizeTo(container);
  const max = niceMax(Math.max(...minutes.flatMap((m) => series.map((s) => s.value(m)))));
  const peaks = series.map((s) => t("stats.peak", { series: s.label, peak: fmt(Math.max(...minutes.map(s.value))) }))
  .join("; ");
  const svg = frame(title, `${peaks}.`, max, minutes);
  const half = barWidth(minutes.length) / 2;
  for (const s of series) {
    const points = minutes.map((m, i) => `${(xOf(i, minutes.length) + half).toFixed(1)},${yOf(s.value(m), max)
      .toFixed(1)}`);
    svg.append(svgEl("polyline", { points: points.join(" "), class: `line ${s.cls}` }));
  }
  container.replaceChildren(svg, legend(series),
    dataTable(title, [t("stats.minute"), ...series.map((s) => s.label)], minuteRows(minutes, series)));
}

// Horizontal bars: one row per label, the value printed at the bar's end.
function hbars(container, title, rows, unit, emptyText) {
  if (!rows.some((row) => row.value !== null && row.value !== undefined)) {
    container.replaceChildren(el("p", { class: "empty" }, emptyText));
    return;
  }
  sizeTo(container);
  const rowH = 30, height = rows.length * rowH + 8, labelW = Math.min(140, WIDTH / 4);
  const max = niceMax(Math.max(...rows.map((row) => row.value || 0)));
  const id = `chart-${++uid}`;
  const desc = rows.map((row) => `${row.label}: ${fmt(row.value)}${row.suffix || unit}`).join("; ");
  const svg = svgEl("svg", { viewBox: `0 0 ${WIDTH} ${height}`, role: "img", class: "plot",
    "aria-labelledby": `${id}-title ${id}-desc` });
  svg.append(svgEl("title", { id: `${id}-title` }, title), svgEl("desc", { id: `${id}-desc` }, desc));
  rows.forEach((row, i) => {
    const y = 4 + i * rowH;
    const length = ((WIDTH - labelW - 90) * (row.value || 0)) / max;
    svg.append(svgEl("text", { x: labelW - 8, y: y + 18, class: "axis label", "text-anchor": "end" }, row.label));
    if (row.parts) {
      let x = labelW;
      for (const part of row.parts) {
        const w = ((WIDTH - labelW - 90) * part.value) / max;
        svg.append(svgEl("rect", { x, y: y + 4, width: Math.max(0, w), height: rowH - 10, class: part.cls }));
        x += w;
      }
    } else {
      svg.append(svgEl("rect", { x: labelW, y: y + 4, width: Math.max(1, length), height: rowH - 10,
        class: row.cls || "series-a" }));
    }
    svg.append(svgEl("text", { x: labelW + length + 6, y: y + 18, class: "axis value" },
      `${fmt(row.value)}${row.suffix || unit}`));
  });
  container.replaceChildren(svg, dataTable(title, ["", t("stats.value")],
    rows.map((row) => [row.label, `${fmt(row.value)}${row.suffix || unit}`])));
}

function latency(data) {
  const { time_to_first_token: ttft, tokens_per_second: tps, samples } = data.latency;
  const empty = t("stats.no_answers");
  const rows = (figures) => ["p50", "p95", "p99"].map((p) => ({ label: p, value: figures[p] }));
  hbars(document.getElementById("ttft-chart"), t("stats.ttft_title", { n: samples }), rows(ttft), " s",
    empty);
  hbars(document.getElementById("tps-chart"), t("stats.tps_title", { n: samples }), rows(tps), "",
    empty);
}

function feedback(data) {
  const rows = data.feedback.map((item) => ({
    label: item.personality, value: item.up + item.down, suffix: ` ${t("stats.share_up", { percent: Math.round(item.ratio * 100) })}`,
    parts: [{ value: item.up, cls: "series-ok" }, { value: item.down, cls: "series-bad" }],
  }));
  const container = document.getElementById("feedback-chart");
  hbars(container, t("stats.ratings_title"), rows, "", t("stats.no_feedback"));
  if (rows.length) {
    container.insertBefore(legend([{ label: t("stats.thumbs_up"), cls: "series-ok" },
      { label: t("stats.thumbs_down"), cls: "series-bad" }]), container.children[1]);
  }
}

function tiles(data) {
  const totals = data.totals;
  const set = (id, text) => { document.getElementById(id).textContent = text; };
  set("tile-requests", fmt(totals.requests));
  set("tile-answers", fmt(totals.answers));
  set("tile-tokens", `${fmt(totals.prompt_tokens)} / ${fmt(totals.completion_tokens)}`);
  set("tile-errors", `${fmt(totals.client_errors)} / ${fmt(totals.server_errors)}`);
  set("tile-load", `${fmt(data.load.queue_depth)} / ${fmt(data.load.active_sequences)}`);
  const p95 = data.latency.time_to_first_token.p95;
  set("tile-ttft", p95 === null ? "–" : `${fmt(p95)} s`);
}

function render(data) {
  last = data;
  const minutes = data.minutes;
  tiles(data);
  stackedBars(document.getElementById("requests-chart"), t("stats.requests_chart"), minutes, [
    { label: t("stats.answered"), cls: "series-a", value: (m) => m.requests - m.client_errors - m.server_errors },
    { label: t("stats.client_errors"), cls: "series-warn", value: (m) => m.client_errors },
    { label: t("stats.server_errors"), cls: "series-bad", value: (m) => m.server_errors },
  ]);
  lines(document.getElementById("tokens-chart"), t("stats.tokens_chart"), minutes, [
    { label: t("stats.tokens_in"), cls: "series-a", value: (m) => m.prompt_tokens },
    { label: t("stats.tokens_out"), cls: "series-b", value: (m) => m.completion_tokens },
  ]);
  latency(data);
  lines(document.getElementById("load-chart"), t("stats.load_chart"), minutes, [
    { label: t("stats.queue_depth"), cls: "series-warn", value: (m) => m.queue_depth },
    { label: t("stats.active"), cls: "series-a", value: (m) => m.active_sequences },
  ]);
  feedback(data);
}

async function refresh() {
  const banner = document.getElementById("banner");
  try {
    const response = await fetch("/stats.json", { cache: "no-store", credentials: "same-origin" });
    if (response.status === 401) {
      throw new Error(t("stats.needs_key"));
    }
    if (!response.ok) throw new Error(t("stats.status", { status: String(response.status) }));
    render(await response.json());
    banner.hidden = true;
    document.getElementById("updated").textContent = t("stats.updated", { time: new Date().toLocaleTimeString(language()) });
  } catch (error) {
    console.error(error);
    document.getElementById("banner-text").textContent = t("stats.load_failed", { error: error.message });
    banner.hidden = false;
  }
}

function schedule() {
  clearInterval(timer);
  timer = document.getElementById("auto-refresh").checked ? setInterval(refresh, REFRESH_MS) : null;
}

apply(preferred());
document.getElementById("auto-refresh").addEventListener("change", schedule);
refresh();
schedule();
let pending = null;
window.addEventListener("resize", () => {
  clearTimeout(pending);
  pending = setTimeout(() => last && render(last), 150);
});
