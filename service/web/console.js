// prefloop operator console: plain ES module, no build step. It talks to /v1/operator/... with
// the operator's name (X-Operator, for the audit log) and, when set, their key
// (Authorization: Bearer), both kept in sessionStorage for this tab only. Charts: uPlot
// (vendored in /web/vendor, loaded as a global by console.html) for the live training and rate
// plots; the overview's charts and the icons are inline SVG (charts.js).

import { barChart, icon, intervalBar, rateChart } from "/web/charts.js";

const $ = (sel, root = document) => root.querySelector(sel);
const store = sessionStorage;
const POLL_MS = 1000;

// --- the API --------------------------------------------------------------------------------

function who() {
  return { operator: store.getItem("prefloop-console:operator") || "",
    key: store.getItem("prefloop-console:key") || "" };
}

async function api(path, { method = "GET", body, headers = {} } = {}) {
  const { operator, key } = who();
  const h = { ...headers };
  if (operator) h["X-Operator"] = operator;
  if (key) h.Authorization = `Bearer ${key}`;
  if (body !== undefined) h["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (_) {
    throw new Error("Cannot reach the service. Is it running? Check the address and try again.");
  }
  if (res.status === 401 || res.status === 403) {
    throw new Error("The service refused the operator key. Paste a valid operator key above and press Save.");
  }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = data.error || {};
    throw new Error(`${e.message || `HTTP ${res.status}`}${e.param ? ` (${e.param})` : ""}`);
  }
  return data;
}

function say(message) { $("#status").textContent = message; }
function fail(err) {
  const box = $("#error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}
/* Run an action; its error, if any, is shown in plain words. */
async function act(fn) {
  fail(null);
  try { return await fn(); } catch (err) { fail(err); return undefined; }
}

// --- small DOM helpers ------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") node.addEventListener("click", v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c); // text: never HTML
  return node;
}
const td = (content, cls) => el("td", cls ? { class: cls } : {}, content ?? "");
/* A table with nothing to show says what will appear there, and how to get it. */
function emptyRow(tbody, cols, sentence) {
  tbody.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: cols }, sentence)));
}
const filtered = (params) => [...params.keys()].some((k) => !["limit", "offset", "status"].includes(k));
function seconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}
const when = (t) => (t ? new Date(t).toLocaleString() : "");
const fmt = (x) => (typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(3)) : x ?? "\u2014");
function lastUser(prompt) {
  const users = (prompt || []).filter((m) => m.role === "user");
  return users.length ? users[users.length - 1].content : "";
}
function query(form) {
  const params = new URLSearchParams();
  for (const [k, v] of new FormData(form)) if (v !== "") params.set(k, v);
  return params;
}

// --- tabs -----------------------------------------------------------------------------------

const loaders = {};
let current = "overview";
function show(tab) {
  current = tab;
  for (const b of document.querySelectorAll("nav [role=tab]")) {
    b.setAttribute("aria-selected", String(b.dataset.tab === tab));
  }
  for (const s of document.querySelectorAll("[role=tabpanel]")) s.hidden = s.id !== `tab-${tab}`;
  act(loaders[tab]);
}
for (const b of document.querySelectorAll("nav [role=tab]")) b.addEventListener("click", () => show(b.dataset.tab));

// --- who is operating -----------------------------------------------------------------------

$("#operator").value = who().operator;
$("#key").value = who().key;
$("#who").addEventListener("submit", (e) => {
  e.preventDefault();
  store.setItem("prefloop-console:operator", $("#operator").value.trim());
  store.setItem("prefloop-console:key", $("#key").value.trim());
  act(loaders[current]).then(() => say(`Operating as ${$("#operator").value.trim() || "(no name)"}.`));
});

// --- feedback queue -------------------------------------------------------------------------

let feedbackOffset = 0;
function signal(fb) {
  const [name, text] = fb.type === "thumbs" ? (fb.value > 0 ? ["up", "up"] : ["down", "down"])
    : fb.type === "pick" ? ["pick", `pick: choice ${fb.value === 0 ? "A" : "B"}`]
      : ["edit", "ideal answer written"];
  return el("span", { class: `signal signal-${name}` }, icon(name), text);
}
/* The ideal-answer box grows with its text, so a long answer is read and written whole. */
function growing(area) {
  const fit = () => {
    area.style.height = "auto";
    area.style.height = `${area.scrollHeight + 2}px`;
  };
  area.addEventListener("input", fit);
  requestAnimationFrame(fit);
  return area;
}
/* An editor in a full-width row under `row`: the answer given beside the ideal one. */
function editorRow(row, { given, initial, save }) {
  if (row.nextElementSibling?.classList.contains("editor")) row.nextElementSibling.remove();
  const area = growing(el("textarea", { "aria-label": "The ideal answer", rows: 6 }, initial));
  const editor = el("tr", { class: "editor" });
  const done = el("button", { class: "primary", on: () => act(() => save(area.value, editor)) },
    "Save ideal answer");
  const cancel = el("button", { on: () => editor.remove() }, "Cancel");
  editor.append(el("td", { colspan: row.children.length }, el("div", { class: "editor-box" },
    el("div", {}, el("h4", {}, "The answer given"), el("div", { class: "given" }, given)),
    el("div", {}, el("h4", {}, "Your ideal answer"), area, el("p", { class: "buttons" }, done, " ", cancel)))));
  row.after(editor);
  area.focus();
}
function idealAnswerEditor(fb, cell) {
  editorRow(cell.parentElement, { given: fb.answer, initial: fb.answer, save: async (text, editor) => {
    await api("/v1/feedback", { method: "POST", body: { completion_id: fb.completion_id,
      type: "edit", text, choice_index: fb.choice_index },
    headers: { "Idempotency-Key": crypto.randomUUID() } });
    say("Ideal answer saved; it becomes a training pair at the next compile.");
    editor.remove();
    cell.replaceChildren("ideal answer saved");
  } });
}
async function loadFeedback(more = false) {
  const form = $("#feedback-filters");
  const params = query(form);
  for (const k of ["since", "until"]) { // dates from the picker: whole days, in UTC
    if (params.get(k)) params.set(k, `${params.get(k)}T00:00:00Z`);
  }
  feedbackOffset = more ? feedbackOffset + 50 : 0;
  params.set("limit", "50");
  params.set("offset", String(feedbackOffset));
  const list = await api(`/v1/operator/feedback?${params}`);
  const rows = list.data.map((fb) => {
    const actions = td("");
    if (fb.type === "thumbs") {
      actions.append(el("button", { on: () => idealAnswerEditor(fb, actions) }, "Write ideal answer"));
    } else if (fb.type === "edit") {
      actions.append(fb.text || "");
    }
    return el("tr", { "data-id": fb.id }, td(when(fb.updated_at)), td(signal(fb)), td(fb.segment),
      td(fb.adapter_version || "base"), td(fb.prompt, "text"), td(fb.answer, "text"),
      td(fb.comment || "", "text"), td(fb.user), actions);
  });
  if (more) $("#feedback-rows").append(...rows);
  else $("#feedback-rows").replaceChildren(...rows);
  if (!more && !rows.length) {
    emptyRow($("#feedback-rows"), 9, filtered(query(form))
      ? "No feedback matches these filters. Clear a filter to see more."
      : "No feedback yet. When people rate answers in the chat widget (thumbs up or down, a " +
        "comment, a pick between two answers), each vote appears here to review.");
  }
  $("#feedback-more").hidden = !list.has_more;
  $("#feedback-count").textContent = `${document.querySelectorAll("#feedback-rows tr[data-id]").length} feedback shown.`;
}
loaders.feedback = () => loadFeedback(false);
$("#feedback-filters").addEventListener("submit", (e) => { e.preventDefault(); act(loaders.feedback); });
$("#feedback-more").addEventListener("click", () => act(() => loadFeedback(true)));

