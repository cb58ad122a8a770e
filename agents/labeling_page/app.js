// The labeling page: show the next pair for this annotator id, send A / B / tie / skip, show progress and agreement.
// The server holds every label; this page keeps nothing but the annotator id (localStorage) and its tab id.
"use strict";
(() => {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  const tab = sessionStorage.getItem("textgen-tab") || `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
  sessionStorage.setItem("textgen-tab", tab);
  const $ = (id) => document.getElementById(id);
  const input = $("annotator");
  input.value = params.get("annotator") || localStorage.getItem("textgen-annotator") || window.TEXTGEN_ANNOTATOR || "";
  const keys = { a: "a", 1: "a", b: "b", 2: "b", t: "tie", 3: "tie", s: "skip" };
  let current = null;
  let busy = false;

  async function api(path, options = {}) {
    const url = new URL(path, location.href);
    url.search = "";
    if (token) url.searchParams.set("token", token);
    for (const [k, v] of Object.entries(options.query || {})) url.searchParams.set(k, v);
    const response = await fetch(url, options);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
    return body;
  }

  const pct = (x) => `${(100 * x).toFixed(0)} %`;

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  function showStats(stats) {
    const done = stats.done ?? 0;
    $("bar").value = stats.total ? done / stats.total : 0;
    $("progress-text").textContent =
      `you: ${done} / ${stats.total} pairs · all annotators: ${stats.labelled} / ${stats.total} pairs judged`;
    const agreement = stats.agreement;
    $("agreement").textContent = agreement
      ? `${pct(agreement.rate)} of answers agree, on ${agreement.pairs} pair(s) judged by two or more ids`
      : "shown once two annotator ids have judged the same pairs";
    const gold = stats.gold;
    $("gold").textContent = gold
      ? `all annotators ${pct(gold.rate)} of ${gold.labels} A/B label(s)` +
        (gold.yours ? `; you ${pct(gold.yours.rate)} of ${gold.yours.labels}` : "") +
        `; a simulated annotator (β = ${gold.beta}) would agree on ${pct(gold.simulated)} of the same`
      : "shown after the first A/B label (pairs that tie on gold do not count)";
    const ids = Object.entries(stats.annotators);
    $("annotators").textContent = ids.length ? ids.map(([who, n]) => `${who || "(no id)"}: ${n}`).join(", ") : "none yet";
  }

  function showPair(pair) {
    current = pair;
    document.body.dataset.pairId = pair ? pair.pair_id : "";
    document.body.dataset.state = pair ? "ready" : "done";
    $("done").hidden = Boolean(pair);
    for (const button of document.querySelectorAll("button[data-label]")) button.disabled = !pair;
    for (const el of document.querySelectorAll(".completion")) el.classList.remove("picked");
    if (!pair) return;
    $("prompt").textContent = pair.prompt;
    const references = pair.references || [];
    $("references").replaceChildren(...references.map((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      return item;
    }));
    $("reference").hidden = references.length === 0;
    $("text-a").textContent = pair.a;
    $("text-b").textContent = pair.b;
  }

  async function load() {
    if (!input.checkValidity() || !input.value) {
      document.body.dataset.state = "no-annotator";
      showError("Type your annotator id first (letters, digits and . @ + - _).");
      return;
    }
    localStorage.setItem("textgen-annotator", input.value);
    try {
      const body = await api("api/next", { query: { annotator: input.value, tab } });
      showPair(body.pair);
      showStats(body.stats);
    } catch (error) {
      document.body.dataset.state = "error";
      showError(error.message);
    }
  }

  async function submit(label) {
    if (!current || busy) return;
    busy = true;
    document.body.dataset.state = "saving";
    const side = { a: "choice-a", b: "choice-b" }[label];
    if (side) $(side).classList.add("picked");
    try {
      await api("api/label", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ pair_id: current.pair_id, annotator: input.value, label }),
      });
      showError("");
    } catch (error) {
      showError(error.message); // e.g. 409: another tab labelled this pair first; the next pair follows
    } finally {
      busy = false;
      await load();
    }
  }

  document.addEventListener("keydown", (event) => {
    if (event.target === input || event.ctrlKey || event.metaKey || event.altKey) return;
    const label = keys[event.key.toLowerCase()];
    if (label) {
      event.preventDefault();
      submit(label);
    }
  });
  for (const button of document.querySelectorAll("button[data-label]")) {
    button.addEventListener("click", () => submit(button.dataset.label));
  }
  input.addEventListener("change", () => { showError(""); load(); });
  load();
})();
