// The loopscope report: one page, no server. The data (report/data.py) sits in a JSON script tag; each run's arrays
// are decoded the first time the run is shown. A run longer than `window` tokens gets an overview (each row a
// block of tokens, coloured by its slowest token) beside a full-resolution window of `window` rows: both stay a few
// hundred thousand cells whatever the run's length, which keeps hover and redraw quick.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("loopscope-data").textContent);
  const WINDOW = DATA.window;
  const OVERVIEW_ROWS = DATA.overview_rows;
  const CONFIG = { displaylogo: false, responsive: true, toImageButtonOptions: { format: "png", scale: 2 } };
  const decoded = new Map();
  let current = null; // the decoded view shown
  let start = 0; // first token of the window

  // ---- data -------------------------------------------------------------------------------------------------
  function unpack(array) {
    const text = atob(array.b64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return array.dtype === "i4" ? new Int32Array(bytes.buffer) : new Float32Array(bytes.buffer);
  }

  function decode(index) {
    if (decoded.has(index)) return decoded.get(index);
    const raw = DATA.runs[index];
    const v = Object.assign({}, raw, { index: index, T: raw.shape[0], K: raw.shape[1] });
    for (const name of ["token_ids", "positions", "last", "iterations", "distance", "step_delta", "pca", "explained"]) {
      v[name] = unpack(raw[name]);
    }
    if (raw.lens) {
      v.lens = Object.assign({}, raw.lens);
      for (const name of ["top_ids", "top_probs", "kl_final"]) v.lens[name] = unpack(raw.lens[name]);
    }
    // One colour scale per run: log10 of the distance, an exact zero (a token's last step against its own final
    // state) shown at the smallest positive distance, as the PNG heatmap does by default.
    let low = Infinity, high = -Infinity;
    for (const d of v.distance) if (d > 0 && isFinite(d)) { low = Math.min(low, d); high = Math.max(high, d); }
    if (!isFinite(low)) { low = 1; high = 10; }
    v.zmin = Math.log10(low);
    v.zmax = Math.max(Math.log10(high), v.zmin + 1e-6);
    decoded.set(index, v);
    return v;
  }

  function valid(v, t, k) {
    return k <= v.last[t] && !Number.isNaN(v.distance[t * v.K + k]);
  }

  function logDistance(v, t, k) {
    const d = v.distance[t * v.K + k];
    return Math.log10(d > 0 ? d : Math.pow(10, v.zmin));
  }

  // ---- text -------------------------------------------------------------------------------------------------
  function number(x) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a >= 1e-3 && a < 1e4 ? x.toPrecision(4) : x.toExponential(3);
  }

  // Plotly reads a few HTML tags in its labels: a token's own text is shown as text, never as markup.
  function plotText(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  // A token as quoted text with invisible format characters (bidi overrides, U+2028/9) escaped, as its axis labels
  // are: a right-to-left override would otherwise reorder the rest of the line.
  function quoted(text) {
    return JSON.stringify(text).replace(/[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu, (c) => {
      const code = c.codePointAt(0).toString(16);
      return code.length > 4 ? "\\U" + code.padStart(8, "0") : "\\u" + code.padStart(4, "0");
    });
  }

  function tokenName(v, t) {
    const label = v.labels[t];
    return label ? label : "id " + v.token_ids[t];
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function colourBar(v, title) {
    const ticks = [];
    for (let e = Math.ceil(v.zmin); e <= Math.floor(v.zmax); e++) ticks.push(e);
    if (ticks.length === 0) ticks.push(v.zmin);
    return {
      title: { text: title, side: "right" },
      tickvals: ticks,
      ticktext: ticks.map((e) => (Number.isInteger(e) ? "1e" + e : number(Math.pow(10, e)))),
    };
  }

  // Steps and iterations are whole numbers: ticks every step on a short axis, whole numbers only on a long one.
  function integerAxis(count, title) {
    return { title: { text: title }, dtick: count > 20 ? undefined : 1, tickformat: "d", zeroline: false };
  }

  // Each run's own axis: runs of one capture may store steps with different strides.
  function stepAxis(v) {
    return integerAxis(v.K, v.steps_label);
  }

  // ---- the full-resolution window -------------------------------------------------------------------------------
  function drawWindow() {
    const v = current;
    const end = Math.min(v.T, start + WINDOW);
    const z = [], custom = [], rows = [];
    for (let t = start; t < end; t++) {
      const zRow = [], cRow = [];
      const name = plotText(tokenName(v, t));
      for (let k = 0; k < v.K; k++) {
        if (!valid(v, t, k)) { zRow.push(null); cRow.push(null); continue; }
        zRow.push(logDistance(v, t, k));
        cRow.push([t, name, v.positions[t], v.iterations[t * v.K + k], number(v.distance[t * v.K + k]),
          number(v.step_delta[t * v.K + k])]);
      }
      z.push(zRow); custom.push(cRow); rows.push(t);
    }
    const every = Math.max(1, Math.ceil(rows.length / 40));
    const ticks = rows.filter((t, i) => i % every === 0);
    const shapes = [];
    if (v.prompt !== null && v.prompt > start && v.prompt < end) {
      shapes.push({ type: "line", xref: "paper", x0: 0, x1: 1, y0: v.prompt - 0.5, y1: v.prompt - 0.5,
        line: { color: "red", width: 2 } });
    }
    const trace = {
      type: "heatmap", z: z, y: rows, x: [...Array(v.K).keys()], customdata: custom,
      colorscale: "Viridis", zmin: v.zmin, zmax: v.zmax, hoverongaps: false,
      colorbar: colourBar(v, "||s − s*|| (" + v.space_name + ")"),
      hovertemplate: "token %{customdata[0]}: %{customdata[1]}<br>position %{customdata[2]}" +
        "<br>iteration %{customdata[3]}<br>||s − s*|| = %{customdata[4]}<br>step size %{customdata[5]}<extra></extra>",
    };
    const layout = {
      title: { text: plotText(v.label) },
      height: Math.max(320, Math.min(760, 140 + rows.length * 14)),
      margin: { l: 170, r: 20, t: 50, b: 50 },
      xaxis: stepAxis(v),
      yaxis: { autorange: "reversed", tickvals: ticks, ticktext: ticks.map((t) => plotText(tokenName(v, t)) + "  " + t),
        title: { text: "token" } },
      shapes: shapes,
    };
    Plotly.react("heatmap", [trace], layout, CONFIG);
    document.getElementById("window-text").textContent =
      "tokens " + start + "–" + (end - 1) + " of " + v.T + (v.prompt !== null ? " (prompt: 0–" + (v.prompt - 1) + ")" : "");
    document.getElementById("prev").disabled = start === 0;
    document.getElementById("next").disabled = end >= v.T;
    if (v.T > WINDOW) markWindow();
  }

  function setWindow(first) {
    start = Math.max(0, Math.min(first, Math.max(0, current.T - WINDOW)));
    drawWindow();
  }

  // ---- the overview of a long run -----------------------------------------------------------------------------
  function drawOverview() {
    const v = current;
    const block = Math.ceil(v.T / OVERVIEW_ROWS);
    const z = [], custom = [], rows = [];
    for (let b = 0; b < v.T; b += block) {
      const end = Math.min(v.T, b + block);
      const zRow = [], cRow = [];
      for (let k = 0; k < v.K; k++) {
        let worst = -Infinity, who = -1;
        for (let t = b; t < end; t++) {
          if (valid(v, t, k) && logDistance(v, t, k) > worst) { worst = logDistance(v, t, k); who = t; }
        }
        zRow.push(who < 0 ? null : worst);
        cRow.push(who < 0 ? null : [b + "–" + (end - 1), who, plotText(tokenName(v, who)), number(v.distance[who * v.K + k])]);
      }
      z.push(zRow); custom.push(cRow); rows.push(b);
    }
    const trace = {
      type: "heatmap", z: z, y: rows, x: [...Array(v.K).keys()], customdata: custom,
      colorscale: "Viridis", zmin: v.zmin, zmax: v.zmax, hoverongaps: false, showscale: false,
      hovertemplate: "tokens %{customdata[0]}<br>slowest: token %{customdata[1]} %{customdata[2]}" +
        "<br>iteration %{x}: ||s − s*|| = %{customdata[3]}<extra>click: show these tokens</extra>",
    };
    const layout = {
      height: 620, margin: { l: 60, r: 10, t: 20, b: 50 }, xaxis: stepAxis(v),
      yaxis: { autorange: "reversed", title: { text: "token" } }, shapes: [],
    };
    const overview = document.getElementById("overview");
    Plotly.react(overview, [trace], layout, CONFIG);
    if (!overview.dataset.listening) {  // Plotly gives a div its .on() at the first draw; listeners outlive redraws
      overview.on("plotly_click", (event) => setWindow(event.points[0].y));
      overview.dataset.listening = "true";
    }
    document.getElementById("overview-hint").textContent =
      "each row: " + (block === 1 ? "1 token" : block + " tokens, coloured by the slowest of them") +
      "; click a row to show it on the right";
  }

  function markWindow() {
    const end = Math.min(current.T, start + WINDOW);
    Plotly.relayout("overview", { shapes: [{ type: "rect", xref: "paper", x0: 0, x1: 1, y0: start - 0.5, y1: end - 0.5,
      line: { color: "red", width: 2 }, fillcolor: "rgba(0,0,0,0)" }] });
  }

  // ---- the token panel --------------------------------------------------------------------------------------
  function showToken(t) {
    const v = current;
    if (!(t >= 0 && t < v.T)) return;
    const panel = document.getElementById("token-panel");
    panel.hidden = false;
    const text = v.tokens[t];
    document.getElementById("token-title").textContent =
      "Token " + t + ": " + (text ? quoted(text) : "id " + v.token_ids[t]);
    const part = v.prompt === null ? "" : t < v.prompt ? " · prompt" : " · generated";
    document.getElementById("token-facts").textContent = "position " + v.positions[t] + " · id " + v.token_ids[t] +
      " · " + v.iterations[t * v.K + v.last[t]] + " iterations" + part + " · " + v.label;
    const ks = [], its = [], dist = [], step = [], pc1 = [], pc2 = [];
    for (let k = 0; k <= v.last[t]; k++) {
      const i = t * v.K + k;
      ks.push(k); its.push(v.iterations[i]);
      dist.push(v.distance[i] > 0 ? v.distance[i] : null);
      step.push(v.step_delta[i] > 0 ? v.step_delta[i] : null);
      pc1.push(v.pca[2 * i]); pc2.push(v.pca[2 * i + 1]);
    }
    Plotly.react("token-curves", [
      { x: its, y: dist, name: "||s − s*||", mode: "lines+markers", hovertemplate: "iteration %{x}: %{y:.4g}" },
      { x: its, y: step, name: "step size ||s_k − s_(k−1)||", mode: "lines+markers", hovertemplate: "iteration %{x}: %{y:.4g}" },
    ], { title: panelTitle("distance to s* and step size"), height: 380, margin: { t: 50, b: 50 },
      xaxis: integerAxis(its[its.length - 1] + 1, "iteration"),
      yaxis: { type: "log", title: { text: "distance (" + v.space_name + ")" } },
      legend: { orientation: "h", y: -0.25 } }, CONFIG);
    const explained = [v.explained[2 * t], v.explained[2 * t + 1]].map((e) => (100 * e).toPrecision(3) + "%");
    Plotly.react("token-pca", [{
      x: pc1, y: pc2, mode: "lines+markers", customdata: its, hovertemplate: "iteration %{customdata}<extra></extra>",
      line: { color: "#bbb" },
      marker: { color: ks.map((k) => Math.log2(k + 1)), colorscale: "Viridis", size: 7,
        colorbar: { title: { text: "step" }, tickvals: stepTicks(ks.length).map((k) => Math.log2(k + 1)),
          ticktext: stepTicks(ks.length).map(String) } },
    }], { title: panelTitle("trajectory in its own principal components"), height: 380, margin: { t: 50, b: 50 },
      xaxis: { title: { text: "PC1 (" + explained[0] + ")" } }, yaxis: { title: { text: "PC2 (" + explained[1] + ")" } },
      showlegend: false }, CONFIG);
    drawLens(v, t);
  }

  // Titles on the left: the tool buttons sit on the right of the same line.
  function panelTitle(text) {
    return { text: text, x: 0.01, xanchor: "left" };
  }

  // Late steps crowd around s*: steps are coloured on a log scale, labelled 0, 1, 3, 7, ... up to the last.
  function stepTicks(count) {
    const ticks = [];
    for (let k = 0; k < count - 1; k = 2 * k + 1) ticks.push(k);
    if (count > 1 && (count - 1) - ticks[ticks.length - 1] > (count - 1) / 4) ticks.push(count - 1);
    return ticks;
  }

  function drawLens(v, t) {
    const box = document.getElementById("token-lens");
    box.replaceChildren();
    if (!v.lens) return;
    const lens = v.lens, k = lens.top_k;
    box.appendChild(element("h3", "What each step would predict next (" + lens.kind + " lens, top " + k + ")"));
    const table = element("table", undefined, "lens");
    const head = element("tr");
    for (const name of ["iteration", "top 1", ...[...Array(k - 1).keys()].map((j) => "top " + (j + 2)), "KL to last step"]) {
      head.appendChild(element("th", name));
    }
    table.appendChild(head);
    let previous = null;
    for (let s = 0; s <= v.last[t]; s++) {
      const row = element("tr");
      const base = (t * v.K + s) * k;
      row.appendChild(element("td", String(v.iterations[t * v.K + s])));
      for (let j = 0; j < k; j++) {
        const id = lens.top_ids[base + j];
        const word = lens.vocab[String(id)] ?? "id " + id;
        // id -1 within a token's steps: a NaN or infinite state, which predicts nothing
        const shown = id < 0 ? (j === 0 ? "no prediction (NaN state)" : "–")
          : quoted(word) + " " + (100 * lens.top_probs[base + j]).toFixed(1) + "%";
        const cell = element("td", shown, j === 0 ? "top1" : "");
        row.appendChild(cell);
      }
      row.appendChild(element("td", number(lens.kl_final[t * v.K + s]), "p"));
      if (previous !== null && previous !== lens.top_ids[base]) row.className = "changed";
      previous = lens.top_ids[base];
      table.appendChild(row);
    }
    box.appendChild(table);
  }

  // ---- wiring -----------------------------------------------------------------------------------------------
  function selectRun(index) {
    current = decode(index);
    start = 0;
    const long = current.T > WINDOW;
    document.getElementById("overview-section").hidden = !long;
    document.querySelector("main").classList.toggle("with-overview", long);
    document.getElementById("run-summary").textContent = current.T + " tokens · " + current.K + " stored steps · " +
      current.space + (long ? " · long run: overview on the left, " + WINDOW + " tokens at a time on the right" : "");
    const notes = document.getElementById("notes");
    notes.replaceChildren(...DATA.notes.concat(current.notes).map((n) => element("li", n)));
    document.getElementById("token-panel").hidden = true;
    if (long) drawOverview();
    drawWindow();
  }

  function init() {
    document.title = DATA.title;
    document.getElementById("title").textContent = DATA.title;
    document.getElementById("source").textContent = DATA.source;
    const select = document.getElementById("run-select");
    DATA.runs.forEach((run, i) => select.appendChild(Object.assign(element("option", run.label), { value: String(i) })));
    select.addEventListener("change", () => selectRun(Number(select.value)));
    document.getElementById("prev").addEventListener("click", () => setWindow(start - Math.floor(WINDOW / 2)));
    document.getElementById("next").addEventListener("click", () => setWindow(start + Math.floor(WINDOW / 2)));
    document.getElementById("goto").addEventListener("change", (event) => {
      const t = Number(event.target.value);
      if (Number.isInteger(t) && t >= 0 && t < current.T) { setWindow(t - Math.floor(WINDOW / 4)); showToken(t); }
    });
    if (DATA.runs.length === 0) return;
    selectRun(0);
    document.getElementById("heatmap").on("plotly_click", (event) => showToken(event.points[0].y));
    window.loopscopeReport = { selectRun: selectRun, setWindow: setWindow, showToken: showToken };
    document.body.dataset.ready = "true";
  }

  init();
})();