// --- pair review ----------------------------------------------------------------------------

const selected = new Set();
function updateSelection() {
  $("#selected-count").textContent = `${selected.size} selected`;
  for (const b of document.querySelectorAll("[data-bulk]")) b.disabled = selected.size === 0;
}
async function pairAction(action, ids, text) {
  const result = await api("/v1/operator/pairs/actions", { method: "POST",
    body: { action, ids, ...(text === undefined ? {} : { text }) } });
  say(`${action}: ${result.data.length} pair(s) by ${result.actor}.`);
  selected.clear();
  await loaders.pairs();
}
function replaceEditor(pair, cell) {
  editorRow(cell.parentElement, { given: pair.chosen, initial: pair.chosen,
    save: (text) => pairAction("replace_chosen", [pair.id], text) });
}
loaders.pairs = async () => {
  const params = query($("#pair-filters"));
  params.set("limit", "200");
  const list = await api(`/v1/operator/pairs?${params}`);
  for (const id of [...selected]) if (!list.data.some((p) => p.id === id)) selected.delete(id);
  $("#pair-rows").replaceChildren(...list.data.map((p, i) => {
    const box = el("input", { type: "checkbox", "aria-label": `Select pair ${i + 1}`, "data-id": p.id });
    box.checked = selected.has(p.id);
    box.addEventListener("change", () => {
      if (box.checked) selected.add(p.id); else selected.delete(p.id);
      row.classList.toggle("selected", box.checked);
      updateSelection();
    });
    const actions = td("");
    if (p.status !== "used") {
      actions.append(
        el("button", { on: () => act(() => pairAction("approve", [p.id])) }, "Approve"), " ",
        el("button", { on: () => act(() => pairAction("exclude", [p.id])) }, "Exclude"), " ",
        el("button", { on: () => act(() => pairAction("flip", [p.id])) }, "Flip"));
      if (p.kind === "pair") {
        actions.append(" ", el("button", { on: () => replaceEditor(p, actions) }, "Write ideal answer"));
      }
    }
    const rejected = p.kind === "pair" ? p.rejected : `(unpaired: ${p.label ? "good" : "bad"})`;
    const row = el("tr", { "data-id": p.id }, td(box), td(lastUser(p.prompt), "text"),
      td(p.chosen, "text"), td(rejected, "text"), td(p.source),
      td(p.status + (p.excluded_reason ? ` (${p.excluded_reason})` : "")), actions);
    row.classList.toggle("selected", box.checked);
    return row;
  }));
  if (!list.data.length) {
    emptyRow($("#pair-rows"), 7, filtered(params) || ["approved", "excluded", "used"].includes(params.get("status"))
      ? "No pairs match these filters. Clear a filter, or choose another status."
      : "Nothing waits for review. Pairs appear here when feedback is compiled (press " +
        "\u201cCompile new pairs now\u201d, or wait for the next refresh): a regeneration, " +
        "two sibling votes, a pick or an ideal answer each make one.");
  }
  $("#select-all").checked = false;
  updateSelection();
  $("#pair-count").textContent = `${list.data.length} pair(s) shown.`;
};
$("#pair-filters").addEventListener("submit", (e) => { e.preventDefault(); act(loaders.pairs); });
$("#select-all").addEventListener("change", (e) => {
  for (const box of document.querySelectorAll("#pair-rows input[type=checkbox]")) {
    box.checked = e.target.checked;
    box.dispatchEvent(new Event("change"));
  }
});
for (const b of document.querySelectorAll("[data-bulk]")) {
  b.addEventListener("click", () => act(() => pairAction(b.dataset.bulk, [...selected])));
}
$("#compile").addEventListener("click", () => act(async () => {
  const s = await api("/v1/operator/pairs/compile", { method: "POST" });
  say(`Compiled: ${s.pairs} new pair(s), ${s.unpaired} unpaired, ${s.excluded} excluded.`);
  await loaders.pairs();
}));

// --- charts (uPlot) --------------------------------------------------------------------------

const COLORS = ["#d9480f", "#1c7ed6", "#2b8a3e", "#9c36b5", "#e67700", "#0b7285", "#c2255c"];
const charts = {};
function chart(name, container, series, data, yLabel, scales = { x: { time: false } }) {
  const width = Math.max(320, container.clientWidth - 4);
  if (charts[name]) charts[name].destroy();
  container.replaceChildren();
  charts[name] = new uPlot({
    width, height: 260,
    scales,
    series: [{ label: name === "rate" ? "time" : "step" },
      ...series.map((s, i) => ({ label: s, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
        points: { show: true, size: name === "rate" ? 10 : 6 } }))],
    axes: [{}, { label: yLabel }],
  }, data, container);
}

