// Small inline-SVG charts and icons for the operator console: no library, no canvas, so every
// bar and point is an element a test (or a screen reader, through its <title>) can find.

const NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}
const title = (text) => svg("title", {}, text); // the tooltip; text only, never markup

// --- icons (24x24 strokes): emoji need a colour-emoji font that many systems lack ------------

const PATHS = {
  up: "M7 10v11H3V10h4zM7 10l4-8a3 3 0 0 1 3 3v4h6a2 2 0 0 1 2 2.3l-1.4 8A2 2 0 0 1 18.6 21H7",
  down: "M17 14V3h4v11h-4zM17 14l-4 8a3 3 0 0 1-3-3v-4H4a2 2 0 0 1-2-2.3l1.4-8A2 2 0 0 1 5.4 3H17",
  check: "M4 12.5l5 5L20 6.5",
  cross: "M6 6l12 12M18 6L6 18",
  clock: "M12 7v5l3 2M21 12a9 9 0 1 1-18 0 9 9 0 0 1 18 0z",
  skip: "M5 5l8 7-8 7zM17 5v14",
  pick: "M4 5h7v14H4zM13 5h7v14h-7zM15 12l2 2 3-4",
  edit: "M4 20h4L19 9l-4-4L4 16v4zM13.5 6.5l4 4",
};

/* An icon as an SVG element; `label` makes it an image with that name, else it is decoration. */
export function icon(name, label = "") {
  const attrs = { width: 16, height: 16, viewBox: "0 0 24 24", fill: "none",
    stroke: "currentColor", "stroke-width": 2, "stroke-linecap": "round",
    "stroke-linejoin": "round", class: `icon icon-${name}` };
  if (label) Object.assign(attrs, { role: "img", "aria-label": label });
  else attrs["aria-hidden"] = "true";
  return svg("svg", attrs, svg("path", { d: PATHS[name] }));
}

// --- charts ------------------------------------------------------------------------------------

const W = 640;
const H = 220;
const PAD = { left: 40, right: 12, top: 12, bottom: 28 };
const plotW = W - PAD.left - PAD.right;
const plotH = H - PAD.top - PAD.bottom;

function frame(label, yTicks, yFormat) {
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label,
    class: "svgchart", preserveAspectRatio: "xMidYMid meet" });
  for (const [value, y] of yTicks) {
    root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y, y2: y, class: "grid" }),
      svg("text", { x: PAD.left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, yFormat(value)));
  }
  return root;
}
/* Day labels under the x axis, thinned so they never overlap. */
function dayLabels(root, days, xOf) {
  const every = Math.ceil(days.length / 8);
  days.forEach((day, i) => {
    if ((days.length - 1 - i) % every) return; // keep today's label
    root.append(svg("text", { x: xOf(i), y: H - 8, "text-anchor": "middle", class: "tick" },
      day.slice(5)));
  });
}

/* Stacked bars, one per day. `days`: ["2026-12-01", ...]; `series`: [{name, color, values}]. */
export function barChart(label, days, series) {
  const totals = days.map((_, i) => series.reduce((n, s) => n + s.values[i], 0));
  const top = Math.max(4, ...totals);
  const y = (v) => PAD.top + plotH - (v / top) * plotH;
  const ticks = [0, Math.round(top / 2), top].map((v) => [v, y(v)]);
  const root = frame(label, ticks, String);
  const slot = plotW / days.length;
  const xOf = (i) => PAD.left + slot * (i + 0.5);
  days.forEach((day, i) => {
    let base = 0;
    const parts = series.filter((s) => s.values[i] > 0).map((s) => `${s.values[i]} ${s.name}`);
    const group = svg("g", { class: "day", "data-day": day },
      title(`${day}: ${parts.length ? parts.join(", ") : "nothing"}`));
    for (const s of series) {
      const v = s.values[i];
      if (!v) continue;
      group.append(svg("rect", { x: xOf(i) - slot * 0.35, width: slot * 0.7, y: y(base + v),
        height: y(base) - y(base + v), fill: s.color, "data-series": s.name }));
      base += v;
    }
    // An invisible full-height target, so the tooltip works on short bars too.
    group.append(svg("rect", { x: xOf(i) - slot / 2, width: slot, y: PAD.top, height: plotH,
      fill: "transparent" }));
    root.append(group);
  });
  dayLabels(root, days, xOf);
  return root;
}

