/* prefloop chat widget: one <script> tag embeds a chat bubble in any page.

   <script src="https://chat.example.com/widget.js"
           data-api-base="https://chat.example.com"  (default: where this script came from)
           data-key="pk_..."                          (optional: sent as Authorization: Bearer)
           data-segment="support"></script>           (optional: the adapter line, sent as `model`)

   Answers stream over SSE from /v1/chat/completions; thumbs, comments, regenerations and
   "which is better?" picks go to /v1/feedback. The conversation is kept in localStorage, so it
   survives reloads. Everything lives in a shadow root, so the page's styles and the widget's
   don't mix. Model output is never trusted: a small Markdown subset is turned into DOM nodes
   whose text is always set as text, never parsed as HTML (see `markdown`). */
(() => {
  "use strict";
  const script = document.currentScript;
  if (!script) return;
  const data = script.dataset;
  const base = (data.apiBase || new URL(script.src, location.href).origin).replace(/\/+$/, "");
  const segment = data.segment || "";
  const key = data.key || "";
  const storeKey = `prefloop-widget:${base}:${segment}`;

  // --- state, kept across reloads -------------------------------------------------------------

  function randomId() {
    return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`.slice(2);
  }
  function load() {
    try {
      const saved = JSON.parse(localStorage.getItem(storeKey) || "null");
      if (saved && Array.isArray(saved.turns)) return saved;
    } catch (_) { /* a damaged entry: start over */ }
    return { user: `widget-${randomId()}`, conversation_id: null, turns: [], open: false };
  }
  let state = load();
  function save() {
    try { localStorage.setItem(storeKey, JSON.stringify(state)); } catch (_) { /* full or off */ }
  }
  let compareEvery = 0; // the service says how often to ask for a comparison
  let busy = false;

  // --- Markdown, safely: DOM nodes built from the text, never HTML parsed ------------------
  //
  // Model output is untrusted: every piece of it lands in a text node, so `<img onerror=...>`
  // shows as text. Supported: ``` fences and 4-space indented code (whitespace kept), inline
  // `code`, **bold**, *italic* / _italic_, [links](https://...) (http and https only), "-",
  // "*" and "1." lists, "#" headings (shown bold) and paragraphs (single newlines kept).

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const ITEM = /^ {0,3}([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const INDENTED = /^( {4}|\t)/;
  const INLINE = new RegExp([
    "`([^`\\n]+)`", // 1: code
    "\\[([^\\]\\n]+)\\]\\((https?:\\/\\/[^\\s()]+)\\)", // 2, 3: link text, address
    "\\*\\*(?=\\S)([^\\n]*?\\S)\\*\\*", // 4: bold
    "(?<![\\w*])\\*(?=[^\\s*])([^*\\n]*?[^\\s*])\\*(?![\\w*])", // 5: italic
    "(?<!\\w)_(?=[^\\s_])([^_\\n]*?[^\\s_])_(?!\\w)", // 6: italic
  ].join("|"), "g");

  function safeUrl(href) {
    try {
      const url = new URL(href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (_) { return null; }
  }
  /* Inline Markdown of one line of text, as nodes. */
  function inline(text) {
    const out = [];
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) out.push(text.slice(last, m.index));
      last = m.index + m[0].length;
      const href = m[3] && safeUrl(m[3]);
      if (m[1] !== undefined) out.push(el("code", {}, m[1]));
      else if (m[2] !== undefined && !href) out.push(m[0]);
      else if (m[2] !== undefined) {
        out.push(el("a", { href, target: "_blank", rel: "noopener noreferrer nofollow" },
          ...inline(m[2])));
      } else if (m[4] !== undefined) out.push(el("strong", {}, ...inline(m[4])));
      else out.push(el("em", {}, ...inline(m[5] ?? m[6])));
    }
    if (last < text.length) out.push(text.slice(last));
    return out;
  }
  /* Lines joined with <br>: a chat answer's single newlines are meant. */
  function lines(list) {
    return list.flatMap((line, i) => (i ? [el("br"), ...inline(line)] : inline(line)));
  }
  function codeBlock(text, lang) {
    const code = el("code", lang ? { "data-lang": lang } : {}, text);
    return el("pre", {}, code);
  }
  /* One block starting at src[i]: [node, the index after it]. */
  function block(src, i, afterBlank) {
    const line = src[i];
    const fence = line.match(FENCE);
    if (fence) { // runs to the closing fence, or to the end while the answer streams in
      let j = i + 1;
      while (j < src.length && !src[j].trim().startsWith(fence[1])) j++;
      return [codeBlock(src.slice(i + 1, j).join("\n"), fence[2]), j + 1];
    }
    if (afterBlank && INDENTED.test(line)) { // indented code cannot interrupt a paragraph
      let j = i;
      while (j < src.length && (INDENTED.test(src[j]) || !src[j].trim())) j++;
      while (j > i && !src[j - 1].trim()) j--;
      const text = src.slice(i, j).map((l) => l.replace(INDENTED, "")).join("\n");
      return [codeBlock(text, ""), j];
    }
    const heading = line.match(/^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$/);
    if (heading) return [el("p", {}, el("strong", {}, ...inline(heading[1]))), i + 1];
    const item = line.match(ITEM);
    if (item) {
      const ordered = /\d/.test(item[1]);
      const list = el(ordered ? "ol" : "ul", ordered && parseInt(item[1], 10) !== 1
        ? { start: parseInt(item[1], 10) } : {});
      let j = i;
      let m;
      while (j < src.length && (m = src[j].match(ITEM)) && /\d/.test(m[1]) === ordered) {
        const body = [m[2]];
        j++; // lines indented under an item continue it
        while (j < src.length && /^\s{2,}\S/.test(src[j]) && !ITEM.test(src[j])) {
          body.push(src[j].trim());
          j++;
        }
        list.append(el("li", {}, ...lines(body)));
      }
      return [list, j];
    }
    let j = i + 1;
    while (j < src.length && src[j].trim() && !FENCE.test(src[j]) && !ITEM.test(src[j])) j++;
    return [el("p", {}, ...lines(src.slice(i, j))), j];
  }
  function markdown(text) {
    const src = String(text).replace(/\r\n?/g, "\n").split("\n");
    const out = document.createDocumentFragment();
    let blank = true;
    for (let i = 0; i < src.length;) {
      if (!src[i].trim()) { blank = true; i++; continue; }
      const [node, next] = block(src, i, blank);
      out.append(node);
      blank = false;
      i = next;
    }
    return out;
  }

  // --- talking to the service -----------------------------------------------------------------

  function headers(extra) {
    const h = { "Content-Type": "application/json", ...extra };
    if (key) h.Authorization = `Bearer ${key}`;
    // The visitor id the service signed for this browser (a site key's callers are told apart
    // by it, not by the `user` field); kept with the conversation.
    if (state.visitor) h["X-Prefloop-Visitor"] = state.visitor;
    return h;
  }
  /* What went wrong, in words for the person chatting; `detail` (the service's own message,
     for whoever debugs the page) goes to the console and the error's tooltip. */
  class Problem extends Error {
    constructor(message, detail = "") {
      super(message);
      this.detail = detail;
    }
  }
  const TRY_AGAIN = "Sorry, the assistant could not answer. Please try again.";
  async function problem(res) {
    let message = "";
    try { message = (await res.json()).error.message; } catch (_) { /* not our JSON */ }
    const detail = `HTTP ${res.status}${message ? `: ${message}` : ""}`;
    if (res.status === 401 || res.status === 403) {
      return new Problem("This chat is not available on this site right now. " +
        "Please tell the site's owner.", detail);
    }
    if (res.status === 429) {
      return new Problem("Too many messages \u2014 try again in a minute.", detail);
    }
    if (res.status === 503) {
      return new Problem("The assistant is starting up or busy \u2014 try again shortly.", detail);
    }
    if (res.status === 404 && /conversation/i.test(message)) {
      return new Problem("This conversation is no longer on the server. " +
        "Press \u201cNew\u201d to start a new one.", detail);
    }
    return new Problem(TRY_AGAIN, detail);
  }
  async function call(path, body, extraHeaders) {
    let res;
    try {
      res = await fetch(base + path, {
        method: "POST", headers: headers(extraHeaders), body: JSON.stringify(body),
      });
    } catch (err) {
      throw new Problem("Cannot reach the assistant. Check your connection, then try again.",
        `${base}${path}: ${err}`);
    }
    const visitor = res.headers.get("X-Prefloop-Visitor");
    if (visitor && visitor !== state.visitor) { state.visitor = visitor; save(); }
    if (!res.ok) throw await problem(res);
    return res;
  }

  /* Stream one chat request into `turn`: its completion id, and one answer per choice. */
  async function streamInto(body, turn) {
    const res = await call("/v1/chat/completions", { ...body, stream: true });
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finished = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") { finished = true; continue; }
          const chunk = JSON.parse(payload);
          if (chunk.error) {
            throw new Problem("The answer stopped part-way. Try \u201cRegenerate\u201d.",
              chunk.error.message);
          }
          turn.completion_id = chunk.id;
          if (chunk.conversation_id) state.conversation_id = chunk.conversation_id;
          for (const c of chunk.choices) {
            const answer = (turn.answers[c.index] ||= { text: "", message_id: null });
            if (c.message_id) answer.message_id = c.message_id;
            if (c.delta && c.delta.content) answer.text += c.delta.content;
            if (c.finish_reason) {
              answer.done = true;
              answer.finish_reason = c.finish_reason; // "length": cut off at max_tokens
            }
          }
          paintAnswers(turn);
        }
      }
    }
    if (!finished) {
      throw new Problem("The connection dropped before the answer was complete. " +
        "Try \u201cRegenerate\u201d.", "the event stream ended without [DONE]");
    }
  }

  function feedback(body) {
    return call("/v1/feedback", { ...body, user: state.user }, { "Idempotency-Key": randomId() });
  }

  // --- actions --------------------------------------------------------------------------------

  function lastParent() {
    const turn = state.turns[state.turns.length - 1];
    if (!turn || !turn.answers.length) return null;
    return turn.answers[turn.picked ?? 0].message_id;
  }

  async function send(text) {
    if (busy || !text.trim()) return;
    const compare = compareEvery > 0 && (state.turns.length + 1) % compareEvery === 0;
    const turn = { user: text, answers: [], compare, picked: null, rating: null };
    const body = { messages: [{ role: "user", content: text }], user: state.user, n: compare ? 2 : 1 };
    if (segment) body.model = segment;
    if (state.conversation_id) {
      body.conversation_id = state.conversation_id;
      const parent = lastParent();
      if (parent) body.parent_id = parent;
    }
    state.turns.push(turn);
    input.value = "";
    await run(async () => {
      try {
        await streamInto(body, turn);
      } catch (err) {
        if (!turn.answers.length) { // nothing came back: give the text back to retry
          state.turns.pop();
          input.value = text;
        }
        throw err;
      }
    });
  }

  async function regenerate(turn) {
    const body = { regenerate: turn.completion_id, user: state.user, n: 1 };
    if (segment) body.model = segment;
    const before = { answers: turn.answers, rating: turn.rating, comment: turn.comment };
    turn.answers = [];
    turn.rating = null;
    turn.comment = undefined;
    turn.regenerations = (turn.regenerations || 0) + 1;
    await run(async () => {
      try {
        await streamInto(body, turn);
      } catch (err) {
        if (!turn.answers.length) Object.assign(turn, before);
        throw err;
      }
    });
  }

  async function rate(turn, rating) {
    await run(async () => {
      await feedback({ completion_id: turn.completion_id, rating, choice_index: 0 });
      turn.rating = rating;
      turn.commenting = true;
    }, false);
  }

  async function comment(turn, text) {
    if (!text.trim()) return;
    await run(async () => {
      await feedback({
        completion_id: turn.completion_id, rating: turn.rating, choice_index: 0, comment: text,
      });
      turn.comment = text;
      turn.commenting = false;
    }, false);
  }

  async function pick(turn, index) {
    await run(async () => {
      await feedback({ completion_id: turn.completion_id, type: "pick", chosen_index: index });
      turn.picked = index;
    }, false);
  }

  /* Run an action: one at a time, errors in plain words, state saved and repainted after. */
  async function run(action, blocking = true) {
    if (blocking) busy = true;
    showError("");
    render();
    try {
      await action();
    } catch (err) {
      if (err instanceof Problem) showError(err.message, err.detail);
      else showError(TRY_AGAIN, String(err && err.stack ? err.stack : err)); // a bug of ours
    } finally {
      if (blocking) busy = false;
      save();
      render();
    }
  }

  // Icons as inline SVG: emoji need a colour-emoji font, which many systems lack.
  const svg = (path) => `<svg width="16" height="16" viewBox="0 0 24 24" aria-hidden="true"
    fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round"
    stroke-linejoin="round">${path}</svg>`;
  const ICONS = {
    up: svg('<path d="M7 10v11H3V10h4zM7 10l4-8a3 3 0 0 1 3 3v4h6a2 2 0 0 1 2 2.3l-1.4 8A2 2 0 0 1 ' +
      '18.6 21H7"/>'),
    down: svg('<path d="M17 14V3h4v11h-4zM17 14l-4 8a3 3 0 0 1-3-3v-4H4a2 2 0 0 1-2-2.3l1.4-8A2 2 ' +
      '0 0 1 5.4 3H17"/>'),
    chat: svg('<path d="M21 12a8 8 0 0 1-11.6 7.1L3 21l1.9-6.4A8 8 0 1 1 21 12z"/>'),
    regenerate: svg('<path d="M21 3v6h-6"/><path d="M21 9a9 9 0 1 0 .5 6"/>'),
    close: svg('<path d="M6 6l12 12M18 6L6 18"/>'),
    cut: svg('<circle cx="12" cy="12" r="9"/><path d="M12 7v6M12 16.5v.5"/>'),
  };

  // --- the page -------------------------------------------------------------------------------

  const host = document.createElement("div");
  host.setAttribute("data-prefloop-widget", "");
  const root = host.attachShadow({ mode: "open" });
  root.innerHTML = `
<style>
  :host { all: initial; font: 15px/1.45 system-ui, sans-serif; color: #1b1b1f; }
  button { font: inherit; cursor: pointer; border: 1px solid #c9ccd4; background: #fff;
           border-radius: 6px; padding: 3px 8px; }
  button:focus-visible, textarea:focus-visible, input:focus-visible {
           outline: 3px solid #2f6fed; outline-offset: 1px; }
  .bubble svg { width: 28px; height: 28px; }
  .close { line-height: 0; padding: 4px 6px; }
  .assistant p { margin: 0 0 6px; }
  .assistant > :last-child, .assistant li > :last-child { margin-bottom: 0; }
  .assistant ul, .assistant ol { margin: 0 0 6px; padding-left: 22px; }
  .assistant a { color: #1c4fc4; }
  .assistant :not(pre) > code { background: #e3e5ea; padding: 0 3px; border-radius: 3px;
                                white-space: pre-wrap; }
  .assistant pre code { white-space: pre; tab-size: 4; }
  .cutoff { display: flex; gap: 4px; align-items: center; margin-top: 6px; padding-top: 4px;
            border-top: 1px dashed #b9bcc6; color: #8a4b00; font-size: 12px; }
  .tools .icon-text { display: inline-flex; gap: 4px; align-items: center; line-height: 1.3; }
  .tools button { line-height: 0; padding: 4px 7px; }
  .tools button:not(:has(svg)) { line-height: 1.3; }
  button[aria-pressed="true"] { background: #dbe7ff; border-color: #2f6fed; }
  button:disabled { opacity: .5; cursor: default; }
  .bubble { position: fixed; right: 20px; bottom: 20px; width: 56px; height: 56px;
            border-radius: 50%; background: #2f6fed; color: #fff; line-height: 0;
            border: none; box-shadow: 0 4px 14px rgba(0,0,0,.25); z-index: 2147483646; }
  .panel { position: fixed; right: 20px; bottom: 88px; width: min(380px, calc(100vw - 40px));
           height: min(560px, calc(100vh - 110px)); display: flex; flex-direction: column;
           background: #fff; border: 1px solid #d6d8de; border-radius: 12px;
           box-shadow: 0 8px 30px rgba(0,0,0,.2); z-index: 2147483647; overflow: hidden; }
  .panel[hidden] { display: none; }
  header { display: flex; gap: 6px; align-items: center; padding: 8px 10px;
           background: #2f6fed; color: #fff; }
  header h2 { font-size: 15px; margin: 0; flex: 1; }
  .log { flex: 1; overflow-y: auto; padding: 10px; display: flex; flex-direction: column;
         gap: 8px; }
  .msg { padding: 7px 10px; border-radius: 10px; max-width: 88%; overflow-wrap: anywhere; }
  .user { align-self: flex-end; background: #2f6fed; color: #fff; white-space: pre-wrap; }
  .assistant { align-self: flex-start; background: #f1f2f5; }
  .assistant pre { background: #e3e5ea; padding: 6px 8px; overflow-x: auto; margin: 4px 0 6px;
                   border-radius: 6px; }
  .assistant code { font-family: ui-monospace, monospace; font-size: 13px; }
  .compare { display: grid; grid-template-columns: 1fr 1fr; gap: 6px; }
  .compare .assistant { max-width: none; }
  .chosen { outline: 2px solid #2f9e44; }
  .tools { display: flex; flex-wrap: wrap; gap: 4px; align-items: center; font-size: 13px; }
  .tools input { flex: 1; min-width: 120px; font: inherit; padding: 2px 6px; }
  .note { color: #555; font-size: 13px; }
  .error { margin: 0; padding: 6px 10px; background: #fff0f0; color: #a61b1b;
           border-top: 1px solid #f3c4c4; font-size: 13px; }
  .error[hidden] { display: none; }
  form { display: flex; gap: 6px; padding: 8px; border-top: 1px solid #e4e6eb; }
  textarea { flex: 1; resize: none; font: inherit; padding: 6px; border-radius: 6px;
             border: 1px solid #c9ccd4; }
</style>
<button class="bubble" type="button" aria-label="Open chat" aria-expanded="false">${ICONS.chat}</button>
<section class="panel" role="dialog" aria-label="Chat" hidden>
  <header>
    <h2>Chat</h2>
    <button class="new" type="button" aria-label="Start a new conversation">New</button>
    <button class="close" type="button" aria-label="Close chat">${ICONS.close}</button>
  </header>
  <div class="log" role="log" aria-live="polite"></div>
  <p class="error" role="alert" hidden></p>
  <form>
    <textarea rows="2" aria-label="Your message"
      placeholder="Ask anything (Enter sends, Shift+Enter: new line)"></textarea>
    <button class="send" type="submit" aria-label="Send message">Send</button>
  </form>
</section>`;
  const $ = (sel) => root.querySelector(sel);
  const bubble = $(".bubble");
  const panel = $(".panel");
  const log = $(".log");
  const errorBox = $(".error");
  const input = $("textarea");
  const sendButton = $(".send");

  function showError(message, detail = "") {
    errorBox.textContent = message;
    errorBox.hidden = !message;
    // The technical reason stays out of the sentence: in the tooltip and the console.
    if (detail) {
      errorBox.title = detail;
      console.log("prefloop widget:", detail);
    } else {
      errorBox.removeAttribute("title");
    }
  }

  function setOpen(open) {
    state.open = open;
    panel.hidden = !open;
    bubble.setAttribute("aria-expanded", String(open));
    bubble.setAttribute("aria-label", open ? "Close chat" : "Open chat");
    save();
    if (open) input.focus();
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "on") node.addEventListener("click", v);
      else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }
  /* A button showing an icon (a key of ICONS), a text, or an icon beside a text. */
  function button(label, text, onClick, extra = {}, icon = "") {
    const node = el("button", { type: "button", "aria-label": label, "data-k": label, on: onClick,
      disabled: busy, ...extra });
    if (Object.hasOwn(ICONS, text)) {
      node.innerHTML = ICONS[text]; // our own constant markup, not input
    } else if (icon) {
      node.innerHTML = ICONS[icon];
      node.classList.add("icon-text");
      node.append(text);
    } else {
      node.textContent = text;
    }
    return node;
  }

  /* An answer's content: Markdown, and a marker where it stopped at its length limit. */
  function fillAnswer(node, answer, waiting) {
    node.replaceChildren(markdown(answer.text || (waiting ? "\u2026" : "")));
    if (answer.finish_reason === "length") {
      const mark = el("p", { class: "cutoff" }, "Cut off: the answer reached its length limit.");
      mark.insertAdjacentHTML("afterbegin", ICONS.cut); // our own constant markup
      node.append(mark);
    }
  }

  function answerNode(answer, turn, index) {
    const node = el("div", { class: "msg assistant" });
    fillAnswer(node, answer, busy && !answer.done);
    if (turn.compare && turn.picked === index) node.classList.add("chosen");
    return node;
  }

  // While streaming, only the answers of the turn being written are repainted.
  const answerSlots = new WeakMap();
  function paintAnswers(turn) {
    const slots = answerSlots.get(turn);
    if (!slots) return render();
    turn.answers.forEach((answer, i) => {
      if (slots[i]) fillAnswer(slots[i], answer, false);
    });
    log.scrollTop = log.scrollHeight;
  }

  function turnNodes(turn, i) {
    const last = i === state.turns.length - 1;
    const nodes = [el("div", { class: "msg user" }, turn.user)]; // textContent: never HTML
    if (!turn.answers.length) {
      if (busy && last) nodes.push(el("div", { class: "msg assistant note" }, "\u2026"));
      answerSlots.set(turn, []);
      return nodes;
    }
    if (turn.compare) {
      const cards = turn.answers.map((a, j) => answerNode(a, turn, j));
      answerSlots.set(turn, cards);
      nodes.push(el("div", { class: "compare" }, ...cards));
      if (turn.picked === null) {
        if (!busy || !last) {
          nodes.push(el("div", { class: "tools" }, el("span", { class: "note" }, "Which is better?"),
            button(`Answer A is better (message ${i + 1})`, "A is better", () => pick(turn, 0)),
            button(`Answer B is better (message ${i + 1})`, "B is better", () => pick(turn, 1))));
        }
      } else {
        nodes.push(el("div", { class: "note" },
          `Thanks \u2014 you picked ${turn.picked === 0 ? "A" : "B"}.`));
      }
      return nodes;
    }
    const card = answerNode(turn.answers[0], turn, 0);
    answerSlots.set(turn, [card]);
    nodes.push(card);
    if (busy && last) return nodes;
    const n = i + 1;
    const tools = el("div", { class: "tools" },
      button(`Good answer (message ${n})`, "up", () => rate(turn, 1),
        { "aria-pressed": String(turn.rating === 1) }),
      button(`Bad answer (message ${n})`, "down", () => rate(turn, -1),
        { "aria-pressed": String(turn.rating === -1) }));
    if (last) {
      tools.append(button(`Regenerate answer (message ${n})`, "Regenerate",
        () => regenerate(turn), {}, "regenerate"));
    }
    nodes.push(tools);
    if (turn.commenting) {
      const box = el("input", { type: "text", "aria-label": `Comment (optional, message ${n})`,
        "data-k": `comment-${n}`, placeholder: "What was good or bad? (optional)" });
      box.addEventListener("keydown", (e) => {
        if (e.key === "Enter") { e.preventDefault(); comment(turn, box.value); }
      });
      nodes.push(el("div", { class: "tools" }, box,
        button(`Send comment (message ${n})`, "Send comment", () => comment(turn, box.value))));
    } else if (turn.rating !== null) {
      nodes.push(el("div", { class: "note" }, turn.comment
        ? "Thanks for the feedback and the comment." : "Thanks for the feedback."));
    }
    return nodes;
  }

  function render() {
    // Re-rendering replaces the buttons: keep the keyboard focus on "the same" one.
    const focused = root.activeElement && root.activeElement.getAttribute("data-k");
    log.replaceChildren(...state.turns.flatMap(turnNodes));
    if (!state.turns.length) {
      log.append(el("p", { class: "note" }, "Ask a question. You can rate each answer."));
    }
    sendButton.disabled = busy;
    if (focused) {
      const again = log.querySelector(`[data-k="${CSS.escape(focused)}"]`);
      if (again) again.focus();
      else input.focus();
    }
    log.scrollTop = log.scrollHeight;
  }

  bubble.addEventListener("click", () => setOpen(panel.hidden));
  $(".close").addEventListener("click", () => { setOpen(false); bubble.focus(); });
  $(".new").addEventListener("click", () => {
    if (busy) return;
    state = { ...load(), user: state.user, visitor: state.visitor, conversation_id: null,
      turns: [], open: true };
    save();
    showError("");
    render();
    input.focus();
  });
  $("form").addEventListener("submit", (e) => { e.preventDefault(); send(input.value); });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(input.value); }
  });
  root.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !panel.hidden) { setOpen(false); bubble.focus(); }
  });

  function mount() {
    document.body.append(host);
    render();
    if (state.open) setOpen(true);
  }
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);

  fetch(`${base}/v1/widget/config`, { headers: key ? { Authorization: `Bearer ${key}` } : {} })
    .then((r) => (r.ok ? r.json() : {}))
    .then((cfg) => { compareEvery = Number(cfg.compare_every) || 0; })
    .catch(() => { /* no comparisons, then */ });
})();