// --- runs -----------------------------------------------------------------------------------

let openRun = null;
let runTimer = null;
function runRow(r) {
  return el("tr", { "data-id": r.id }, td(r.id), td(r.segment), td(r.trigger), td(r.status),
    td(r.stage || ""), td(r.outcome || (r.error ? r.error.slice(0, 80) : "")), td(when(r.started_at || r.created_at)),
    td(el("button", { on: () => act(() => showRun(r.id)) }, "Show")));
}
let runsTimer = null;
loaders.runs = async () => {
  clearTimeout(runsTimer);
  // Live: runs started elsewhere (the schedule, another operator) show up by themselves.
  runsTimer = setTimeout(() => { if (current === "runs") act(loaders.runs); }, 3000);
  const list = await api("/v1/operator/runs?limit=20");
  $("#run-rows").replaceChildren(...list.data.map(runRow));
  if (!list.data.length) {
    emptyRow($("#run-rows"), 8, "No refresh has run yet. Press \u201cStart refresh\u201d above " +
      "(or let the schedule start one): it compiles the approved feedback, trains a candidate " +
      "adapter, evaluates it against the active version and lists it here.");
  }
  const live = list.data.find((r) => r.status === "queued" || r.status === "running");
  if (!openRun && live) await showRun(live.id);
};
$("#start-run").addEventListener("submit", (e) => {
  e.preventDefault();
  act(async () => {
    const run = await api("/v1/operator/runs", { method: "POST", body: { segment: new FormData(e.target).get("segment") } });
    say(`Refresh ${run.id} started.`);
    await loaders.runs();
    await showRun(run.id);
  });
});

function reportTable(report, verdict) {
  const cand = report.candidate || {};
  const inc = report.incumbent || {};
  const rows = [
    ["held-out pairs", (s) => s.pairs?.n], ["pair accuracy", (s) => s.pairs?.accuracy],
    ["reward margin", (s) => s.pairs?.margin],
    ["held-out thumbs (up/down)", (s) => (s.thumbs?.n ? `${s.thumbs.n_up}/${s.thumbs.n_down}` : undefined)],
    ["thumbs AUC (up above down)", (s) => s.thumbs?.auc], ["golden pass rate", (s) => s.golden?.pass_rate],
    ["golden passed", (s) => (s.golden?.n ? `${s.golden.passed}/${s.golden.n}` : undefined)],
    ["answer length ratio", (s) => s.drift?.length_ratio], ["repetition", (s) => s.drift?.repetition],
    ["KL from base (nats/token)", (s) => s.drift?.kl],
  ];
  const table = el("table", { class: "grid gate" }, el("thead", {}, el("tr", {}, el("th", {}, "metric"),
    el("th", {}, `candidate ${report.candidate_version || ""}`.trim()),
    el("th", {}, `active when gated: ${inc.version || "the base model"}`))),
  el("tbody", {}, ...rows.map(([name, get]) => el("tr", {}, td(name), td(fmt(get(cand))), td(fmt(get(inc)))))));
  const checks = el("ul", { class: "checks" }, ...((verdict && verdict.checks) || []).map((c) =>
    el("li", { class: c.passed ? "pass" : "fail" }, icon(c.passed ? "check" : "cross",
      c.passed ? "passed" : "failed"), ` ${c.detail}`)));
  const head = verdict ? el("p", { class: verdict.approved ? "pass" : "fail" },
    verdict.approved ? "The gate approved the candidate." : `The gate rejected it: ${verdict.reasons.join("; ")}`) : null;
  return el("div", {}, head, el("div", { class: "cols" }, table, checks));
}

function trainingData(c) {
  if (!c || c.train === undefined) return "";
  const n = (k) => c[k] || 0;
  const part = (pre) => `${n(pre + "pairs")} pairs, ${n(pre + "matched")} matched from thumbs, ` +
    `${n(pre + "thumbs_up")} thumbs up and ${n(pre + "thumbs_down")} down alone (KTO)`;
  return `Trained on ${part("")}; held out for the gate: ${part("heldout_")}.`;
}

// A run's steps as a timeline: what each did, in words and its key numbers.
const STEPS = {
  compile: ["Compile feedback", (d) => `${d.new_pairs ?? 0} new pairs, ${d.new_unpaired ?? 0} ` +
    `lone thumbs, ${d.excluded ?? 0} excluded by the quality gate`],
  select: ["Select training data", (d) => `${d.approved ?? 0} approved items: ${d.train ?? 0} ` +
    `to train on, ${d.heldout ?? 0} held out for the evaluation`],
  train: ["Train the adapter", (d) => (d.steps === undefined ? "" : `${d.steps} optimizer ` +
    `steps${d.processes > 1 ? ` on ${d.processes} processes` : ""}`)],
  register: ["Register the candidate", (d) => (d.version ? `candidate ${d.version}` : "")],
  evaluate: ["Evaluate beside the active version", (d) => (d.cached && d.cached.length
    ? `answers of ${d.cached.join(" and ")} reused from the cache` : "")],
  gate: ["Gate", (d) => (d.approved === undefined ? "" : d.approved ? "the candidate passed"
    : `rejected: ${(d.reasons || []).join("; ")}`)],
  promote: ["Promote", (d) => (d.version ? `${d.version} serves now` +
    `${d.replaced ? `, replacing ${d.replaced}` : ""}` : "")],
};
const STEP_STATE = {
  done: ["check", "done"], running: ["clock", "running"], failed: ["cross", "failed"],
  skipped: ["skip", "stopped here"],
};
function stepState(run, step, last) {
  if (step.seconds === null && (run.status === "running" || run.status === "queued")) return "running";
  if (!last) return "done";
  if (run.status === "skipped") return "skipped";
  if (run.status === "failed" || run.status === "cancelled") return "failed";
  return "done";
}
function stepItem(run, step, last) {
  const [label, facts] = STEPS[step.name] || [step.name, () => ""];
  const state = stepState(run, step, last);
  const [iconName, stateText] = STEP_STATE[state];
  const detail = step.detail || {};
  return el("li", { class: `step step-${state}`, "data-step": step.name },
    el("span", { class: "step-icon" }, icon(iconName, stateText)),
    el("div", { class: "step-body" },
      el("div", { class: "step-head" }, el("strong", {}, label),
        el("span", { class: "step-time" }, state === "running" ? "running\u2026" : seconds(step.seconds))),
      facts(detail) ? el("div", { class: "step-facts" }, facts(detail)) : null,
      Object.keys(detail).length ? el("details", { class: "raw" }, el("summary", {}, "raw"),
        el("pre", {}, JSON.stringify(detail, null, 2))) : null));
}
function runSteps(run) {
  if (!run.steps.length) {
    return [el("li", { class: "empty" }, "Waiting to start: the steps appear here as the run goes.")];
  }
  return run.steps.map((s, i) => stepItem(run, s, i === run.steps.length - 1));
}

