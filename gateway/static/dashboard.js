// pagedserve live dashboard: plain JS + canvas, no dependencies, no network beyond this gateway.
// Reads server-sent events from dashboard/stream (one JSON snapshot each, see gateway/dashboard.py).
"use strict";

(function () {
  const HISTORY = 180;            // snapshots kept for the charts
  const MAX_TABLE_ROWS = 28;
  const state = { snapshots: 0, last: null, errors: 0, history: [] };
  window.__dashboard = state;     // for tests and the curious

  const $ = (id) => document.getElementById(id);
  const setText = (id, text) => { const el = $(id); if (el && el.textContent !== text) el.textContent = text; };

  function fmtNum(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "—";
    if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString("en-US");
    return v.toFixed(digits === undefined ? 1 : digits);
  }
  function fmtMs(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const ms = seconds * 1000;
    return ms >= 100 ? ms.toFixed(0) + " ms" : ms.toFixed(1) + " ms";
  }
  function fmtPct(frac, digits) {
    if (frac === null || frac === undefined) return "—";
    return (frac * 100).toFixed(digits === undefined ? 1 : digits) + "%";
  }

  // A stable colour per request: hues a golden angle apart in order of first sight, so requests
  // seen together get well separated colours; lightness alternates to separate them further.
  const colourCache = new Map();
  let colourCount = 0;
  function colourFor(id) {
    let c = colourCache.get(id);
    if (c) return c;
    const n = colourCount++;
    const hue = (n * 137.508 + 200) % 360;
    c = "hsl(" + hue.toFixed(0) + ", 72%, " + (n % 2 ? 62 : 52) + "%)";
    if (colourCache.size > 5000) colourCache.clear();
    colourCache.set(id, c);
    return c;
  }

  function prepCanvas(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width;
    const h = canvas.height / (canvas._ratio || 1);
    if (canvas._ratio !== ratio || canvas._w !== w) {
      canvas._ratio = ratio; canvas._w = w;
      canvas.width = Math.round(w * ratio);
      canvas.height = Math.round(h * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return { ctx, w, h };
  }

  function drawLines(canvas, series, rightSeries) {
    const { ctx, w, h } = prepCanvas(canvas);
    ctx.clearRect(0, 0, w, h);
    const pad = { l: 44, r: rightSeries ? 40 : 8, t: 8, b: 16 };
    const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
    const maxOf = (list) => Math.max(1e-9, ...list.flatMap((s) => s.values.filter((v) => v !== null)));
    const leftMax = niceMax(maxOf(series));
    const rightMax = rightSeries ? niceMax(maxOf(rightSeries)) : 1;
    ctx.strokeStyle = "#26304a"; ctx.fillStyle = "#8a95ad"; ctx.lineWidth = 1; ctx.font = "11px system-ui";
    for (let i = 0; i <= 4; i++) {
      const y = pad.t + ph - (ph * i) / 4;
      ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + pw, y); ctx.stroke();
      ctx.textAlign = "right"; ctx.fillText(fmtNum((leftMax * i) / 4, leftMax < 10 ? 1 : 0), pad.l - 4, y + 4);
      if (rightSeries) { ctx.textAlign = "left"; ctx.fillText(fmtNum((rightMax * i) / 4, 1), pad.l + pw + 4, y + 4); }
    }
    const plot = (s, max) => {
      const n = s.values.length;
      if (n < 2) return;
      ctx.strokeStyle = s.colour; ctx.lineWidth = 1.8; ctx.beginPath();
      let started = false;
      for (let i = 0; i < n; i++) {
        const v = s.values[i];
        if (v === null) continue;
        const x = pad.l + (pw * (HISTORY - n + i)) / (HISTORY - 1);
        const y = pad.t + ph - (ph * Math.min(v, max)) / max;
        if (!started) { ctx.moveTo(x, y); started = true; } else ctx.lineTo(x, y);
      }
      ctx.stroke();
    };
    series.forEach((s) => plot(s, leftMax));
    (rightSeries || []).forEach((s) => plot(s, rightMax));
  }

  function niceMax(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function drawBlockMap(snap, canvas = $("block-map"), area = 280) {
    const total = snap.num_kv_blocks || 0;
    // Cells sized so every usable block (ids 1..total) fits the canvas width at a readable height.
    const width = canvas.clientWidth || canvas.width;
    let cell = Math.floor(Math.sqrt((width * area) / Math.max(1, total)));
    cell = Math.max(2, Math.min(34, cell));
    const cols = Math.max(1, Math.floor(width / cell));
    const rows = Math.ceil(total / cols);
    const height = Math.max(40, rows * cell);
    if (Math.abs(canvas.height / (canvas._ratio || 1) - height) > 0.5) { canvas.height = height * (canvas._ratio || 1); canvas.style.height = height + "px"; }
    const { ctx, w, h } = prepCanvas(canvas);
    ctx.clearRect(0, 0, w, h);
    const gap = cell >= 6 ? 1 : 0;
    ctx.fillStyle = "#1f2840";
    for (let i = 0; i < total; i++) {
      ctx.fillRect((i % cols) * cell, Math.floor(i / cols) * cell, cell - gap, cell - gap);
    }
    const reqs = snap.requests || [];
    for (const [blockId, ref, cached, holders] of snap.blocks || []) {
      const i = blockId - 1;
      if (i < 0 || i >= total) continue;
      const x = (i % cols) * cell, y = Math.floor(i / cols) * cell, s = cell - gap;
      if (ref > 0 && holders.length) ctx.fillStyle = colourFor(reqs[holders[0]].id);
      else if (ref > 0) ctx.fillStyle = "#c08cff";
      else ctx.fillStyle = "#5d6680";          // cached prefix nobody holds (evictable)
      ctx.fillRect(x, y, s, s);
      if (ref > 1) {                            // shared prefix block: white stripes + outline
        ctx.save(); ctx.beginPath(); ctx.rect(x, y, s, s); ctx.clip();
        ctx.strokeStyle = "rgba(255,255,255,0.85)"; ctx.lineWidth = Math.max(1, s / 8);
        for (let d = -s; d < s; d += Math.max(3, s / 3)) { ctx.beginPath(); ctx.moveTo(x + d, y + s); ctx.lineTo(x + d + s, y); ctx.stroke(); }
        ctx.restore();
      } else if (cached && ref > 0 && cell >= 8) { // registered in the prefix cache: a small dot
        ctx.fillStyle = "rgba(255,255,255,0.8)"; ctx.fillRect(x + s - 3, y + 1, 2, 2);
      }
    }
  }

  function renderTable(snap) {
    const body = $("req-table");
    const reqs = (snap.requests || []).slice().sort((a, b) => b.blocks.length - a.blocks.length);
    setText("req-count", reqs.length + (reqs.length === 1 ? " request" : " requests"));
    const rows = reqs.slice(0, MAX_TABLE_ROWS).map((r) => {
      const tr = document.createElement("tr");
      const sw = document.createElement("td");
      const i = document.createElement("i"); i.className = "sw"; i.style.background = colourFor(r.id); sw.appendChild(i);
      tr.appendChild(sw);
      const cells = [r.id.length > 26 ? r.id.slice(0, 12) + "…" + r.id.slice(-12) : r.id, r.status,
                     String(r.prompt), String(r.output), String(r.blocks.length)];
      for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
      tr.title = r.id;
      return tr;
    });
    body.replaceChildren(...rows);
  }

  // Several scheduler replicas: one card with its numbers and its own KV block map each.
  function renderReplicas(snap) {
    const section = $("replicas");
    const reps = snap.replicas || [];
    section.hidden = reps.length < 2;
    if (section.hidden) return;
    setText("replica-count", reps.length + " replicas; main view: " + (snap.replica || "—"));
    const list = $("replica-list");
    while (list.children.length > reps.length) list.lastChild.remove();
    reps.forEach((r, i) => {
      let card = list.children[i];
      if (!card) {
        card = document.createElement("div");
        card.className = "replica";
        const title = document.createElement("div"); title.className = "replica-title";
        const hint = document.createElement("div"); hint.className = "hint";
        const canvas = document.createElement("canvas"); canvas.width = 420; canvas.height = 120;
        card.append(title, hint, canvas);
        list.append(card);
      }
      const [title, hint, canvas] = card.children;
      const up = r.healthy && !r.error;
      title.textContent = (up ? "● " : "○ ") + r.address;
      title.className = "replica-title " + (up ? "on" : "off");
      if (r.error || r.num_kv_blocks === undefined) {
        hint.textContent = (r.error || r.reason || "no snapshot") + " · " + r.in_flight + " in flight here";
        canvas.hidden = true;
        return;
      }
      canvas.hidden = false;
      hint.textContent = r.running + " running, " + r.waiting + " waiting · KV " + fmtPct(r.kv_usage, 1) +
        " · prefix hits " + fmtPct(r.prefix_hit_rate, 1) + " · " + r.in_flight + " in flight here" +
        (r.healthy ? "" : " · out of rotation: " + r.reason);
      drawBlockMap(r, canvas, 110);
    });
  }

  function render(snap, fromStream) {
    setText("model", snap.model || "—");
    setText("blocks-meta", (snap.num_kv_blocks || 0).toLocaleString("en-US") + " KV blocks × " + snap.block_size + " tokens");
    setText("req-rate", fmtNum(snap.req_per_s, 2));
    setText("req-total", (snap.finished_total || 0).toLocaleString("en-US") + " finished");
    setText("gen-tps", fmtNum(snap.gen_tps, 1));
    setText("gen-total", (snap.generation_tokens_total || 0).toLocaleString("en-US") + " tokens");
    setText("prompt-tps", fmtNum(snap.prompt_tps, 1));
    setText("prompt-total", (snap.prompt_tokens_total || 0).toLocaleString("en-US") + " tokens");
    setText("running", String(snap.running));
    setText("waiting", String(snap.waiting));
    setText("step", "last step " + snap.step_seqs + " seqs / " + snap.step_tokens + " tokens");
    setText("preempted", String(snap.preempted));
    setText("preempt-total", (snap.num_preemptions_total || 0) + " preemptions so far");
    setText("kv-usage", fmtPct(snap.kv_usage, 1));
    const kv = snap.kv || {};
    setText("kv-used", (kv.used_blocks || 0) + " of " + (snap.num_kv_blocks || 0) + " blocks");
    setText("prefix-hit", snap.prefix_hit_rate_recent === null ? "—" : fmtPct(snap.prefix_hit_rate_recent, 1));
    setText("prefix-hit-all", fmtPct(snap.prefix_hit_rate, 1) + " overall (" + (snap.prefix_cache_hits || 0).toLocaleString("en-US") + " tokens)");
    setText("waste", (kv.waste_pct || 0).toFixed(1) + "%");
    setText("waste-detail", (kv.slots - kv.filled_slots || 0) + " of " + (kv.slots || 0) + " slots allocated but empty");
    setText("map-detail", (kv.used_blocks || 0) + " blocks in use, " + (kv.shared_blocks || 0) + " shared, " +
      (kv.cached_free_blocks || 0) + " cached and evictable, " + Math.max(0, (snap.num_kv_blocks || 0) - (kv.used_blocks || 0) - (kv.cached_free_blocks || 0)) + " free");
    const lat = snap.latency || {};
    for (const k of ["ttft", "itl", "e2e"]) {
      const v = lat[k] || {};
      setText(k + "-p50", fmtMs(v.p50)); setText(k + "-p90", fmtMs(v.p90)); setText(k + "-p99", fmtMs(v.p99));
      setText(k + "-n", String(v.n || 0));
    }
    setText("lat-window", "last " + (lat.window_s || 60) + " s, this gateway");
    setText("status", snap.executor_healthy ? "live" : "executor unavailable");
    $("status-dot").className = "dot " + (snap.executor_healthy ? "on" : "off");

    const hist = state.history;
    if (fromStream) hist.push({ gen: snap.gen_tps || 0, prompt: snap.prompt_tps || 0, req: snap.req_per_s || 0,
                running: snap.running, waiting: snap.waiting });
    while (hist.length > HISTORY) hist.shift();
    drawLines($("tput-chart"),
      [{ colour: "#4cc38a", values: hist.map((p) => p.gen) }, { colour: "#5aa9ff", values: hist.map((p) => p.prompt) }],
      [{ colour: "#f5b44c", values: hist.map((p) => p.req) }]);
    drawLines($("queue-chart"),
      [{ colour: "#4cc38a", values: hist.map((p) => p.running) }, { colour: "#f0715f", values: hist.map((p) => p.waiting) }]);
    drawBlockMap(snap);
    renderTable(snap);
    renderReplicas(snap);
  }

  function connect() {
    const es = new EventSource("dashboard/stream");
    es.onopen = () => { setText("status", "connected"); };
    es.onmessage = (ev) => {
      let snap;
      try { snap = JSON.parse(ev.data); } catch (e) { state.errors++; return; }
      if (snap.error) {
        setText("status", snap.error); $("status-dot").className = "dot off";
        return;
      }
      state.snapshots++;
      state.last = snap;
      render(snap, true);
    };
    es.onerror = () => { setText("status", "reconnecting…"); $("status-dot").className = "dot off"; };
  }

  window.addEventListener("resize", () => { if (state.last) render(state.last, false); });
  connect();
})();
