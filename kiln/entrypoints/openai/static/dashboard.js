// kiln's dashboard: polls /ui/api/stats once a second (rates and percentiles over the server's
// 10 s window) and draws the last two minutes as SVG lines; /ui/api/config fills the table.
"use strict";
(function () {
  const POLL_MS = 1000, KEEP = 120, SVG = "http://www.w3.org/2000/svg";
  const COLOURS = ["#b4532a", "#2471a3", "#229954"];
  const ms = (s) => (s === null || s === undefined ? null : s * 1000);
  const pct = (x) => (x === null || x === undefined ? null : x * 100);
  // one chart per entry: [id, title, unit, [[series label, value from a poll], ...]]
  const CHARTS = [
    ["tok_s", "output tokens/s", "tok/s", [["output", (d) => d.output_tok_s]]],
    ["requests", "requests running / waiting", "", [["running", (d) => d.running], ["waiting", (d) => d.waiting]]],
    ["ttft", "time to first token", "ms", [["p50", (d) => ms(d.ttft_p50_s)], ["p95", (d) => ms(d.ttft_p95_s)], ["p99", (d) => ms(d.ttft_p99_s)]]],
    ["itl", "inter-token latency", "ms", [["p50", (d) => ms(d.itl_p50_s)], ["p95", (d) => ms(d.itl_p95_s)], ["p99", (d) => ms(d.itl_p99_s)]]],
    ["kv", "KV cache blocks in use", "blocks", [["in use", (d) => d.kv_blocks_in_use]]],
    ["prefix", "prefix-cache hit rate", "%", [["hit rate", (d) => pct(d.prefix_hit_rate)]]],
    ["spec", "speculative acceptance", "%", [["accepted", (d) => pct(d.spec_acceptance)]]],
  ];
  const history = []; // the polls kept, oldest first
  const charts = {};

  function make(tag, attrs, parent) {
    const node = document.createElementNS(SVG, tag);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  for (const [id, title, unit, series] of CHARTS) {
    const box = document.createElement("div");
    box.className = "chart";
    box.id = "chart-" + id;
    const h = document.createElement("h2");
    const name = document.createElement("span");
    name.textContent = title;
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = "–";
    h.append(name, value);
    const svg = make("svg", { viewBox: "0 0 300 100", preserveAspectRatio: "none" });
    const legend = document.createElement("div");
    legend.className = "legend";
    const lines = series.map(([label], i) => {
      const span = document.createElement("span");
      span.style.color = COLOURS[i];
      span.textContent = "■ " + label;
      legend.appendChild(span);
      return make("polyline", { fill: "none", stroke: COLOURS[i], "stroke-width": 1.5, "vector-effect": "non-scaling-stroke" }, svg);
    });
    const top = make("text", { x: 2, y: 9, "font-size": 8, fill: "#888" }, svg);
    box.append(h, svg, legend);
    document.getElementById("charts").appendChild(box);
    charts[id] = { box, value, lines, top, unit, series };
  }

  function fmt(x) {
    if (x === null || x === undefined) return "–";
    return Number.isInteger(x) || x >= 100 ? x.toFixed(0) : x.toFixed(x >= 10 ? 1 : 2);
  }
  // the newest value a series has (a percentile is null while its window saw no new request)
  function latest(f) {
    for (let j = history.length - 1; j >= 0; j--) { const v = f(history[j]); if (v !== null && v !== undefined) return v; }
    return null;
  }
  function draw() {
    for (const id in charts) {
      const c = charts[id];
      const values = c.series.map(([, f]) => history.map(f));
      const all = values.flat().filter((v) => v !== null && v !== undefined);
      const max = Math.max(1e-9, ...all) * 1.1;
      let drawn = 0;
      values.forEach((vals, i) => {
        const pts = [];
        // x: poll index, stretched over the width until KEEP polls fill it
        const span = Math.max(history.length - 1, 1);
        vals.forEach((v, j) => { if (v !== null && v !== undefined) pts.push(((j / span) * 300).toFixed(1) + "," + (100 - (v / max) * 95).toFixed(1)); });
        c.lines[i].setAttribute("points", pts.join(" "));
        drawn += pts.length;
      });
      c.top.textContent = all.length ? fmt(max / 1.1) + " " + c.unit : "no data yet";
      const now = c.series.map(([label, f]) => (c.series.length > 1 ? label + " " : "") + fmt(latest(f))).join(" · ");
      c.value.textContent = now + (c.unit && c.unit !== "blocks" ? " " + c.unit : "");
      c.box.dataset.points = drawn; // how many points are plotted (the browser test watches it grow)
    }
    const last = history[history.length - 1];
    if (last) charts.kv.value.textContent = fmt(last.kv_blocks_in_use) + " of " + fmt(last.kv_blocks_total) + " blocks";
  }
  async function poll() {
    try {
      const r = await fetch("/ui/api/stats", { cache: "no-store" });
      if (!r.ok) throw new Error(r.status + " " + r.statusText);
      history.push(await r.json());
      if (history.length > KEEP) history.shift();
      draw();
      const f = history[history.length - 1].finished;
      document.getElementById("status").textContent = "finished: " + f.stop + " stop, " + f.length + " length, " + f.abort + " aborted, " + f.error + " errors";
    } catch (e) {
      document.getElementById("status").textContent = "stats: " + e.message;
    }
  }
  async function loadConfig() {
    const r = await fetch("/ui/api/config");
    const cfg = await r.json();
    if (cfg.loaded === false) { setTimeout(loadConfig, 2000); }
    const rows = Object.entries(cfg).map(([k, v]) => {
      const tr = document.createElement("tr");
      const a = document.createElement("td");
      const b = document.createElement("td");
      a.textContent = k.replace(/_/g, " ");
      b.textContent = Array.isArray(v) ? v.join("\n") : v !== null && typeof v === "object" ? Object.entries(v).map(([x, y]) => x + ": " + y).join(", ") : String(v);
      b.style.whiteSpace = "pre-wrap";
      tr.append(a, b);
      return tr;
    });
    document.getElementById("config").replaceChildren(...rows);
  }
  draw();
  poll();
  setInterval(poll, POLL_MS);
  loadConfig();
  setInterval(loadConfig, 10000); // the decode step and kernel lines change once the first steps ran
})();