/* Held-out prompts the evaluation answered with both versions, side by side. */
function samplesView(report, candidate) {
  const samples = report.samples;
  if (!samples || !samples.length) {
    return el("p", { class: "empty" }, samples ? "No held-out prompts to compare: this run kept " +
      "none of its data back. With more feedback a share is held out " +
      "(PREFLOOP_REFRESH_HELDOUT_FRACTION), and both versions' answers to it appear here."
      : "This evaluation kept no sample answers (it ran before they were recorded); the next " +
      "refresh shows the candidate's and the active version's answers here.");
  }
  const incumbent = (report.incumbent || {}).version || "the base model";
  return el("div", { class: "samples" }, ...samples.map((s, i) => el("article", { class: "sample" },
    el("h4", {}, `Prompt ${i + 1}`), el("p", { class: "prompt" }, lastUser(s.prompt)),
    el("div", { class: "side-by-side" },
      el("div", { class: "side side-candidate" }, el("h5", {}, `candidate ${candidate}`),
        el("div", { class: "answer" }, s.candidate || "(an empty answer)")),
      el("div", { class: "side side-incumbent" }, el("h5", {}, `active when gated: ${incumbent}`),
        el("div", { class: "answer" }, s.incumbent || "(an empty answer)"))),
    s.preferred ? el("p", { class: "said" }, el("strong", {}, "Users preferred: "), s.preferred) : null,
    s.disliked ? el("p", { class: "said" }, el("strong", {}, "Users disliked: "), s.disliked) : null)));
}

