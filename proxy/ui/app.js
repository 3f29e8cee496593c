// lmswitch web page: status, the pool's hosts, model switching, live events, the latest
// requests, usage by key and a streaming chat box.
// Plain browser JavaScript, no build step, no external resources. Every piece of text that comes
// from the server is inserted with textContent (never innerHTML).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const el = {
    upstream: $("upstream"),
    upstreamLabel: $("upstream-label"),
    loaded: $("loaded"),
    memory: $("memory"),
    meter: $("memory-meter"),
    queue: $("queue"),
    live: $("live"),
    adminKeyButton: $("admin-key-button"),
    switchForm: $("switch-form"),
    picker: $("model-picker"),
    switchButton: $("switch-button"),
    upstreamNote: $("upstream-note"),
    progress: $("progress"),
    loads: $("loads"),
    loadsStatus: $("loads-status"),
    message: $("message"),
    tbody: $("models-body"),
    limits: $("limits"),
    hostsCard: $("hosts-card"),
    hostsHeading: $("hosts-heading"),
    hosts: $("hosts"),
    requestsCard: $("requests-card"),
    requests: $("requests"),
    usageCard: $("usage-card"),
    usageBody: $("usage-body"),
    chatModel: $("chat-model"),
    chatLog: $("chat-log"),
    chatForm: $("chat-form"),
    chatInput: $("chat-input"),
    chatSend: $("chat-send"),
    chatStop: $("chat-stop"),
    chatClear: $("chat-clear"),
    chatStatus: $("chat-status"),
    dialog: $("key-dialog"),
    keyForm: $("key-form"),
    keyTitle: $("key-title"),
    keyDescription: $("key-description"),
    keyError: $("key-error"),
    keyLabel: $("key-label"),
    keyInput: $("key-input"),
    keyCancel: $("key-cancel"),
  };

  // --- formatting ---------------------------------------------------------------------------

  function formatBytes(bytes) {
    if (typeof bytes !== "number" || !Number.isFinite(bytes)) return "—";
    if (bytes === 0) return "0 GB";
    if (bytes >= 1e10) return `${(bytes / 1e9).toFixed(1)} GB`;
    if (bytes >= 1e9) return `${(bytes / 1e9).toFixed(2)} GB`;
    if (bytes >= 1e6) return `${Math.round(bytes / 1e6)} MB`;
    if (bytes >= 1e3) return `${Math.round(bytes / 1e3)} kB`;
    return `${bytes} B`;
  }

  function formatAgo(epochSeconds) {
    if (typeof epochSeconds !== "number" || !Number.isFinite(epochSeconds)) return "never";
    const seconds = Math.max(0, Date.now() / 1000 - epochSeconds);
    if (seconds < 5) return "just now";
    if (seconds < 60) return `${Math.floor(seconds)} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return new Date(epochSeconds * 1000).toLocaleString();
  }

  const STATE_LABELS = {
    absent: "not loaded",
    loading: "loading…",
    ready: "loaded",
    draining: "draining",
    unloading: "unloading…",
    failed: "load failed",
    noroom: "no room",
  };
  // The code of a load refused for want of room: the model cannot fit even with every unpinned
  // model unloaded (pinned models fill every slot, or it is bigger than the memory budget).
  const NO_ROOM = "model_too_large";
  // How a `model` event says why a model was unloaded.
  const UNLOAD_REASONS = {
    evicted: "to make room",
    idle: "after being idle",
    admin: "as asked",
    external: "outside the proxy",
  };
  // `model` events name the transition; rows name the phase.
  const EVENT_PHASES = {
    loading: "loading",
    loaded: "ready",
    draining: "draining",
    unloading: "unloading",
    unloaded: "absent",
  };
  // Loaded means what the proxy says it means (`loaded` in rows and `model` events).
  const isLoaded = (row) => row.loaded === true;

  // --- keys (kept for this tab only) ----------------------------------------------------------

  const KEY_STORE = { admin: "lmswitch.adminKey", api: "lmswitch.apiKey" };
  const KEY_TEXT = {
    admin: {
      title: "Admin key needed",
      label: "Admin key",
      description:
        "This proxy's management endpoints need one of the keys in auth.admin_keys, " +
        "or a key of auth.keys with admin: true. " +
        "The key is kept only while this tab is open.",
    },
    api: {
      title: "API key needed",
      label: "API key",
      description:
        "The chat goes through /v1/chat/completions, which needs one of the keys in " +
        "auth.api_keys or auth.keys. The key is kept only while this tab is open.",
    },
  };

  function getKey(kind) {
    try {
      return sessionStorage.getItem(KEY_STORE[kind]);
    } catch {
      return null;
    }
  }

  function setKey(kind, value) {
    try {
      if (value) sessionStorage.setItem(KEY_STORE[kind], value);
      else sessionStorage.removeItem(KEY_STORE[kind]);
    } catch {
      // storage disabled: the key is simply not remembered
    }
  }

  const pendingKey = { admin: null, api: null };
  let dialogChain = Promise.resolve();

  // Ask for a key in the dialog; resolves to the key, or null when the user cancels.
  function askKey(kind, rejected) {
    if (!pendingKey[kind]) {
      const asked = dialogChain.then(() => showKeyDialog(kind, rejected));
      pendingKey[kind] = asked;
      dialogChain = asked.catch(() => null);
      asked.finally(() => {
        if (pendingKey[kind] === asked) pendingKey[kind] = null;
      });
    }
    return pendingKey[kind];
  }

  function showKeyDialog(kind, rejected) {
    const text = KEY_TEXT[kind];
    el.keyTitle.textContent = text.title;
    el.keyLabel.textContent = text.label;
    el.keyDescription.textContent = text.description;
    el.keyError.textContent = rejected ? "That key was not accepted. Try another." : "";
    el.keyInput.value = "";
    return new Promise((resolve) => {
      let answer = null;
      const onSubmit = (event) => {
        event.preventDefault();
        const value = el.keyInput.value.trim();
        if (!value) return;
        answer = value;
        setKey(kind, value);
        el.dialog.close();
      };
      const onCancel = () => el.dialog.close();
      const onClose = () => {
        el.keyForm.removeEventListener("submit", onSubmit);
        el.keyCancel.removeEventListener("click", onCancel);
        el.dialog.removeEventListener("close", onClose);
        resolve(answer);
      };
      el.keyForm.addEventListener("submit", onSubmit);
      el.keyCancel.addEventListener("click", onCancel);
      el.dialog.addEventListener("close", onClose);
      el.dialog.showModal();
      el.keyInput.focus();
    });
  }

  // --- HTTP -----------------------------------------------------------------------------------

  // fetch() with the stored key as Bearer; on 401 asks for a key and tries again.
  async function request(path, options = {}, kind = "admin") {
    for (;;) {
      const key = getKey(kind);
      const headers = { ...(options.headers || {}) };
      if (key) headers.Authorization = `Bearer ${key}`;
      let body;
      if (options.json !== undefined) {
        headers["Content-Type"] = "application/json";
        body = JSON.stringify(options.json);
      }
      const response = await fetch(path, {
        method: options.method || "GET",
        headers,
        body,
        signal: options.signal,
        cache: "no-store",
      });
      if (response.status !== 401) return response;
      if (kind === "admin") el.adminKeyButton.hidden = false;
      if (getKey(kind) === key) setKey(kind, null);
      const entered = await askKey(kind, Boolean(key));
      if (!entered) return response;
      if (kind === "admin") el.adminKeyButton.hidden = true;
    }
  }

  // The error an answer carries: {message, code} (code null when it names none).
  async function errorInfo(response) {
    let text = "";
    try {
      text = await response.text();
      const body = JSON.parse(text);
      const error = body && body.error;
      const code = error && typeof error.code === "string" ? error.code : null;
      if (error && typeof error.message === "string") return { message: error.message, code };
      if (typeof error === "string") return { message: error, code: null };
      if (body && typeof body.detail === "string") return { message: body.detail, code: null };
    } catch {
      // not JSON: fall back to the text or the status
    }
    const message =
      text.trim().slice(0, 300) || `HTTP ${response.status} ${response.statusText}`.trim();
    return { message, code: null };
  }

  async function errorMessage(response) {
    return (await errorInfo(response)).message;
  }

  // Server-Sent Events from a fetch() body: calls onEvent(type, data) for each event.
  async function readSse(body, onEvent) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let type = "";
    let data = [];
    const line = (text) => {
      if (text === "") {
        if (data.length) onEvent(type || "message", data.join("\n"));
        type = "";
        data = [];
        return;
      }
      if (text.startsWith(":")) return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") type = value;
      else if (field === "data") data.push(value);
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        // A "\r" at the very end may be the first half of "\r\n": keep it for the next chunk.
        const keep = buffer.endsWith("\r") ? 1 : 0;
        const usable = buffer.slice(0, buffer.length - keep).replace(/\r\n?/g, "\n");
        const lines = usable.split("\n");
        buffer = lines.pop() + buffer.slice(buffer.length - keep);
        for (const text of lines) line(text);
      }
      if (buffer) line(buffer);
      line("");
    } finally {
      reader.releaseLock();
    }
  }

  // --- state and rendering --------------------------------------------------------------------

  const state = {
    models: [], // rows of /api/v1/models
    status: null, // /api/v1/status
    errors: new Map(), // model id -> {message, code}: why its last load failed
    // model id -> {action, upstream, text, controller, started}: this page's loads and unloads
    // still waiting for the proxy's answer, one per model at most.
    pending: new Map(),
    // model id -> {action, until}: this page's actions the proxy has answered, whose last event
    // may still be on its way (the answer and the events come by different connections).
    answered: new Map(),
    banner: null, // {model, kind}: what the message below the switch form is about
    down: { now: false, reason: "" }, // every host down (LM Studio unreachable), and why
    pickerTouched: false,
  };
  const rows = new Map(); // model id -> the row's elements
  const hostCards = new Map(); // host name -> the card's elements
  const chat = { messages: [], controller: null, model: null }; // model: the one answering

  function render() {
    document.body.classList.toggle("pool", isPool());
    renderStatus();
    renderDown();
    renderHosts();
    renderLimits();
    renderTable();
    renderPicker();
    renderChatModel();
    renderLoads();
  }

  // The hosts of the pool (`upstreams` of the status), in the configuration's order.
  function hostRows() {
    const list = state.status && state.status.upstreams;
    return Array.isArray(list) ? list.filter((h) => h && typeof h.name === "string") : [];
  }

  // More than one host: the page names hosts on models and requests and offers a host to load
  // on; with one, it looks as it did before the pool.
  const isPool = () => hostRows().length > 1;

  // Every host is down (LM Studio unreachable, or its models unreadable): nothing can be loaded
  // or answered until one is back.
  function upstreamDown() {
    const hosts = hostRows();
    return hosts.length > 0 && hosts.every((h) => h.up !== true);
  }

  // The models requests wait for, per host (the status' `waiting`, kept live by `queue` events).
  function waitingRows() {
    const rows = state.status && state.status.waiting;
    return Array.isArray(rows) ? rows.filter((r) => r && typeof r.model === "string") : [];
  }

  // How many requests wait, among the `waiting` rows that `keep`.
  function waitingCount(keep) {
    return waitingRows()
      .filter(keep)
      .reduce((sum, row) => sum + (Number(row.waiting) || 0), 0);
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function setPill(node, text, tone) {
    setText(node, text);
    node.dataset.tone = tone;
  }

  // The row's state, or after a failed load of a model still absent, how it failed.
  function phaseOf(model) {
    const error = state.errors.get(model.id);
    if (!error || model.state !== "absent") return model.state;
    return error.code === NO_ROOM ? "noroom" : "failed";
  }

  function renderStatus() {
    const status = state.status;
    const hosts = hostRows();
    setText(el.upstreamLabel, hosts.length > 1 ? "Hosts" : "Upstream");
    if (hosts.length > 1) {
      const up = hosts.filter((h) => h.up === true).length;
      const tone = up === hosts.length ? "ok" : up ? "warn" : "bad";
      setPill(el.upstream, up ? `${up} of ${hosts.length} up` : "all down", tone);
      el.upstream.title = hosts.map((h) => `${h.name}: ${h.up ? "up" : "down"}`).join(", ");
    } else if (status && status.upstream) {
      const reachable = Boolean(status.upstream.reachable);
      setPill(
        el.upstream,
        reachable ? "LM Studio reachable" : "LM Studio unreachable",
        reachable ? "ok" : "bad",
      );
      el.upstream.title = String(status.upstream.url || "");
    }
    // Loaded models from the rows (they tell loading from loaded); the status as a fallback.
    const resident = state.models.filter((row) => row.state && row.state !== "absent");
    const items = resident.length
      ? resident.map((row) => ({ id: String(row.id), state: row.state }))
      : ((status && status.loaded) || []).map((id) => ({ id: String(id), state: "ready" }));
    const summary = items.map((i) => `${i.id}:${i.state}`).join(",");
    if (el.loaded.dataset.summary !== summary || !el.loaded.firstChild) {
      el.loaded.dataset.summary = summary;
      el.loaded.replaceChildren();
      if (!items.length) el.loaded.textContent = "none";
      items.forEach((item, index) => {
        if (index) el.loaded.append(", ");
        const name = document.createElement("span");
        name.className = "model-id";
        name.textContent = item.id;
        el.loaded.append(name);
        if (item.state !== "ready") {
          const note = document.createElement("span");
          note.className = "note";
          note.textContent = ` (${STATE_LABELS[item.state] || item.state})`;
          el.loaded.append(note);
        }
      });
    }
    const capacity = status && status.capacity;
    if (hosts.length || capacity) {
      // The pool's memory: every host's, against the sum of their budgets (set, or learned
      // from LM Studio with `memory_budget: auto`) if all have one.
      const budgeted = hosts.every((h) => hostBudget(h) > 0);
      const used = hosts.length
        ? hosts.reduce((sum, h) => sum + (Number(h.bytes_used) || 0), 0)
        : Number(capacity.bytes_used) || 0;
      let budget = capacity ? capacity.memory_budget : null;
      let learned = false;
      if (hosts.length) {
        budget = budgeted ? hosts.reduce((sum, h) => sum + hostBudget(h), 0) : null;
        learned = budgeted && hosts.some(isLearned);
      }
      if (typeof budget === "number" && budget > 0) {
        const note = learned ? " (learned)" : "";
        setText(el.memory, `${formatBytes(used)} of ${formatBytes(budget)}${note}`);
        showMeter(el.meter, used, budget);
        el.meter.dataset.learned = String(learned);
        el.meter.title = learned ? learnedTitle(hosts) : "";
      } else {
        setText(el.memory, `${formatBytes(used)} (no budget)`);
        el.meter.hidden = true;
      }
    }
    if (status) {
      const waiting = waitingCount(() => true);
      const running = Number(status.in_flight) || 0;
      setText(el.queue, `${waiting} waiting · ${running} running`);
    }
  }

  // A host's memory budget: `memory_budget` in bytes, or with `auto` the capacity learned from
  // its LM Studio (`learned_bytes`, null until it has refused a load); 0 if it has none.
  const isLearned = (host) => host.memory_budget === "auto" && Number(host.learned_bytes) > 0;
  function hostBudget(host) {
    if (Number(host.memory_budget) > 0) return Number(host.memory_budget);
    return isLearned(host) ? Number(host.learned_bytes) : 0;
  }
  // How each host's capacity was learned (the meter's tooltip).
  function learnedTitle(hosts) {
    return hosts
      .filter(isLearned)
      .map((h) => {
        const how = h.learned && typeof h.learned.how === "string" ? h.learned.how : "";
        return `${hosts.length > 1 ? `${h.name}: ` : ""}learned from LM Studio: ${how}`;
      })
      .join("\n");
  }

  function showMeter(meter, used, budget) {
    meter.hidden = false;
    meter.max = budget;
    meter.low = budget * 0.75;
    meter.high = budget * 0.9;
    meter.optimum = 0;
    meter.value = Math.min(used, budget);
  }

  // Tags naming models or hosts, rebuilt only when the names change.
  function setTags(node, names, empty) {
    const summary = names.join("\n");
    if (node.dataset.summary === summary && node.firstChild) return;
    node.dataset.summary = summary;
    node.replaceChildren();
    if (!names.length) {
      const none = document.createElement("span");
      none.className = "none";
      none.textContent = empty;
      node.append(none);
      return;
    }
    names.forEach((name, index) => {
      if (index) {
        const comma = document.createElement("span");
        comma.className = "visually-hidden";
        comma.textContent = ", ";
        node.append(comma);
      }
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = name;
      node.append(tag);
    });
  }

  function hostStat(list, label, className) {
    const item = document.createElement("div");
    item.className = `host-stat host-${className}`;
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.className = className;
    item.append(dt, dd);
    list.append(item);
    return dd;
  }

  function createHostCard(name) {
    const li = document.createElement("li");
    li.className = "host";
    li.dataset.host = name;
    const head = document.createElement("div");
    head.className = "host-head";
    const title = document.createElement("h3");
    title.className = "host-name";
    title.textContent = name;
    const pill = document.createElement("span");
    pill.className = "pill";
    const url = document.createElement("span");
    url.className = "host-url model-id";
    head.append(title, pill, url);

    const stats = document.createElement("dl");
    stats.className = "host-stats";
    const memory = hostStat(stats, "Memory", "memory");
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = 1;
    meter.value = 0;
    meter.setAttribute("aria-label", `Memory used on ${name} against its budget`);
    const memoryText = document.createElement("span");
    memoryText.className = "memory-text";
    memory.append(meter, memoryText);
    const instances = hostStat(stats, "Instances", "instances");
    const inFlight = hostStat(stats, "In flight", "in-flight");
    const queued = hostStat(stats, "Queued", "queued");
    const models = hostStat(stats, "Models", "models");
    models.classList.add("tags");
    li.append(head, stats);
    const card = { li, pill, url, meter, memoryText, instances, inFlight, queued, models };
    hostCards.set(name, card);
    return card;
  }

  function renderHosts() {
    const hosts = hostRows();
    el.hostsCard.hidden = !hosts.length;
    setText(el.hostsHeading, hosts.length === 1 ? "Host" : "Hosts");
    el.hosts.dataset.count = String(hosts.length);
    const seen = new Set();
    let previous = null;
    for (const host of hosts) {
      const name = host.name;
      seen.add(name);
      const card = hostCards.get(name) || createHostCard(name);
      card.li.dataset.up = String(host.up === true);
      setPill(card.pill, host.up ? "up" : "down", host.up ? "ok" : "bad");
      setText(card.url, String(host.url || ""));
      const used = Number(host.bytes_used) || 0;
      const budget = hostBudget(host);
      if (budget > 0) {
        const note = isLearned(host) ? " (learned)" : "";
        setText(card.memoryText, `${formatBytes(used)} of ${formatBytes(budget)}${note}`);
        showMeter(card.meter, used, budget);
        card.meter.dataset.learned = String(isLearned(host));
        card.meter.title = isLearned(host) ? learnedTitle([host]) : "";
      } else {
        // No budget, no bar: a bar against nothing would say "full" or "empty" wrongly.
        setText(card.memoryText, `${formatBytes(used)} used, no budget`);
        card.meter.hidden = true;
      }
      const count = Number(host.instances) || 0;
      const most = Number(host.max_loaded) || 0;
      setText(card.instances, most ? `${count} of ${most}` : `${count} (no limit)`);
      setText(card.inFlight, String(Number(host.in_flight) || 0));
      setText(card.queued, String(waitingCount((row) => row.upstream === name)));
      const loaded = Array.isArray(host.loaded) ? host.loaded.map(String) : [];
      setTags(card.models, loaded, "none loaded");
      const expected = previous ? previous.nextSibling : el.hosts.firstChild;
      if (expected !== card.li) {
        if (previous) previous.after(card.li);
        else el.hosts.prepend(card.li);
      }
      previous = card.li;
    }
    for (const [name, card] of hostCards) {
      if (!seen.has(name)) {
        card.li.remove();
        hostCards.delete(name);
      }
    }
  }

  function cell(tr, label, className) {
    const td = document.createElement("td");
    td.dataset.label = label;
    if (className) td.className = className;
    tr.append(td);
    return td;
  }

  function actionButton(text, label, onClick) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "secondary small";
    button.textContent = text;
    button.setAttribute("aria-label", label);
    // aria-disabled rather than disabled: a focused button keeps its focus when it turns off.
    button.addEventListener("click", () => {
      if (button.getAttribute("aria-disabled") !== "true") onClick();
    });
    return button;
  }

  function createRow(id) {
    const tr = document.createElement("tr");
    tr.dataset.model = id;
    const head = document.createElement("th");
    head.scope = "row";
    const name = document.createElement("span");
    name.className = "model-name";
    const key = document.createElement("span");
    key.className = "model-id";
    // The other names clients may use for it (`models.aliases`).
    const aliases = document.createElement("span");
    aliases.className = "aliases";
    head.append(name, key, aliases);
    tr.append(head);

    const stateCell = cell(tr, "State", "state");
    const badge = document.createElement("span");
    badge.className = "badge";
    // Why its last load failed: read out after the state, and shown as the badge's tooltip (a
    // long reason never widens the column; the message above the table says it in full).
    const reason = document.createElement("span");
    reason.className = "reason visually-hidden";
    // In a pool, the hosts holding the model (loading, loaded or unloading there).
    const holders = document.createElement("span");
    holders.className = "holders pool-only";
    const holdersLabel = document.createElement("span");
    holdersLabel.className = "visually-hidden";
    holdersLabel.textContent = " on ";
    const holderTags = document.createElement("span");
    holderTags.className = "tags";
    holders.append(holdersLabel, holderTags);
    stateCell.append(badge, holders, reason);

    const size = cell(tr, "Size", "num");
    const context = cell(tr, "Context", "num context");
    const lastUse = cell(tr, "Last use", "last-use");
    const time = document.createElement("time");
    lastUse.append(time);
    const inFlight = cell(tr, "In flight", "num");

    const pinCell = cell(tr, "Pinned", "pin");
    const pin = document.createElement("input");
    pin.type = "checkbox";
    pin.className = "switch";
    pin.setAttribute("role", "switch");
    pin.setAttribute("aria-label", `Pin ${id}`);
    pin.addEventListener("change", () => setPinned(id, pin.checked, pin));
    pinCell.append(pin);

    const actions = cell(tr, "Actions", "actions");
    // In a pool, where Load loads: "auto" lets the proxy place it, as a request would.
    const host = document.createElement("select");
    host.className = "host-choice pool-only";
    host.setAttribute("aria-label", `Host to load ${id} on`);
    host.title = "The host Load loads it on (auto: where the proxy places it)";
    host.addEventListener("change", () => renderTable());
    const load = actionButton("Load", `Load ${id}`, () => loadModel(id, host.value || null));
    const unload = actionButton("Unload", `Unload ${id}`, () => unloadModel(id));
    const buttons = document.createElement("span");
    buttons.className = "buttons";
    buttons.append(load, unload);
    actions.append(host, buttons);

    const row = {
      tr,
      name,
      key,
      aliases,
      badge,
      holderTags,
      reason,
      size,
      context,
      time,
      inFlight,
      pin,
      host,
      load,
      unload,
    };
    rows.set(id, row);
    return row;
  }

  function renderTable() {
    const seen = new Set();
    let previous = null;
    for (const model of state.models) {
      const id = String(model.id);
      seen.add(id);
      const row = rows.get(id) || createRow(id);
      const named = model.name && model.name !== id;
      setText(row.name, named ? String(model.name) : id);
      setText(row.key, named ? id : "");
      const aliases = aliasesOf(id);
      setText(row.aliases, aliases.length ? `also: ${aliases.join(", ")}` : "");
      row.aliases.hidden = !aliases.length;
      const phase = phaseOf(model);
      setText(row.badge, STATE_LABELS[phase] || String(phase || "unknown"));
      row.badge.dataset.state = phase || "unknown";
      const error = phase === "failed" || phase === "noroom" ? state.errors.get(id) : null;
      setText(row.reason, error ? `: ${error.message}` : "");
      setTitle(row.badge, error ? error.message : "");
      const holders = Array.isArray(model.upstreams) ? model.upstreams.map(String) : [];
      setTags(row.holderTags, holders, "");
      setText(row.size, formatBytes(model.size_bytes));
      const context = contextOf(model);
      setText(row.context, context.text);
      setTitle(row.context, context.title);
      if (typeof model.last_used_at === "number") {
        const when = new Date(model.last_used_at * 1000);
        row.time.dateTime = when.toISOString();
        row.time.dataset.epoch = String(model.last_used_at);
        row.time.title = when.toLocaleString();
      } else {
        row.time.removeAttribute("datetime");
        delete row.time.dataset.epoch;
        row.time.removeAttribute("title");
      }
      setText(row.time, formatAgo(model.last_used_at));
      const queued = waitingCount((waiting) => waiting.model === id);
      const running = Number(model.in_flight) || 0;
      setText(row.inFlight, `${running}${queued ? ` (+${queued} queued)` : ""}`);
      // A toggle the user just made wins over a snapshot taken before the server applied it.
      if (!row.pin.dataset.pending) row.pin.checked = Boolean(model.pinned);
      const target = renderHostChoice(row.host, model, holders);
      setAction(row.load, loadBlocker(model, target));
      setAction(row.unload, unloadBlocker(model));
      // Keep the catalogue's order without moving rows already in place (one may have focus).
      const expected = previous ? previous.nextSibling : el.tbody.firstChild;
      if (expected !== row.tr) {
        if (previous) previous.after(row.tr);
        else el.tbody.prepend(row.tr);
      }
      previous = row.tr;
    }
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    const empty = el.tbody.querySelector("tr.empty");
    if (state.models.length && empty) empty.remove();
  }

  function setTitle(node, text) {
    if (text) node.title = text;
    else node.removeAttribute("title");
  }

  // An action button on or off: `blocker` says why it does nothing now ("" when it can act),
  // as its tooltip and description.
  function setAction(button, blocker) {
    button.setAttribute("aria-disabled", String(Boolean(blocker)));
    setTitle(button, blocker);
  }

  const BUSY_STATES = {
    loading: "is loading",
    ready: "is loaded",
    draining: "is being unloaded",
    unloading: "is being unloaded",
  };

  // Why loading `model` makes no sense now ("" when it does). `target` is a host chosen to
  // load it on (one that does not hold it), or "" to let the proxy place it.
  function loadBlocker(model, target) {
    const id = String(model.id);
    const pending = state.pending.get(id);
    if (pending) return `${pending.text}…`;
    if (upstreamDown()) return "LM Studio is unreachable";
    if (target || !BUSY_STATES[model.state]) return "";
    return `${id} ${BUSY_STATES[model.state]}`;
  }

  // Why unloading `model` makes no sense now ("" when it does).
  function unloadBlocker(model) {
    const id = String(model.id);
    const pending = state.pending.get(id);
    if (pending) return `${pending.text}…`;
    if (upstreamDown()) return "LM Studio is unreachable";
    if (model.state === "ready") return "";
    if (model.state === "loading") return `${id} is loading: it can be unloaded once loaded`;
    return model.state === "absent" ? `${id} is not loaded` : `${id} ${BUSY_STATES[model.state]}`;
  }

  // Alias names of the model `id`, from the status' `aliases` (alias -> model).
  function aliasesOf(id) {
    const aliases = state.status && state.status.aliases;
    if (!aliases || typeof aliases !== "object") return [];
    return Object.keys(aliases).filter((alias) => aliases[alias] === id && alias !== id);
  }

  // Context lengths in tokens: 131072 is "128k" (k = 1024, as models state them).
  function formatTokens(tokens) {
    if (tokens >= 1024 && tokens % 1024 === 0) return `${tokens / 1024}k`;
    return tokens.toLocaleString("en-US");
  }

  // The context of the loaded instance, and the most the model takes.
  function contextOf(model) {
    const loaded = Number(model.context_length) > 0 ? Number(model.context_length) : null;
    const most = Number(model.max_context_length) > 0 ? Number(model.max_context_length) : null;
    const tokens = (n) => `${n.toLocaleString("en-US")} tokens`;
    if (loaded && most) {
      return {
        text: `${formatTokens(loaded)} of ${formatTokens(most)}`,
        title: `Loaded with a context of ${tokens(loaded)}; the model takes up to ${tokens(most)}`,
      };
    }
    if (loaded) return { text: formatTokens(loaded), title: `Loaded with ${tokens(loaded)}` };
    if (most) {
      return { text: `up to ${formatTokens(most)}`, title: `The model takes up to ${tokens(most)}` };
    }
    return { text: "—", title: "" };
  }

  // The options of a row's host picker: auto, then each host, those that cannot take the model
  // (down, without it downloaded, or holding it already) disabled with the reason. Returns the
  // host chosen, or "" for auto.
  function renderHostChoice(select, model, holders) {
    const hosts = isPool() ? hostRows() : [];
    const available = Array.isArray(model.available_on) ? model.available_on.map(String) : null;
    const choices = [{ value: "", text: "auto", disabled: false }];
    for (const host of hosts) {
      const name = String(host.name);
      let why = "";
      if (host.up !== true) why = "down";
      else if (holders.includes(name)) why = "has it";
      else if (available && !available.includes(name)) why = "not downloaded";
      choices.push({ value: name, text: why ? `${name} (${why})` : name, disabled: Boolean(why) });
    }
    const summary = choices.map((c) => `${c.value}:${c.text}`).join("\n");
    if (select.dataset.summary !== summary) {
      const current = select.value;
      select.dataset.summary = summary;
      select.replaceChildren(
        ...choices.map((choice) => {
          const option = document.createElement("option");
          option.value = choice.value;
          option.textContent = choice.text;
          option.disabled = choice.disabled;
          return option;
        }),
      );
      const still = choices.find((c) => c.value === current && !c.disabled);
      select.value = still ? current : "";
    }
    return select.value;
  }

  function refreshTimes() {
    for (const row of rows.values()) {
      const epoch = row.time.dataset.epoch;
      setText(row.time, formatAgo(epoch === undefined ? null : Number(epoch)));
    }
  }

  function optionText(model) {
    const name = model.name || model.id;
    const phase = phaseOf(model);
    const label = STATE_LABELS[phase] || phase;
    const kind = model.type === "embedding" ? ", embedding" : "";
    return `${name} — ${label} (${formatBytes(model.size_bytes)}${kind})`;
  }

  function renderPicker() {
    const picker = el.picker;
    const current = picker.value;
    const stale = new Map(
      Array.from(picker.options)
        .filter((o) => o.value)
        .map((o) => [o.value, o]),
    );
    let previous = null;
    for (const model of state.models) {
      const id = String(model.id);
      let option = stale.get(id);
      stale.delete(id);
      if (!option) {
        option = document.createElement("option");
        option.value = id;
      }
      setText(option, optionText(model));
      const expected = previous ? previous.nextSibling : picker.firstChild;
      if (expected !== option) {
        if (previous) previous.after(option);
        else picker.prepend(option);
      }
      previous = option;
    }
    for (const option of stale.values()) option.remove();
    for (const option of Array.from(picker.options)) if (!option.value) option.remove();
    if (!state.models.length) {
      const option = document.createElement("option");
      option.value = "";
      option.textContent = "No models";
      picker.append(option);
      return;
    }
    if (!state.pickerTouched) {
      const choice =
        state.models.find(isLoaded) ||
        state.models.find((m) => m.type !== "embedding") ||
        state.models[0];
      picker.value = String(choice.id);
    } else if (current && picker.value !== current) {
      picker.value = current;
    }
  }

  function selectedModel() {
    return state.models.find((m) => String(m.id) === el.picker.value) || null;
  }

  function chatNote(text, kind) {
    setText(el.chatStatus, text);
    el.chatStatus.dataset.kind = kind || "";
  }

  // The Switch button: on when the model picked can be loaded.
  function renderSwitch() {
    const model = selectedModel();
    const down = upstreamDown();
    let blocker = model ? loadBlocker(model, "") : "Choose a model first";
    if (!model && down) blocker = "LM Studio is unreachable";
    setAction(el.switchButton, blocker);
  }

  // The chat's model (the picker's), and Send on only when it can answer.
  function renderChatModel() {
    renderSwitch();
    const model = selectedModel();
    setText(el.chatModel, model ? String(model.id) : "the selected model");
    const embedding = Boolean(model && model.type === "embedding");
    const down = upstreamDown();
    const off = embedding || down || !model || Boolean(chat.controller);
    el.chatSend.setAttribute("aria-disabled", String(off));
    const kind = el.chatStatus.dataset.kind;
    if (chat.controller) return;
    if (down) {
      chatNote("LM Studio is unreachable: the chat can answer once it is back.", "down");
    } else if (embedding) {
      chatNote(`${model.id} is an embedding model: choose a chat model to chat.`, "embedding");
    } else if (kind === "embedding" || kind === "down") {
      chatNote("", "");
    }
  }

  // The message under the switch form; `about` ({model, kind}) says what it tells of, so
  // that later events can tell whether it has gone stale.
  function say(text, tone, about = null) {
    el.message.textContent = text;
    el.message.dataset.tone = tone || "info";
    state.banner = text ? about : null;
  }

  // While every host is down, a note says so and why (from /readyz), and what cannot work is
  // off: Switch, Send, Load and Unload.
  function renderDown() {
    const down = upstreamDown();
    if (down && !state.down.now) {
      state.down.reason = "";
      readDownReason();
    }
    state.down.now = down;
    el.upstreamNote.hidden = !down;
    if (!down) return;
    const hosts = hostRows();
    const reachable = Boolean(state.status.upstream && state.status.upstream.reachable);
    let what = "No LM Studio host can be used";
    if (hosts.length === 1) {
      const url = String(hosts[0].url || "");
      what = reachable ? `LM Studio at ${url} cannot be used` : `LM Studio is unreachable at ${url}`;
    }
    const why = state.down.reason ? ` Last error: ${state.down.reason}` : "";
    setText(
      el.upstreamNote,
      `${what}: nothing can be loaded or answered until it is back; this page updates when it ` +
        `is.${why}`,
    );
  }

  async function readDownReason() {
    try {
      const response = await fetch("/readyz", { cache: "no-store" });
      const body = await response.json();
      if (state.down.now && body && typeof body.status === "string" && body.status !== "ready") {
        state.down.reason = body.status;
        renderDown();
      }
    } catch {
      // the note stands without its reason
    }
  }

  // The limits the proxy loads models within, per host in a pool.
  function renderLimits() {
    const hosts = hostRows();
    el.limits.hidden = !hosts.length;
    if (!hosts.length) return;
    const limits = (host) => {
      const most = Number(host.max_loaded) || 0;
      const count = most
        ? `at most ${most} model${most === 1 ? "" : "s"} loaded at once`
        : "any number of models loaded at once";
      let memory = "no memory budget";
      if (Number(host.memory_budget) > 0) memory = `within ${formatBytes(host.memory_budget)}`;
      else if (isLearned(host)) memory = `within ${formatBytes(host.learned_bytes)} (learned from LM Studio)`;
      else if (host.memory_budget === "auto") memory = "within what LM Studio holds (nothing refused yet)";
      return `${count}, ${memory}`;
    };
    const text =
      hosts.length > 1
        ? `Limits per host: ${hosts.map((h) => `${h.name}, ${limits(h)}`).join("; ")}.`
        : `Limits: ${limits(hosts[0])} (models.max_loaded, models.memory_budget).`;
    setText(el.limits, text);
  }

  // --- loads in progress ----------------------------------------------------------------------
  //
  // Every load the proxy runs, whoever started it (a request, another tab, the API, this page),
  // from `model` events, the status' `waiting` rows and `queue` events, which also say how many
  // requests wait for it. A load's running time is counted here from the moment the page
  // learned it (its `loading_s`, or 0 at its `loading` event): the server's and the browser's
  // clocks are never compared. Beside them, this page's own loads and unloads still waiting for
  // the proxy's answer, each with a button to stop waiting.

  const TICK_MS = 200; // bars and times move this often
  // A load ends with any of these events on its host.
  const ENDS_LOAD = new Set(["loaded", "failed", "refused", "unloading", "unloaded"]);

  const progress = {
    loads: new Map(), // loadKey -> {model, upstream, expected, base, at, stamp, waiting, late}
    ended: new Map(), // loadKey -> when an event ended that load (performance.now())
    items: new Map(), // loadKey, or ownKey -> the elements of its line
    ids: 0,
    ticker: null,
  };

  const loadKey = (model, upstream) => `${upstream || ""}\n${model}`;
  const ownKey = (id) => `own\n${id}`;

  function seconds(value) {
    return typeof value === "number" && Number.isFinite(value) && value >= 0 ? value : null;
  }

  // How long `load` has been running, by the page's own count.
  const elapsedOf = (load, now) => load.base + (now - load.at) / 1000;

  function formatElapsed(value) {
    if (value < 60) return `${value.toFixed(1)} s`;
    const minutes = Math.floor(value / 60);
    return `${minutes} min ${Math.floor(value - minutes * 60)} s`;
  }

  function formatLeft(value) {
    if (value >= 90) return `about ${Math.round(value / 60)} min left`;
    return `about ${Math.max(1, Math.ceil(value))} s left`;
  }

  function formatExpected(value) {
    return value >= 90 ? `${Math.round(value / 60)} min` : `${Math.max(1, Math.round(value))} s`;
  }

  function waitingText(count) {
    if (!count) return "";
    return count === 1 ? "1 request waiting" : `${count} requests waiting`;
  }

  function loadTitle(load) {
    const where = isPool() && load.upstream ? ` on ${load.upstream}` : "";
    return `Loading ${load.model}${where}`;
  }

  function announce(text) {
    setText(el.loadsStatus, text);
  }

  function addLoad(key, load) {
    progress.loads.set(key, load);
    const about = load.expected ? `, expected to take about ${formatExpected(load.expected)}` : "";
    announce(`${loadTitle(load)}${about}.`);
  }

  // The loads of the `waiting` rows just read or received at `since` (of one host's, when
  // `upstream` names it): a load that an event began or ended after that stays as the event
  // left it.
  function syncLoads(since, upstream = null) {
    const now = performance.now();
    const seen = new Set();
    const rows = waitingRows().filter((row) => upstream === null || row.upstream === upstream);
    for (const row of rows) {
      if (row.state !== "loading") continue;
      const host = typeof row.upstream === "string" ? row.upstream : null;
      const key = loadKey(row.model, host);
      if ((progress.ended.get(key) ?? -Infinity) > since) continue;
      seen.add(key);
      const reported = seconds(row.loading_s) ?? 0;
      const expected = seconds(row.expected_load_s);
      const waiting = Number(row.waiting) || 0;
      const load = progress.loads.get(key);
      if (!load) {
        addLoad(key, {
          model: row.model,
          upstream: host,
          expected,
          base: reported,
          at: now,
          stamp: now,
          waiting,
          late: false,
        });
        continue;
      }
      // Catch up with the proxy's count; never step back by the time its answer took.
      const local = elapsedOf(load, now);
      if (reported > local || local - reported > 2) {
        load.base = reported;
        load.at = now;
      }
      load.expected = expected;
      load.waiting = waiting;
    }
    for (const [key, load] of progress.loads) {
      const mine = upstream === null || load.upstream === upstream;
      if (mine && !seen.has(key) && load.stamp <= since) progress.loads.delete(key);
    }
    for (const [key, when] of progress.ended) {
      if (when <= since) progress.ended.delete(key);
    }
  }

  // A `queue` event: one host's `waiting` rows, in place of those the page had.
  function applyQueueEvent(event) {
    if (!state.status || typeof event.upstream !== "string" || !Array.isArray(event.waiting)) {
      return;
    }
    const order = hostRows().map((host) => host.name);
    const rank = (row) => order.indexOf(row.upstream);
    const kept = waitingRows().filter((row) => row.upstream !== event.upstream);
    const rows = event.waiting.filter((row) => row && typeof row.model === "string");
    // Each host's rows one after another, in the configuration's order, as the status has them.
    state.status.waiting = [...kept, ...rows].sort((a, b) => rank(a) - rank(b));
    syncLoads(performance.now(), event.upstream);
    render();
  }

  // A `model` event: a load begins, or ends, on its host.
  function loadEvent(event) {
    if (typeof event.model !== "string") return;
    const upstream = typeof event.upstream === "string" ? event.upstream : null;
    const key = loadKey(event.model, upstream);
    const now = performance.now();
    if (event.state === "loading") {
      progress.ended.delete(key);
      const known = progress.loads.get(key);
      if (known) {
        known.stamp = now;
        known.expected = seconds(event.expected_load_s);
        return;
      }
      addLoad(key, {
        model: event.model,
        upstream,
        expected: seconds(event.expected_load_s),
        base: 0,
        at: now,
        stamp: now,
        waiting: 0,
        late: false,
      });
    } else if (ENDS_LOAD.has(event.state)) {
      progress.ended.set(key, now);
      progress.loads.delete(key);
    }
  }

  // What a load's line shows now: with an expected time, a bar filling up to it and the time
  // left; past it, or without one, an indeterminate bar and the time it has taken.
  function loadView(load, now) {
    const elapsed = elapsedOf(load, now);
    const expected = load.expected;
    const view = { title: loadTitle(load), waiting: load.waiting };
    if (expected === null) return { ...view, phase: "unknown", time: formatElapsed(elapsed) };
    if (elapsed < expected) {
      const time = formatLeft(expected - elapsed);
      return { ...view, phase: "estimate", value: elapsed, max: expected, time };
    }
    if (!load.late) {
      load.late = true;
      announce(`${view.title} is taking longer than usual.`);
    }
    const time = `taking longer than usual (${formatElapsed(elapsed)} so far)`;
    return { ...view, phase: "late", time };
  }

  function createLoadItem() {
    const li = document.createElement("li");
    li.className = "load";
    const id = ++progress.ids;
    const label = document.createElement("span");
    label.className = "load-label";
    label.id = `load-label-${id}`;
    const bar = document.createElement("progress");
    bar.setAttribute("aria-labelledby", label.id);
    bar.setAttribute("aria-describedby", `load-time-${id} load-waiting-${id}`);
    const time = document.createElement("span");
    time.className = "load-time";
    time.id = `load-time-${id}`;
    const waiting = document.createElement("span");
    waiting.className = "load-waiting";
    waiting.id = `load-waiting-${id}`;
    const head = document.createElement("span");
    head.className = "load-head";
    head.append(label, waiting);
    // This page's own load or unload of the line's model: it may stop waiting for it.
    const stop = document.createElement("button");
    stop.type = "button";
    stop.className = "secondary small stop";
    stop.textContent = "Stop waiting";
    stop.hidden = true;
    stop.addEventListener("click", () => stopWaiting(li.dataset.pending));
    const foot = document.createElement("span");
    foot.className = "load-foot";
    foot.append(time, stop);
    li.append(head, bar, foot);
    return { li, label, bar, time, waiting, stop };
  }

  // The proxy's load that carries out this page's `action` on `id`, if it shows.
  function loadOf(id, action) {
    if (action.action !== "load") return null;
    for (const [key, load] of progress.loads) {
      if (load.model === id && (!action.upstream || load.upstream === action.upstream)) {
        return key;
      }
    }
    return null;
  }

  function renderLoads() {
    const now = performance.now();
    const lines = [];
    const mine = new Map(); // the key of a proxy's load -> the id of this page's action on it
    for (const [id, action] of state.pending) {
      const key = loadOf(id, action);
      if (key !== null) {
        mine.set(key, id);
        // The page's line becomes the proxy's load: the same element, so focus stays on it.
        const item = progress.items.get(ownKey(id));
        if (item && !progress.items.has(key)) {
          progress.items.set(key, item);
          progress.items.delete(ownKey(id));
        }
        continue;
      }
      const time = formatElapsed((now - action.started) / 1000);
      lines.push([ownKey(id), { title: action.text, phase: "unknown", time, waiting: 0 }, id]);
    }
    for (const [key, load] of progress.loads) {
      lines.push([key, loadView(load, now), mine.get(key) ?? null]);
    }

    let previous = null;
    const seen = new Set();
    for (const [key, view, pending] of lines) {
      seen.add(key);
      let item = progress.items.get(key);
      if (!item) {
        item = createLoadItem();
        progress.items.set(key, item);
      }
      setText(item.label, view.title);
      item.li.dataset.phase = view.phase;
      if (view.phase === "estimate") {
        item.bar.max = view.max;
        item.bar.value = view.value;
      } else if (item.bar.hasAttribute("value")) {
        item.bar.removeAttribute("value"); // indeterminate
      }
      setText(item.time, view.time);
      setText(item.waiting, waitingText(view.waiting));
      item.waiting.hidden = !view.waiting;
      if (pending === null) {
        delete item.li.dataset.pending;
        item.stop.hidden = true;
      } else {
        item.li.dataset.pending = pending;
        item.stop.hidden = false;
        const action = state.pending.get(pending);
        const label = `Stop waiting for the ${action.action} of ${pending}`;
        if (item.stop.getAttribute("aria-label") !== label) {
          item.stop.setAttribute("aria-label", label);
        }
      }
      const expected = previous ? previous.nextSibling : el.loads.firstChild;
      if (expected !== item.li) {
        if (previous) previous.after(item.li);
        else el.loads.prepend(item.li);
      }
      previous = item.li;
    }
    for (const [key, item] of progress.items) {
      if (!seen.has(key)) {
        item.li.remove();
        progress.items.delete(key);
      }
    }
    el.progress.hidden = !lines.length;
    if (lines.length && progress.ticker === null) {
      progress.ticker = setInterval(renderLoads, TICK_MS);
    } else if (!lines.length && progress.ticker !== null) {
      clearInterval(progress.ticker);
      progress.ticker = null;
    }
  }

  // --- actions --------------------------------------------------------------------------------
  //
  // A load or unload from this page waits for the proxy's answer, which comes once the model is
  // loaded or unloaded. Meanwhile its line shows what it waits for, with a button to stop
  // waiting; every other action stays usable. One action per model at a time.

  // How long the events of an action the proxy has answered are still taken for its own.
  const LATE_EVENTS_MS = 5000;

  // Runs `work(signal)`, this page's `kind` ("load" or "unload") of `id`, shown as `text`.
  // `work` returns whether the proxy loaded or unloaded the model for it (then events tell of
  // it, before or after the answer).
  async function runAction(kind, id, upstream, text, work) {
    if (state.pending.has(id)) return;
    const controller = new AbortController();
    const action = {
      action: kind,
      upstream,
      text,
      controller,
      started: performance.now(),
      ended: false, // its last event came
    };
    state.pending.set(id, action);
    state.answered.delete(id);
    announce(`${text}.`);
    render();
    try {
      const changed = await work(controller.signal);
      if (changed && !action.ended) {
        state.answered.set(id, { action: kind, until: performance.now() + LATE_EVENTS_MS });
      }
    } catch (error) {
      if (controller.signal.aborted) {
        say(stoppedText(kind, id), "info", { model: id, kind: "stopped" });
      } else {
        say(`Could not ${kind} ${id}: ${(error && error.message) || error}`, "error");
      }
    } finally {
      if (state.pending.get(id) === action) state.pending.delete(id);
      render();
      scheduleRefresh(0);
    }
  }

  function stoppedText(kind, id) {
    if (kind === "load") {
      return (
        `Stopped waiting for ${id}. If its load had begun, the proxy finishes it; ` +
        "the line above shows it while it runs."
      );
    }
    return `Stopped waiting for ${id} to unload. The proxy still unloads it once its running requests finish.`;
  }

  // Stop waiting for this page's action on `id` (the proxy may go on with it: see above).
  function stopWaiting(id) {
    const action = id === undefined ? null : state.pending.get(id);
    if (action) action.controller.abort();
  }

  // Loads `id` where the proxy places it, or on the host named `upstream`.
  function loadModel(id, upstream = null) {
    const where = upstream ? ` on ${upstream}` : "";
    return runAction("load", id, upstream, `Loading ${id}${where}`, async (signal) => {
      state.errors.delete(id);
      say("", "info");
      const started = performance.now();
      const json = upstream ? { model_id: id, upstream } : { model_id: id };
      const response = await request("/api/v1/models/load", { method: "POST", json, signal });
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      if (response.ok) {
        const body = await response.json().catch(() => ({}));
        const already = typeof body.message === "string" && body.message.includes("already");
        if (el.picker.value !== id && state.models.some((m) => String(m.id) === id)) {
          el.picker.value = id; // the picker (and the chat) follow the model switched to
          state.pickerTouched = true;
        }
        say(
          already
            ? `Switched to ${id}${where} (it was already loaded).`
            : `Switched to ${id}${where} (loaded in ${seconds} s).`,
          "ok",
          { model: id, kind: "switched" },
        );
        return !already;
      }
      const error = await errorInfo(response);
      if (response.status !== 401) state.errors.set(id, error);
      if (error.code === NO_ROOM) {
        const pinned = state.models.some((m) => m.pinned);
        const hint = pinned ? " Unpinning a model makes room." : "";
        say(`No room for ${id}${where}: ${error.message}.${hint}`, "error", {
          model: id,
          kind: "failed",
        });
      } else {
        say(`Could not switch to ${id}${where}: ${error.message}`, "error", {
          model: id,
          kind: "failed",
        });
      }
      return response.status >= 500 && error.code !== NO_ROOM; // a load that LM Studio failed
    });
  }

  function unloadModel(id) {
    const text = `Unloading ${id} once its running requests finish`;
    return runAction("unload", id, null, text, async (signal) => {
      say("", "info");
      const response = await request("/api/v1/models/unload", {
        method: "POST",
        json: { model_id: id },
        signal,
      });
      if (response.ok) {
        const body = await response.json().catch(() => ({}));
        const notLoaded = typeof body.message === "string" && body.message.includes("not loaded");
        say(notLoaded ? `${id} was not loaded.` : `Unloaded ${id}.`, "ok", {
          model: id,
          kind: "unloaded",
        });
        return !notLoaded;
      }
      say(`Could not unload ${id}: ${await errorMessage(response)}`, "error");
      return false;
    });
  }

  async function setPinned(id, pinned, input) {
    const verb = pinned ? "pin" : "unpin";
    input.dataset.pending = "1";
    refreshSeq++; // a refresh already under way read the old state: its answer is dropped
    try {
      const response = await request(`/api/v1/models/${verb}`, {
        method: "POST",
        json: { model_id: id },
      });
      if (response.ok) {
        say(pinned ? `Pinned ${id}: it will not be evicted.` : `Unpinned ${id}.`, "ok");
      } else {
        input.checked = !pinned;
        say(`Could not ${verb} ${id}: ${await errorMessage(response)}`, "error");
      }
    } catch (error) {
      input.checked = !pinned;
      say(`Could not ${verb} ${id}: ${(error && error.message) || error}`, "error");
    } finally {
      refreshSeq++;
      delete input.dataset.pending;
    }
    scheduleRefresh(0);
  }

  // --- refresh after events (never on a timer) ------------------------------------------------

  let refreshTimer = null;
  let refreshDue = 0;
  let refreshSeq = 0;

  // At most one refresh per `delay`, however many events arrive (a throttle, so that a steady
  // stream of events cannot postpone it for ever).
  function scheduleRefresh(delay = 200) {
    const due = performance.now() + delay;
    if (refreshTimer !== null && refreshDue <= due) return;
    clearTimeout(refreshTimer);
    refreshDue = due;
    refreshTimer = setTimeout(() => {
      refreshTimer = null;
      refresh().catch(() => {
        // connection trouble shows in the live-updates state; nothing to add here
      });
    }, delay);
  }

  async function refresh() {
    const seq = ++refreshSeq;
    const since = performance.now();
    const [models, status] = await Promise.all([
      request("/api/v1/models"),
      request("/api/v1/status"),
    ]);
    const modelRows = models.ok ? await models.json() : null;
    const statusBody = status.ok ? await status.json() : null;
    if (seq !== refreshSeq) return;
    if (Array.isArray(modelRows)) state.models = modelRows;
    if (statusBody) {
      state.status = statusBody;
      syncLoads(since);
    }
    render();
  }

  // --- live events ----------------------------------------------------------------------------

  const live = {
    source: null,
    controller: null,
    attempt: 0,
    timer: null,
    generation: 0,
    connected: false,
  };

  function stopLive() {
    live.connected = false;
    clearTimeout(live.timer);
    live.timer = null;
    if (live.source) live.source.close();
    live.source = null;
    if (live.controller) live.controller.abort();
    live.controller = null;
  }

  function reconnectLater(generation) {
    if (generation !== live.generation) return;
    stopLive();
    const base = Math.min(15000, 500 * 2 ** live.attempt);
    const delay = Math.round(base * (0.8 + Math.random() * 0.4));
    live.attempt += 1;
    setPill(el.live, `reconnecting in ${Math.max(1, Math.round(delay / 1000))} s`, "warn");
    live.timer = setTimeout(connect, delay);
  }

  function onEvent(type, data) {
    let payload;
    try {
      payload = JSON.parse(data);
    } catch {
      return;
    }
    if (!payload || typeof payload !== "object") return;
    if (type === "snapshot") {
      live.attempt = 0;
      live.connected = true;
      setPill(el.live, "connected", "ok");
      if (Array.isArray(payload.models)) state.models = payload.models;
      if (payload.status) {
        state.status = payload.status;
        syncLoads(performance.now()); // the snapshot comes before every event that follows
      }
      render();
      scheduleUsage(0);
    } else if (type === "model") {
      applyModelEvent(payload);
    } else if (type === "queue") {
      applyQueueEvent(payload);
    } else if (type === "request") {
      addRequest(payload);
      scheduleRefresh(1000); // the requests running, the model's last use
      scheduleUsage(); // what the request's key used
    } else if (type === "upstream" || type === "capacity") {
      // A host went down or came back, or its capacity was learned: read the status again.
      scheduleRefresh(0);
    }
  }

  // Whether the host of a `model` event holds the model after it, by the event's state.
  const HOLDS = new Map([
    ["loading", true],
    ["loaded", true],
    ["draining", true],
    ["unloading", true],
    ["unloaded", false],
    ["failed", false],
  ]);
  // `model` events after which the page reads the models and the status again: what they
  // change (memory, instances, requests let through) only the proxy can add up. The others
  // are applied here, so that a load runs with no reads at all.
  const READ_AFTER = new Set(["loaded", "unloaded", "failed", "refused"]);

  function applyModelEvent(event) {
    if (typeof event.model !== "string") return;
    loadEvent(event);
    narrate(event);
    const row = state.models.find((m) => m.id === event.model);
    const host = typeof event.upstream === "string" ? event.upstream : null;
    const after = () => {
      render();
      if (READ_AFTER.has(event.state)) scheduleRefresh();
    };
    if (event.state === "pinned" || event.state === "unpinned") {
      if (row) row.pinned = event.state === "pinned";
      after();
      return;
    }
    // A failed unload leaves the model loaded; a failed load, absent.
    const loadFailed =
      (event.state === "failed" && event.loaded !== true) ||
      (event.state === "refused" && !event.making_room); // refused, and no room can be made
    if (loadFailed && typeof event.error === "string") {
      state.errors.set(event.model, { message: event.error, code: event.code || null });
    }
    if (event.state === "loading") holdOn(host, row);
    if (row && host && Array.isArray(row.upstreams) && HOLDS.has(event.state)) {
      // One host's event: the row (all hosts at once) follows it only where no other host
      // holds the model; the refresh that follows brings the rest.
      const others = row.upstreams.filter((name) => name !== host);
      const holds = event.state === "failed" ? !loadFailed : HOLDS.get(event.state);
      if (holds && !row.upstreams.includes(host)) row.upstreams = [...row.upstreams, host];
      if (!holds) row.upstreams = others;
      if (others.length) {
        after();
        return;
      }
    }
    if (loadFailed) {
      if (row) row.state = "absent";
    } else if (event.state !== "failed") {
      if (event.state === "loading" || event.state === "loaded") state.errors.delete(event.model);
      const phase = EVENT_PHASES[event.state];
      if (row && phase) row.state = phase;
      if (row && typeof event.loaded === "boolean") row.loaded = event.loaded;
    }
    after();
  }

  // A load begins on `host`: its memory and instances count the model from now on, as the
  // proxy's do (the status read after the load brings the proxy's own numbers).
  function holdOn(host, row) {
    const card = hostRows().find((h) => h.name === host);
    if (!card || !row || !Array.isArray(card.loaded) || card.loaded.includes(row.id)) return;
    card.loaded = [...card.loaded, row.id];
    card.instances = (Number(card.instances) || 0) + 1;
    card.bytes_used = (Number(card.bytes_used) || 0) + (Number(row.size_bytes) || 0);
  }

  // The message follows what happens to the models, wherever it was asked for: a load begins,
  // ends or fails, and a model it told of goes. This page's own actions say it themselves when
  // the proxy answers them.
  function narrate(event) {
    const id = event.model;
    const where = isPool() && typeof event.upstream === "string" ? ` on ${event.upstream}` : "";
    const own = ownAction(id, event);
    if (own) {
      if (LAST_EVENTS[own.action].has(event.state)) {
        own.ended = true;
        state.answered.delete(id);
      }
      return;
    }
    const told = state.banner && state.banner.model === id ? state.banner.kind : null;
    const about = (kind) => ({ model: id, kind });
    if (event.state === "loading") {
      const chatting = chat.controller !== null && chat.model === id;
      const why = chatting ? " for the chat" : ", asked for by a request, another tab or the API";
      say(`Loading ${id}${where}${why}.`, "info", about("loading"));
    } else if (event.state === "loaded" && event.adopted) {
      say(`${id} was loaded${where} outside the proxy; it is used as it is.`, "info", about("loaded"));
    } else if (event.state === "loaded") {
      const took = typeof event.load_s === "number" ? ` in ${event.load_s.toFixed(1)} s` : "";
      say(`Loaded ${id}${where}${took}.`, "ok", about("loaded"));
    } else if (event.state === "refused" && event.making_room) {
      say(`LM Studio${where} has no room for ${id}: making room, then loading it again.`, "info", about("refused"));
    } else if (event.state === "failed" || event.state === "refused") {
      const error = typeof event.error === "string" ? `: ${event.error}` : ".";
      const what = event.loaded === true ? "Unloading" : "Loading";
      say(`${what} ${id}${where} failed${error}`, "error", about("failed"));
    } else if (event.state === "draining" && told && told !== "failed") {
      const text = `${id}${where} takes no new requests: it is unloaded once its running requests finish.`;
      say(text, "info", about("draining"));
    } else if (event.state === "unloaded" && told && told !== "failed") {
      const why = UNLOAD_REASONS[event.reason] ? ` ${UNLOAD_REASONS[event.reason]}` : "";
      say(`${id} was unloaded${where}${why}.`, "info", about("unloaded"));
    }
  }

  // The states of a `model` event that tell of a load (the others, and a failure that leaves
  // the model loaded, of an unload).
  const LOAD_STATES = new Set(["loading", "loaded", "failed"]);
  const ofLoad = (event) => LOAD_STATES.has(event.state) && !(event.state === "failed" && event.loaded);
  // The events that end this page's load or unload.
  const LAST_EVENTS = {
    load: new Set(["loaded", "failed"]),
    unload: new Set(["unloaded", "failed"]),
  };

  // This page's action on `id` that a `model` event tells of, if any: one waiting for the
  // proxy's answer, or answered and its last event not come yet.
  function ownAction(id, event) {
    let action = state.pending.get(id);
    if (!action) {
      action = state.answered.get(id) || null;
      if (action && action.until < performance.now()) {
        state.answered.delete(id);
        action = null;
      }
    }
    if (!action || (action.action === "load") !== ofLoad(event)) return null;
    return action;
  }

  // --- recent requests (from `request` events) ------------------------------------------------

  const REQUESTS_KEPT = 10;

  function part(className, text) {
    const node = document.createElement("span");
    node.className = className;
    node.textContent = text;
    return node;
  }

  function addRequest(event) {
    const item = document.createElement("li");
    item.className = "request";
    const now = new Date();
    const time = document.createElement("time");
    time.dateTime = now.toISOString();
    time.textContent = now.toLocaleTimeString();
    const status = Number(event.status) || 0;
    const code = part("code", String(status || "?"));
    code.dataset.tone = status >= 500 ? "bad" : status >= 400 ? "warn" : "ok";
    const duration = Number(event.duration_ms);
    item.append(
      time,
      part("model-id", String(event.model || "-")),
      part("endpoint", String(event.endpoint || "")),
      code,
      part("duration", Number.isFinite(duration) ? `${Math.round(duration)} ms` : ""),
    );
    // The host that answered; "-" when none did (refused or failed before reaching one).
    const upstream = typeof event.upstream === "string" ? event.upstream : "-";
    const host = part("answered pool-only", "");
    if (upstream !== "-") {
      host.append(part("visually-hidden", "answered by "), part("tag", upstream));
    } else {
      host.textContent = "no host answered";
    }
    item.dataset.upstream = upstream;
    item.append(host);
    el.requests.prepend(item);
    while (el.requests.children.length > REQUESTS_KEPT) el.requests.lastChild.remove();
    el.requestsCard.hidden = false;
  }

  // --- usage by key (read again after `request` events, never on a timer) ----------------------

  const USAGE_EVERY_MS = 500; // at most one read this often, however many requests finish
  let usageTimer = null;
  let usageSeq = 0;

  function scheduleUsage(delay = USAGE_EVERY_MS) {
    if (usageTimer !== null) return; // a read is due: it will see this request too
    usageTimer = setTimeout(() => {
      usageTimer = null;
      refreshUsage().catch(() => {
        // connection trouble shows in the live-updates state; nothing to add here
      });
    }, delay);
  }

  async function refreshUsage() {
    const seq = ++usageSeq;
    const response = await request("/api/v1/usage");
    if (!response.ok) return;
    const body = await response.json();
    if (seq !== usageSeq || !body || typeof body.keys !== "object" || !body.keys) return;
    renderUsage(body.keys);
  }

  function formatCount(value) {
    const number = Number(value);
    return Number.isFinite(number) ? number.toLocaleString() : "—";
  }

  function formatSeconds(value) {
    const seconds = Number(value);
    if (!Number.isFinite(seconds)) return "—";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    if (seconds < 120) return `${Math.round(seconds)} s`;
    if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  function usageCell(text, title) {
    const cell = document.createElement("td");
    cell.className = "num";
    cell.textContent = text;
    if (title) cell.title = title;
    return cell;
  }

  function renderUsage(keys) {
    const rows = Object.entries(keys).map(([name, usage]) => {
      const row = document.createElement("tr");
      row.dataset.key = name;
      const head = document.createElement("th");
      head.scope = "row";
      head.textContent = name;
      const errors = usageCell(formatCount(usage.errors));
      if (Number(usage.errors) > 0) errors.dataset.tone = "warn";
      const waits = Number(usage.queue_waits);
      const mean = waits > 0 ? `${formatSeconds(usage.queue_wait_s / waits)} per request` : "";
      row.append(
        head,
        usageCell(formatCount(usage.requests)),
        errors,
        usageCell(formatCount(usage.prompt_tokens)),
        usageCell(formatCount(usage.completion_tokens)),
        usageCell(formatSeconds(usage.busy_s)),
        usageCell(formatSeconds(usage.queue_wait_s), mean),
      );
      return row;
    });
    el.usageBody.replaceChildren(...rows);
    el.usageCard.hidden = rows.length === 0;
  }

  async function connect() {
    stopLive();
    const generation = ++live.generation;
    setPill(el.live, "connecting…", "muted");
    let response;
    const since = performance.now();
    try {
      response = await request("/api/v1/status");
    } catch {
      if (generation !== live.generation) return;
      setPill(el.upstream, "proxy unreachable", "bad");
      reconnectLater(generation);
      return;
    }
    if (generation !== live.generation) return;
    if (response.status === 401) {
      setPill(el.live, "needs the admin key", "warn");
      el.adminKeyButton.hidden = false;
      return;
    }
    if (response.status === 403) {
      // Without admin keys the proxy answers management only on its own machine: retrying
      // cannot help. With a key sent, it is a named key that is not an admin key: another
      // key may be entered.
      const keyRefused = Boolean(getKey("admin"));
      setPill(el.live, keyRefused ? "the key is not an admin key" : "not allowed from here", "bad");
      setPill(el.upstream, "unknown", "muted");
      el.adminKeyButton.hidden = !keyRefused;
      say(await errorMessage(response), "error");
      return;
    }
    if (!response.ok) {
      setPill(el.live, `unavailable (HTTP ${response.status})`, "bad");
      say(await errorMessage(response), "error");
      reconnectLater(generation);
      return;
    }
    state.status = await response.json();
    syncLoads(since);
    renderStatus();
    renderLoads();
    const key = getKey("admin");
    if (key) streamWithFetch(generation, key);
    else streamWithEventSource(generation);
  }

  function streamWithEventSource(generation) {
    const source = new EventSource("/api/v1/events");
    live.source = source;
    for (const type of ["snapshot", "model", "queue", "request", "upstream", "capacity"]) {
      source.addEventListener(type, (event) => onEvent(type, event.data));
    }
    source.onerror = () => {
      if (live.source === source) reconnectLater(generation);
    };
  }

  // EventSource cannot send an Authorization header: read the stream with fetch() instead.
  async function streamWithFetch(generation, key) {
    const controller = new AbortController();
    live.controller = controller;
    try {
      const response = await fetch("/api/v1/events", {
        headers: { Authorization: `Bearer ${key}`, Accept: "text/event-stream" },
        signal: controller.signal,
        cache: "no-store",
      });
      if (response.status === 401) {
        if (getKey("admin") === key) setKey("admin", null);
        if (generation === live.generation) connect();
        return;
      }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      await readSse(response.body, onEvent);
    } catch {
      // the stream broke: reconnect below
    }
    if (!controller.signal.aborted) reconnectLater(generation);
  }

  // --- chat -----------------------------------------------------------------------------------

  function bubble(role, who, text) {
    const item = document.createElement("div");
    item.className = `bubble ${role}`;
    const label = document.createElement("span");
    label.className = "who";
    label.textContent = who;
    const body = document.createElement("p");
    body.className = "text";
    body.textContent = text;
    item.append(label, body);
    el.chatLog.append(item);
    el.chatLog.scrollTop = el.chatLog.scrollHeight;
    return { item, label, body };
  }

  function setChatBusy(busy) {
    el.chatLog.setAttribute("aria-busy", String(busy));
    el.chatStop.disabled = !busy;
    renderChatModel();
  }

  async function sendChat() {
    if (chat.controller) return;
    const model = selectedModel();
    const text = el.chatInput.value.trim();
    if (!model) {
      chatNote("Choose a model first.");
      return;
    }
    if (model.type === "embedding") return;
    if (!text) {
      chatNote("Type a message first.");
      el.chatInput.focus();
      return;
    }
    const id = String(model.id);
    el.chatInput.value = "";
    bubble("user", "You", text);
    const reply = bubble("assistant", id, "");
    reply.item.classList.add("pending");
    const node = document.createTextNode("");
    reply.body.append(node);
    chat.messages.push({ role: "user", content: text });
    const controller = new AbortController();
    chat.controller = controller;
    chat.model = id;
    setChatBusy(true);
    chatNote(`Waiting for ${id} (it is loaded first if needed)…`);
    let failed = null;
    try {
      const response = await request(
        "/v1/chat/completions",
        {
          method: "POST",
          json: { model: id, messages: chat.messages, stream: true },
          headers: { Accept: "text/event-stream" },
          signal: controller.signal,
        },
        "api",
      );
      if (!response.ok || !response.body) {
        failed = await errorMessage(response);
      } else {
        const host = response.headers.get("x-lmswitch-upstream");
        if (host && host !== "-" && isPool()) reply.label.textContent = `${id} on ${host}`;
        chatNote(`${id} is replying…`);
        await readSse(response.body, (type, data) => {
          if (data === "[DONE]") return;
          let chunk;
          try {
            chunk = JSON.parse(data);
          } catch {
            return;
          }
          if (chunk && chunk.error) {
            failed = chunk.error.message || String(chunk.error);
            return;
          }
          const choice = chunk && chunk.choices && chunk.choices[0];
          const delta = choice && choice.delta && choice.delta.content;
          if (typeof delta === "string" && delta) {
            node.appendData(delta);
            el.chatLog.scrollTop = el.chatLog.scrollHeight;
          }
        });
      }
    } catch (error) {
      failed = controller.signal.aborted ? "stopped" : (error && error.message) || String(error);
    } finally {
      chat.controller = null;
      reply.item.classList.remove("pending");
      setChatBusy(false);
    }
    if (node.data) chat.messages.push({ role: "assistant", content: node.data });
    else chat.messages.pop();
    if (failed === "stopped") {
      chatNote("Stopped.");
    } else if (failed) {
      reply.item.classList.add("failed");
      const error = document.createElement("p");
      error.className = "error-text";
      error.textContent = `Error: ${failed}`;
      reply.item.append(error);
      chatNote(`The chat failed: ${failed}`);
    } else {
      chatNote(`Reply from ${id} complete.`);
    }
  }

  // --- wiring ---------------------------------------------------------------------------------

  el.switchForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (el.switchButton.getAttribute("aria-disabled") === "true") {
      const why = el.switchButton.title || "Choose a model first"; // why nothing happens
      say(why.endsWith("…") ? why : `${why}.`, "info");
      return;
    }
    loadModel(el.picker.value);
  });

  el.picker.addEventListener("change", () => {
    state.pickerTouched = true;
    renderChatModel();
  });

  el.chatForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (el.chatSend.getAttribute("aria-disabled") === "true") return;
    sendChat();
  });

  el.chatInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      el.chatForm.requestSubmit();
    }
  });

  el.chatStop.addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
  });

  el.chatClear.addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.messages = [];
    el.chatLog.replaceChildren();
    chatNote("Conversation cleared.");
  });

  el.adminKeyButton.addEventListener("click", async () => {
    const key = await askKey("admin", false);
    if (key) {
      el.adminKeyButton.hidden = true;
      connect();
    }
  });

  window.addEventListener("pagehide", stopLive);
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) connect(); // back from the back/forward cache
  });
  setInterval(refreshTimes, 15000);
  connect();
})();