/* Lines of rates (0..1) over days, one per series: [{name, color, points: [[dayIndex, rate,
   tooltip]]}]; a day without votes leaves a gap in its line. */
export function rateChart(label, days, series) {
  const y = (v) => PAD.top + plotH - v * plotH;
  const root = frame(label, [[0, y(0)], [0.5, y(0.5)], [1, y(1)]], (v) => `${v * 100}%`);
  const slot = plotW / days.length; // the bar chart's day slots, so the two line up
  const xOf = (i) => PAD.left + slot * (i + 0.5);
  for (const s of series) {
    const group = svg("g", { class: "series", "data-series": s.name });
    let run = [];
    const flush = () => {
      if (run.length > 1) {
        group.append(svg("polyline", { points: run.join(" "), fill: "none", stroke: s.color,
          "stroke-width": 2 }));
      }
      run = [];
    };
    const dots = [];
    let last = -2;
    for (const [i, rate, tip] of s.points) {
      if (i !== last + 1) flush();
      run.push(`${xOf(i)},${y(rate)}`);
      last = i;
      dots.push(svg("circle", { cx: xOf(i), cy: y(rate), r: 4, fill: s.color },
        title(`${s.name}, ${days[i]}: ${tip}`)));
    }
    flush();
    group.append(...dots); // above the lines
    root.append(group);
  }
  dayLabels(root, days, xOf);
  return root;
}

/* The always-valid interval of candidate − incumbent as a bar on a line of differences, beside
   the two thresholds the canary's rule compares it with: 0 (a right end below it rolls back)
   and −margin (a left end above it promotes). `tone`: "promote", "rollback" or "open";
   `difference` null: no point (an arm has no outcomes yet). */
export function intervalBar({ low, high, difference, margin, tone, label }) {
  const w = 640;
  const h = 100;
  const pad = 44;
  // Wide enough for the interval and both thresholds, with room on both sides.
  const span = Math.min(1, 1.15 * Math.max(0.05, Math.abs(low), Math.abs(high), 1.5 * margin));
  const x = (v) => pad + ((v + span) / (2 * span)) * (w - 2 * pad);
  const pts = (v) => `${v > 0 ? "+" : v < 0 ? "\u2212" : ""}${Math.abs(v * 100).toFixed(1)}`;
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": label,
    class: "svgchart interval", preserveAspectRatio: "xMidYMid meet" }, title(label));
  const axisY = 60;
  root.append(svg("line", { x1: pad, x2: w - pad, y1: axisY, y2: axisY, class: "axis" }));
  for (const v of [-span, -span / 2, span / 2, span]) {
    root.append(svg("line", { x1: x(v), x2: x(v), y1: axisY, y2: axisY + 4, class: "axis" }),
      svg("text", { x: x(v), y: axisY + 16, "text-anchor": "middle", class: "tick" },
        `${pts(v).replace(/\.0$/, "")} pts`));
  }
  root.append(
    svg("text", { x: pad, y: h - 4, class: "tick" }, "\u2190 candidate worse"),
    svg("text", { x: w - pad, y: h - 4, "text-anchor": "end", class: "tick" }, "candidate better \u2192"));
  const mark = (v, cls, text, y) => root.append(
    svg("line", { x1: x(v), x2: x(v), y1: 16, y2: axisY + 4, class: cls }),
    svg("text", { x: x(v), y, "text-anchor": v < 0 ? "end" : "start", dx: v < 0 ? -4 : 4,
      class: `tick ${cls}` }, text));
  if (margin > 0) mark(-margin, "threshold-margin", `\u2212margin (${pts(-margin)})`, 12);
  mark(0, "threshold-zero", margin > 0 ? "0" : "0 = \u2212margin", 12);
  const barY = 32;
  root.append(
    svg("rect", { x: x(low), width: Math.max(2, x(high) - x(low)), y: barY, height: 14, rx: 3,
      class: `bar tone-${tone}`, "data-low": low, "data-high": high }),
    difference === null ? "" : svg("circle", { cx: x(difference), cy: barY + 7, r: 5, class: "point" },
      title(`difference now ${pts(difference)} points`)),
    svg("text", { x: x(low), y: barY - 4, "text-anchor": "end", class: "tick end" }, pts(low)),
    svg("text", { x: x(high), y: barY - 4, "text-anchor": "start", class: "tick end" }, pts(high)));
  return root;
}