async function showRun(id) {
  openRun = id;
  clearTimeout(runTimer);
  const run = await api(`/v1/operator/runs/${encodeURIComponent(id)}`);
  if (openRun !== id) return;
  $("#run-detail").hidden = false;
  $("#run-title").textContent = `Run ${run.id} (${run.segment})`;
  $("#run-summary").textContent = `Status: ${run.status}${run.stage ? `, stage ${run.stage}` : ""}` +
    `${run.outcome ? `, outcome ${run.outcome}` : ""}${run.candidate_version ? `, candidate ${run.candidate_version}` : ""}` +
    `${run.error ? ` \u2014 ${run.error}` : ""}`;
  $("#run-data").textContent = trainingData(run.counts);
  const p = run.progress || {};
  $("#run-progress").max = p.total || 1;
  $("#run-progress").value = p.step || 0;
  $("#run-progress-text").textContent = p.total
    ? `training step ${p.step}/${p.total}, loss ${fmt(p.loss)}, margin ${fmt(p.margin)}` +
      (p.kto_gap === undefined ? "" : `, thumbs reward gap ${fmt(p.kto_gap)}`) : "not training yet";
  $("#run-steps").replaceChildren(...runSteps(run));
  const history = p.history || [];
  if (history.length) {
    // The thumbs reward gap (mean reward of thumbs-up answers minus thumbs-down ones), where
    // the run trains on lone thumbs beside pairs.
    const gap = history.some((h) => h[3] !== null && h[3] !== undefined);
    chart("run", $("#run-chart"), ["loss", "reward margin", ...(gap ? ["thumbs reward gap"] : [])],
      [history.map((h) => h[0]), history.map((h) => h[1]), history.map((h) => h[2]),
        ...(gap ? [history.map((h) => h[3] ?? null)] : [])], "value");
  } else {
    if (charts.run) { charts.run.destroy(); delete charts.run; }
    $("#run-chart").replaceChildren(el("p", {}, "No training steps yet."));
  }
  const log = $("#run-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = run.log || "";
  if (atEnd) log.scrollTop = log.scrollHeight;
  if (run.candidate_version) {
    const version = await api(`/v1/operator/adapters/${encodeURIComponent(run.candidate_version)}`);
    const report = version.eval_report;
    $("#run-gate").replaceChildren(report
      ? reportTable({ ...report, candidate_version: version.id }, version.verdict)
      : el("p", { class: "empty" }, "Not evaluated yet: the gate's numbers appear here after the evaluate step."));
    $("#run-samples").replaceChildren(report ? samplesView(report, version.id)
      : el("p", { class: "empty" }, "After the evaluate step, the candidate's and the active " +
        "version's answers to held-out prompts appear here side by side."));
  } else {
    const none = run.status === "queued" || run.status === "running"
      ? "No candidate yet: it appears once training is done."
      : "This run made no candidate, so there is nothing to compare.";
    $("#run-gate").replaceChildren(el("p", { class: "empty" }, none));
    $("#run-samples").replaceChildren();
  }
  const live = run.status === "queued" || run.status === "running";
  if (live) {
    runTimer = setTimeout(() => act(() => (current === "runs" && openRun === id ? showRun(id) : null)), POLL_MS);
  }
  // Keep the list's status in step with the detail.
  const row = $(`#run-rows tr[data-id="${CSS.escape(run.id)}"]`);
  if (row) row.replaceWith(runRow(run));
  else await loaders.runs();
}

// --- adapters -------------------------------------------------------------------------------

function confirmAndDo(question, fn) {
  if (!window.confirm(question)) { say("Cancelled."); return; }
  act(fn);
}
async function transition(version, action, body = {}) {
  const row = await api(`/v1/operator/adapters/${encodeURIComponent(version)}/${action}`, { method: "POST", body });
  say(`${row.id} is now ${row.status}.`);
  await loaders.adapters();
}
let adapterTimer = null;
loaders.adapters = async () => {
  clearTimeout(adapterTimer);
  // Live: a promotion reaches serving once the replica has loaded the version.
  adapterTimer = setTimeout(() => { if (current === "adapters") act(loaders.adapters); }, 2000);
  if ($("#adapter-rows .canary-form")) return; // a half-filled form is never redrawn away
  const list = await api("/v1/operator/adapters?limit=200");
  const serving = Object.entries(list.serving || {});
  $("#serving").textContent = `Serving: ${serving.length ? serving.map(([s, v]) => `${s} \u2192 ${v}`).join(", ") : "the base model"}` +
    `${Object.keys(list.load_errors || {}).length ? ` \u2014 load errors: ${JSON.stringify(list.load_errors)}` : ""}`;
  $("#adapter-rows").replaceChildren(...list.data.map((a) => {
    const actions = td("");
    const btn = (label, fn) => actions.append(el("button", { on: fn }, label), " ");
    if (a.status === "candidate") btn("Approve", () => act(() => transition(a.id, "approve")));
    if (a.status === "candidate" || a.status === "approved") {
      btn("Reject", () => confirmAndDo(`Reject ${a.id}? It can never be promoted afterwards.`, () => transition(a.id, "reject")));
    }
    if (a.status === "approved") btn("Start canary", () => canaryForm(a, list.data, actions));
    if (a.status === "approved" || a.status === "retired") {
      btn("Promote", () => confirmAndDo(`Promote ${a.id}? Every replica serves it within a second.`,
        () => transition(a.id, "promote", { reason: "promoted from the console" })));
    }
    if (a.status === "active") {
      btn("Roll back", () => confirmAndDo(`Roll back segment ${a.segment}? ${a.id} is retired and its predecessor serves again.`,
        async () => {
          const r = await api("/v1/operator/adapters/rollback", { method: "POST",
            body: { segment: a.segment, reason: "rolled back from the console" } });
          say(`Segment ${r.segment} now serves ${r.active || "the base model"}.`);
          await loaders.adapters();
        }));
    }
    btn("Details", () => act(() => showAdapter(a.id)));
    const gate = a.verdict ? (a.verdict.approved ? "approved" : `rejected: ${a.verdict.reasons.join("; ")}`) : "";
    return el("tr", { "data-id": a.id }, td(a.id), td(a.status, `status-${a.status}`), td(when(a.created_at)),
      td(when(a.promoted_at)), td(gate, "text"), actions);
  }));
  if (!list.data.length) {
    emptyRow($("#adapter-rows"), 6, "No adapter versions yet: the base model answers every chat. " +
      "A refresh (the Runs tab) trains one from approved feedback and lists it here as a " +
      "candidate; you can also upload one (POST /v1/operator/adapters/upload).");
  }
  $("#adapter-count").textContent = `${list.data.length} version(s).`;
};
/* The "Start canary" form, in a full-width row under the version: the share of users and the
   margin, against the active version shown (sent as expect_incumbent: if another version
   became active meanwhile, the service refuses with a 409 instead of comparing the wrong pair). */
function canaryForm(a, versions, cell) {
  const row = cell.parentElement;
  if (row.nextElementSibling?.classList.contains("editor")) row.nextElementSibling.remove();
  const active = versions.find((v) => v.segment === a.segment && v.status === "active");
  const incumbent = active ? active.id : "base";
  const share = el("input", { type: "number", name: "share", min: 1, max: 99, step: 1, value: 10, required: true });
  const margin = el("input", { type: "number", name: "margin", min: 0, max: 99, step: 0.5, placeholder: "the service's default" });
  const form = el("form", { class: "filters canary-form", "aria-label": `Start a canary of ${a.id}` },
    el("label", {}, "Share of users (%)", share),
    el("label", {}, "Margin (points it may be worse by)", margin),
    el("span", { class: "count" }, `${a.id} against ${active ? `${active.id}, the active version` : "the base model (no active version)"}`),
    el("button", { type: "submit", class: "primary" }, "Start canary"),
    el("button", { type: "button", on: () => editor.remove() }, "Cancel"));
  const editor = el("tr", { class: "editor" }, el("td", { colspan: row.children.length }, form));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    act(async () => {
      const body = { candidate: a.id, share: Number(share.value) / 100, expect_incumbent: incumbent };
      if (margin.value !== "") body.policy = { margin: Number(margin.value) / 100 };
      const exp = await api("/v1/operator/experiments", { method: "POST", body });
      say(`Canary ${exp.id} started: ${exp.candidate} on ${pct(exp.share)} of ${exp.segment}'s users.`);
      editor.remove();
      openExperiment(exp.id);
    });
  });
  row.after(editor);
  share.focus();
}
async function showAdapter(id) {
  const a = await api(`/v1/operator/adapters/${encodeURIComponent(id)}`);
  $("#adapter-detail").hidden = false;
  $("#adapter-title").textContent = `${a.id} (${a.status})`;
  $("#adapter-report").replaceChildren(a.eval_report
    ? reportTable({ ...a.eval_report, candidate_version: a.id }, a.verdict) : el("p", {}, "Not evaluated."));
  $("#adapter-events").replaceChildren(...a.events.map((e) => el("li", {},
    `${when(e.created_at)}: ${e.from_status || "new"} \u2192 ${e.to_status} by ${e.actor}${e.reason ? ` (${e.reason})` : ""}`)));
}

// --- live canary experiments ----------------------------------------------------------------

/* A confirmation dialog with an optional reason: resolves to the reason ("" when none), or null
   when the operator cancels. */
function ask(question, detail) {
  const dialog = $("#confirm");
  $("#confirm-question").textContent = question;
  $("#confirm-detail").textContent = detail;
  $("#confirm-reason").value = "";
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok" ? $("#confirm-reason").value.trim() : null);
    }, { once: true });
  });
}

const pct = (x) => `${Math.round(x * 1000) / 10}%`;
const pts = (x) => `${x > 0 ? "+" : x < 0 ? "\u2212" : ""}${Math.abs(x * 100).toFixed(1)} points`;
const versionName = (v) => v || "the base model";
function hours(h) {
  if (h < 1) return `${Math.round(h * 60)} min`;
  return `${h < 10 ? h.toFixed(1) : Math.round(h)} h`;
}
const EXP_STATUS = {
  running: ["clock", "running"], promoted: ["check", "promoted"],
  rolled_back: ["cross", "rolled back"], stopped: ["skip", "stopped"],
};
const ENDS = {
  stop: ["Stop", "the incumbent keeps serving everyone; the candidate stays approved, not promoted."],
  promote: ["Promote now", "the candidate serves everyone in the segment from now on, whatever the test says so far."],
  rollback: ["Roll back", "the candidate is rejected (it can never be promoted) and the incumbent serves everyone."],
};

/* The decision so far in words: what the interval says, against which threshold. */
function decisionWords(exp) {
  const d = exp.decision;
  const p = exp.policy;
  const [lo, hi] = d.interval;
  const [nc, ni] = d.outcomes;
  if (Math.min(nc, ni) < p.min_outcomes && d.action === "continue") {
    return `Waiting for evidence: the test decides once each arm has ${p.min_outcomes} outcomes ` +
      `(thumbs or regenerations); the candidate has ${nc}, the incumbent ${ni}.`;
  }
  const range = `the interval of the difference runs from ${pts(lo)} to ${pts(hi)}`;
  const next = " The decision loop acts on it at its next look.";
  if (d.action === "promote") {
    return `Promote: ${range}; its lower end is above \u2212margin (${pts(-p.margin)}), so the ` +
      `candidate is at least as good as the incumbent, within the margin.${next}`;
  }
  if (d.action === "rollback") {
    return `Roll back: ${range}; its upper end is below 0, so the candidate is worse.${next}`;
  }
  if (d.action === "stop") return `Stop without a decision: ${range}, and a limit was reached; the incumbent stays.${next}`;
  const reach = p.margin ? `below \u2212margin (${pts(-p.margin)}) and above 0` : "both below and above 0";
  return `Still running: ${range}, so it still reaches ${reach}. It promotes when the lower ` +
    "end rises above \u2212margin, and rolls back when the upper end falls below 0; more feedback narrows it.";
}

function armTable(exp) {
  const head = ["Arm", "Version", "Answers", "Thumbs up", "Thumbs down", "Regenerated", "Rate"];
  return el("table", { class: "grid arms" }, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...exp.arms.map((a) => el("tr", { "data-arm": a.arm }, td(a.arm),
      td(versionName(a.version)), td(a.answers, "num"), td(a.up, "num"), td(a.down, "num"),
      td(a.regenerated, "num"), td(a.up + a.down + a.regenerated ? pct(a.rate) : "\u2014", "num")))));
}

function policyFacts(exp) {
  const p = exp.policy;
  const fact = (name, value) => [el("dt", {}, name), el("dd", {}, value)];
  const elapsed = el("progress", { max: p.max_hours, value: Math.min(exp.elapsed_hours, p.max_hours),
    "aria-label": "Elapsed time of the longest allowed" });
  return el("dl", { class: "policy" },
    ...fact("Margin", p.margin ? `${(p.margin * 100).toFixed(1)} points (promote if worse by less)`
      : "0 (promote only when the candidate is better)"),
    ...fact("Alpha", `${p.alpha} (the interval holds with ${pct(1 - p.alpha)}, however often it looks)`),
    ...fact("Outcomes per arm", `at least ${p.min_outcomes} before deciding, at most ${p.max_outcomes}`),
    ...fact("Elapsed", el("span", {}, `${hours(exp.elapsed_hours)} of at most ${hours(p.max_hours)} `, elapsed)));
}

function endButtons(exp) {
  const ended = exp.status !== "running";
  return el("p", { class: "buttons exp-actions" }, ...Object.entries(ENDS).flatMap(([action, [label, what]]) => [
    el("button", { type: "button", disabled: ended, "data-action": action,
      title: ended ? "This experiment has ended." : undefined,
      on: () => endExperiment(exp, action, label, what) }, label), " "]));
}

function experimentCard(exp) {
  const [iconName, statusText] = EXP_STATUS[exp.status];
  const d = exp.decision;
  const tone = d.action === "promote" ? "promote" : d.action === "rollback" ? "rollback" : "open";
  const measured = Math.min(...d.outcomes) > 0; // a rate needs outcomes on both arms
  const bar = intervalBar({ low: d.interval[0], high: d.interval[1], difference: measured ? d.difference : null,
    margin: exp.policy.margin, tone,
    label: `Always-valid interval of candidate minus incumbent: ${pts(d.interval[0])} to ${pts(d.interval[1])}` });
  const ended = exp.status !== "running";
  const verdict = ended
    ? el("p", { class: "exp-ended" }, el("strong", {}, `Ended ${when(exp.ended_at)}, ${statusText}` +
      // a hand-made end's reason names the operator already ("stop by olga: ...")
      `${(exp.reason || "").includes(`by ${exp.ended_by}`) ? "" : ` by ${exp.ended_by}`}: `), exp.reason || "")
    : el("p", { class: "exp-decision" }, el("strong", {}, "Decision so far: "), decisionWords(exp));
  return el("article", { class: `exp-card exp-${exp.status}`, "data-id": exp.id },
    el("header", { class: "exp-head" },
      el("h2", {}, `Canary on ${exp.segment}: ${exp.candidate} vs ${versionName(exp.incumbent)}`),
      el("span", { class: `exp-status exp-status-${exp.status}` }, icon(iconName), statusText)),
    el("p", { class: "count" }, `${exp.id} \u00b7 ${pct(exp.share)} of the segment's users get the ` +
      `candidate \u00b7 started ${when(exp.started_at)} by ${exp.created_by}`),
    el("div", { class: "cols" }, el("div", {}, el("h3", {}, "Per arm"), armTable(exp)),
      el("div", {}, el("h3", {}, "Difference in rate (candidate \u2212 incumbent)"), bar,
        el("p", { class: "legend" }, measured ? `now ${pts(d.difference)}: candidate ` +
          `${pct(d.candidate_rate)}, incumbent ${pct(d.incumbent_rate)}`
          : "No difference yet: each arm needs rated or regenerated answers."))),
    verdict,
    ended ? el("p", { class: "legend" }, `The test on the counts up to the end: ${d.reason}`)
      : el("p", { class: "legend" }, `The test's words: ${d.reason}`),
    policyFacts(exp), endButtons(exp));
}

let openExp = null; // an ended experiment the operator asked to see
let expTimer = null;
const EXP_POLL_MS = 3000;
async function endExperiment(exp, action, label, what) {
  const reason = await ask(`${label}: ${exp.candidate} on ${exp.segment}?`, `If you confirm, ${what}`);
  if (reason === null) { say("Cancelled."); return; }
  await act(async () => {
    const ended = await api(`/v1/operator/experiments/${encodeURIComponent(exp.id)}/${action}`,
      { method: "POST", body: reason ? { reason } : {} });
    say(`${ended.id} ended: ${EXP_STATUS[ended.status][1]}.`);
    openExp = ended.id;
    await loaders.experiments();
  });
}

function expRow(e) {
  return el("tr", { "data-id": e.id }, td(e.id), td(e.segment),
    td(`${e.candidate} vs ${versionName(e.incumbent)}`), td(pct(e.share)),
    td(el("span", { class: `exp-status exp-status-${e.status}` }, icon(EXP_STATUS[e.status][0]), EXP_STATUS[e.status][1])),
    td(when(e.started_at)), td(when(e.ended_at)),
    td(el("button", { on: () => { openExp = e.id; act(loaders.experiments); } }, "Show")));
}

const CANARY_HELP = "A canary proves an approved adapter version on live traffic before it " +
  "serves everyone: a sticky share of a segment's users get the candidate, the rest keep the " +
  "active version, and a sequential test on their thumbs and regenerations promotes it, rolls " +
  "it back, or stops. Start one with the \u201cStart canary\u201d button on an approved version " +
  "in the Adapters tab, or set PREFLOOP_CANARY_SHARE (e.g. 0.1) so that each refresh whose " +
  "candidate passes the gate starts one instead of promoting it.";

loaders.experiments = async () => {
  clearTimeout(expTimer);
  const list = await api("/v1/operator/experiments?limit=50");
  const shown = list.data.filter((e) => e.status === "running" || e.id === openExp);
  // The running ones first; then the one the operator opened.
  const details = await Promise.all(shown.map((e) => api(`/v1/operator/experiments/${encodeURIComponent(e.id)}`)));
  if (!$("#confirm").open) { // never swap the buttons under an open dialog
    $("#exp-cards").replaceChildren(...details.map(experimentCard));
    if (!list.data.length) {
      $("#exp-cards").replaceChildren(el("div", { class: "panel exp-empty" },
        el("h3", {}, "No canary experiment yet"), el("p", {}, CANARY_HELP)));
    } else if (!details.length) {
      $("#exp-cards").replaceChildren(emptyNote("No canary is running now. Press \u201cShow\u201d " +
        "below to see how an earlier one ended, or start one on an approved version in the Adapters tab."));
    }
    $("#exp-rows").replaceChildren(...list.data.map(expRow));
    if (!list.data.length) emptyRow($("#exp-rows"), 8, "No experiments yet: each canary you start is listed here, running or ended.");
  }
  const running = list.data.some((e) => e.status === "running");
  $("#exp-refreshed").textContent = `Updated ${new Date().toLocaleTimeString()}` +
    (running ? `; refreshing every ${EXP_POLL_MS / 1000} s while one runs.` : ".");
  // Live: the arms' counts, the interval and the decision move while one runs.
  expTimer = setTimeout(() => { if (current === "experiments") act(loaders.experiments); },
    running ? EXP_POLL_MS : 10000);
};
function openExperiment(id) {
  openExp = id;
  show("experiments");
}

// --- thumbs-up rate per version over time ------------------------------------------------------

let rateTimer = null;
loaders.rate = async () => {
  clearTimeout(rateTimer);
  const form = $("#rate-filters");
  const f = new FormData(form);
  const params = new URLSearchParams({ bucket_seconds: f.get("bucket_seconds") });
  if (f.get("segment")) params.set("segment", f.get("segment"));
  params.set("since", new Date(Date.now() - Number(f.get("days")) * 86400e3).toISOString());
  const stats = await api(`/v1/operator/stats/thumbs?${params}`);
  const xs = [...new Set(stats.data.flatMap((s) => s.points.map((p) => Date.parse(p.t) / 1000)))].sort((a, b) => a - b);
  if (xs.length) {
    const ys = stats.data.map((s) => {
      const byT = new Map(s.points.map((p) => [Date.parse(p.t) / 1000, p.rate]));
      return xs.map((x) => (byT.has(x) ? byT.get(x) : null));
    });
    // The x range pads the buckets by one on each side, so a single bucket still reads as a
    // moment in time; rates are shown on their whole 0..1 range.
    const pad = stats.bucket_seconds;
    chart("rate", $("#rate-chart"), stats.data.map((s) => s.version), [xs, ...ys], "thumbs-up rate", {
      x: { time: true, auto: false, range: [xs[0] - pad, xs[xs.length - 1] + pad] },
      y: { auto: false, range: [0, 1] },
    });
  } else {
    if (charts.rate) { charts.rate.destroy(); delete charts.rate; }
    $("#rate-chart").replaceChildren(el("p", { class: "empty" }, "No thumbs in this period. " +
      "When people rate answers, each adapter version's thumbs-up rate appears here over time."));
  }
  $("#rate-rows").replaceChildren(...stats.data.map((s) => {
    const up = s.points.reduce((n, p) => n + p.up, 0);
    const down = s.points.reduce((n, p) => n + p.down, 0);
    return el("tr", {}, td(s.version), td(up), td(down), td(fmt(up / (up + down))));
  }));
  // Live: new votes show up while the tab is open.
  rateTimer = setTimeout(() => { if (current === "rate") act(loaders.rate); }, 5000);
};
$("#rate-filters").addEventListener("submit", (e) => { e.preventDefault(); act(loaders.rate); });

// --- overview: the landing page ------------------------------------------------------------------

const OVERVIEW_DAYS = 14;
const KINDS = [["thumbs_up", "thumbs up", "#2b8a3e"], ["thumbs_down", "thumbs down", "#c92a2a"],
  ["picks", "picks", "#1c7ed6"], ["edits", "ideal answers", "#9c36b5"]];
const swatch = (color) => el("span", { class: "swatch", style: `background:${color}` });
const emptyNote = (text) => el("p", { class: "empty" }, text);

function overviewFeedback(o) {
  const days = o.feedback_per_day.map((d) => d.day);
  const sums = KINDS.map(([k]) => o.feedback_per_day.reduce((n, d) => n + d[k], 0));
  const total = sums.reduce((a, b) => a + b, 0);
  $("#ov-feedback-total").textContent = String(total);
  $("#ov-feedback-split").textContent = KINDS.map(([, name], i) => `${sums[i]} ${name}`).join(", ");
  if (!total) {
    $("#ov-volume").replaceChildren(emptyNote("No feedback yet. When people rate answers in " +
      "the chat widget (thumbs, a pick between two answers) or an operator writes an ideal " +
      "answer, each day's count appears here."));
    $("#ov-volume-legend").replaceChildren();
  } else {
    const series = KINDS.map(([k, name, color]) => ({ name, color, values: o.feedback_per_day.map((d) => d[k]) }));
    $("#ov-volume").replaceChildren(barChart("Feedback per day", days, series));
    $("#ov-volume-legend").replaceChildren(...KINDS.flatMap(([, name, color]) => [swatch(color), name, " "]));
  }
  const index = new Map(days.map((d, i) => [d, i]));
  const series = o.thumbs_rate.map((s, i) => ({ name: s.version, color: COLORS[i % COLORS.length],
    points: s.points.map((p) => [index.get(p.t.slice(0, 10)), p.rate,
      `${Math.round(p.rate * 100)}% of ${p.up + p.down} (${p.up} up, ${p.down} down)`]) }));
  if (!series.length) {
    $("#ov-rate").replaceChildren(emptyNote("No thumbs in these days yet. Once people rate " +
      "answers, each adapter version's share of thumbs-up appears here, one line per version " +
      "(base: the model without an adapter)."));
    $("#ov-rate-legend").replaceChildren();
    return;
  }
  $("#ov-rate").replaceChildren(rateChart("Thumbs-up rate per adapter version", days, series));
  $("#ov-rate-legend").replaceChildren(...o.thumbs_rate.flatMap((s, i) => {
    const up = s.points.reduce((n, p) => n + p.up, 0);
    const all = s.points.reduce((n, p) => n + p.up + p.down, 0);
    return [swatch(COLORS[i % COLORS.length]), `${s.version}: ${Math.round((100 * up) / all)}% of ${all}`, " "];
  }));
}

function overviewPending(o) {
  const n = o.pending_pairs + o.pending_unpaired;
  $("#ov-pending-count").textContent = String(n);
  $("#ov-pending-text").textContent = n
    ? `${o.pending_pairs} pair(s) and ${o.pending_unpaired} lone thumbs wait for an operator's ` +
      "approval before they can train an adapter."
    : "Nothing waits for review. When the service asks operators to approve training data, " +
      "newly compiled pairs appear here (Pairs tab: \u201cCompile new pairs now\u201d).";
  $("#ov-review").hidden = !n;
}

const VERDICT = {
  promoted: (r) => `${r.candidate_version} passed the gate and serves now.`,
  approved: (r) => `${r.candidate_version} passed the gate; it waits for an operator to promote it.`,
  rejected: (r) => `The gate rejected ${r.candidate_version}: ${((r.verdict || {}).reasons || []).join("; ")}.`,
};
function overviewRun(o) {
  const r = o.last_run;
  $("#ov-run-open").hidden = !r;
  if (!r) {
    $("#ov-run-status").textContent = "none yet";
    $("#ov-run-text").textContent = "No refresh has run yet. Start one on the Runs tab, or " +
      "let the schedule start one; its verdict appears here.";
    return;
  }
  const live = r.status === "queued" || r.status === "running";
  const [name, label] = live ? ["clock", "running"] : r.status === "succeeded" ? ["check", "succeeded"]
    : r.status === "skipped" ? ["skip", "skipped"] : ["cross", r.status];
  $("#ov-run-status").replaceChildren(icon(name), r.outcome || label);
  $("#ov-run-status").className = `big run-${r.outcome || r.status}`;
  const verdict = live ? `Running${r.stage ? `: ${r.stage}` : ""}.`
    : VERDICT[r.outcome] ? VERDICT[r.outcome](r) : `${r.error || r.status}`;
  const at = live ? `started ${when(r.started_at || r.created_at)}` : `finished ${when(r.finished_at)}`;
  $("#ov-run-text").textContent = `${verdict} (${r.segment}, ${at})`;
  $("#ov-run-open").onclick = () => { show("runs"); act(() => showRun(r.id)); };
}

/* One small line per running canary, with a link to its live view; no card when none runs. */
function overviewCanary(running) {
  $("#ov-canary").hidden = !running.length;
  $("#ov-canary-status").replaceChildren(icon("clock"), running.length > 1 ? `${running.length} running` : "running");
  $("#ov-canary-lines").replaceChildren(...running.map((e) => el("p", { class: "ov-canary-line", "data-id": e.id },
    `${e.candidate} vs ${versionName(e.incumbent)} on ${pct(e.share)} of ${e.segment}, since ${when(e.started_at)}. `,
    el("a", { href: "#experiments", on: (ev) => { ev.preventDefault(); openExperiment(e.id); } }, "Show the experiment"))));
}

let overviewTimer = null;
loaders.overview = async () => {
  clearTimeout(overviewTimer);
  // Live: new votes and a finishing refresh show up while the page is open.
  overviewTimer = setTimeout(() => { if (current === "overview") act(loaders.overview); }, 10000);
  const [o, canaries] = await Promise.all([api(`/v1/operator/overview?days=${OVERVIEW_DAYS}`),
    api("/v1/operator/experiments?status=running&limit=20")]);
  overviewFeedback(o);
  overviewPending(o);
  overviewRun(o);
  overviewCanary(canaries.data);
  $("#ov-refreshed").textContent = `Updated ${new Date().toLocaleTimeString()}; the last ` +
    `${o.days} days (UTC).`;
};
$("#ov-review").addEventListener("click", () => {
  $("#pair-filters").elements.status.value = "pending";
  show("pairs");
});

// --- start ----------------------------------------------------------------------------------

if (!who().operator) say("Type your name (and your operator key, if the service asks for one), then Save.");
show("overview");
