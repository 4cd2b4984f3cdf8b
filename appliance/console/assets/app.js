// The console's only script (embedded in the binary; the CSP allows nothing else).
// Live dashboard charts, copy buttons, confirmations, jumping to a policy problem's line.
"use strict";

function sparkline(svg, values) {
  const max = Math.max(1e-9, ...values);
  const n = values.length;
  const pts = values.map((v, i) => {
    const x = n < 2 ? 0 : (i * 300) / (n - 1);
    const y = 78 - (v / max) * 74;
    return x.toFixed(1) + "," + y.toFixed(1);
  });
  let line = svg.querySelector("polyline");
  if (!line) {
    line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    svg.appendChild(line);
  }
  line.setAttribute("points", pts.join(" "));
}

// The 95th percentile of the latencies observed between two cumulative histograms.
function p95(prev, cur) {
  const total = cur.latency_count - prev.latency_count;
  if (total <= 0) return null;
  const want = 0.95 * total;
  for (let i = 0; i < cur.latency_buckets.length; i++) {
    if (cur.latency_counts[i] - prev.latency_counts[i] >= want) return cur.latency_buckets[i];
  }
  return Infinity;
}

function startDashboard() {
  if (!document.getElementById("live")) return;
  const hist = { rps: [], tps: [], err: [], p95: [] };
  let last = null;
  const fmt = (v, unit) => (v === null ? "–" : v === Infinity ? "> 30 s" : v.toFixed(v < 10 ? 2 : 0) + unit);
  async function tick() {
    try {
      const r = await fetch("/api/stats", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { location.href = "/login"; return; }
      const s = await r.json();
      if (last) {
        const dt = Math.max(0.001, (s.time_ms - last.time_ms) / 1000);
        const a = s.summary, b = last.summary;
        const req = a.requests - b.requests;
        const values = {
          rps: req / dt,
          tps: (a.prompt_tokens + a.completion_tokens - b.prompt_tokens - b.completion_tokens) / dt,
          err: req > 0 ? (a.server_errors - b.server_errors) / req : 0,
          p95: p95(b, a),
        };
        for (const k of Object.keys(hist)) {
          hist[k].push(values[k] === null || values[k] === Infinity ? 0 : values[k]);
          if (hist[k].length > 90) hist[k].shift();
          sparkline(document.getElementById("c-" + k), hist[k]);
        }
        document.getElementById("v-rps").textContent = fmt(values.rps, "");
        document.getElementById("v-tps").textContent = fmt(values.tps, "");
        document.getElementById("v-err").textContent = (values.err * 100).toFixed(1) + " %";
        document.getElementById("v-p95").textContent = values.p95 === null ? "–" : fmt(values.p95 * 1000, " ms");
        const top = Object.entries(a.tenants).sort((x, y) => y[1] - x[1]).slice(0, 5);
        const ol = document.getElementById("tenants");
        ol.replaceChildren(...(top.length ? top : [["–", ""]]).map(([t, n]) => {
          const li = document.createElement("li");
          li.textContent = n === "" ? t : t + ": " + n + " requests";
          return li;
        }));
      }
      last = s;
    } catch (e) { /* the next tick tries again */ }
  }
  tick();
  setInterval(tick, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  startDashboard();
  for (const b of document.querySelectorAll("button.copy")) {
    b.addEventListener("click", async () => {
      const input = document.getElementById(b.dataset.copy);
      input.select();
      try { await navigator.clipboard.writeText(input.value); b.textContent = "Copied"; }
      catch (e) { document.execCommand && document.execCommand("copy"); b.textContent = "Selected"; }
    });
  }
  for (const f of document.querySelectorAll("form[data-confirm]")) {
    f.addEventListener("submit", (e) => {
      const label = f.querySelector("button").textContent;
      if (!confirm(label + ": are you sure?")) e.preventDefault();
    });
  }
  for (const a of document.querySelectorAll("a[data-line]")) {
    a.addEventListener("click", (e) => {
      e.preventDefault();
      const ta = document.getElementById("f-policy");
      const line = parseInt(a.dataset.line, 10);
      const lines = ta.value.split("\n");
      const start = lines.slice(0, line - 1).join("\n").length + (line > 1 ? 1 : 0);
      ta.focus();
      ta.setSelectionRange(start, start + (lines[line - 1] || "").length);
    });
  }
});

// A model import in progress: poll until it ends, then reload the list.
function pollImport(bar, status) {
  let seen = true;
  async function poll() {
    try {
      const s = await (await fetch("/models/progress", { credentials: "same-origin", cache: "no-store" })).json();
      if (s.active) {
        seen = true;
        bar.max = Math.max(1, s.total);
        bar.value = s.done;
        status.textContent = s.total ? Math.round((100 * s.done) / s.total) + " % of " + s.source : "starting: " + s.source;
      } else if (seen && s.message) {
        bar.max = 1; bar.value = s.ok ? 1 : 0;
        status.textContent = (s.ok ? "Imported: " : "Failed: ") + s.message;
        if (s.ok) setTimeout(() => location.assign("/models"), 1500);
        return;
      }
    } catch (e) { /* next poll */ }
    setTimeout(poll, 1000);
  }
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("import");
  if (!box) return;
  if (box.dataset.active !== "true") { box.hidden = true; return; }
  pollImport(document.getElementById("import-bar"), document.getElementById("import-status"));
});

// Sends a file's bytes from a form to `url` with the form's CSRF token (and `headers`);
// the button is disabled meanwhile; `done(ok, message)` gets the JSON answer's message,
// `progress(loaded, total)` the upload's progress.
function postFile(form, url, file, headers, status, done, progress) {
  const button = form.querySelector("button[type=submit]");
  const xhr = new XMLHttpRequest();
  xhr.open("POST", url);
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  xhr.setRequestHeader("X-CSRF-Token", form.querySelector("input[name=csrf]").value);
  for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
  if (progress) {
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) progress(e.loaded, e.total);
    });
  }
  xhr.addEventListener("load", () => {
    let r = {};
    try { r = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
    if (xhr.status !== 200) button.disabled = false;
    done(xhr.status === 200, r.message || "HTTP " + xhr.status);
  });
  xhr.addEventListener("error", () => {
    button.disabled = false;
    status.textContent = "Failed: the connection broke off.";
  });
  button.disabled = true;
  status.textContent = "Sending " + file.name;
  xhr.send(file);
}

// Upload a model file from this computer, with progress; the import then shows above.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("upload");
  if (!form) return;
  const bar = document.getElementById("upload-bar");
  const status = document.getElementById("upload-status");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const file = document.getElementById("up-file").files[0];
    if (!file) return;
    const name = document.getElementById("up-name").value.trim();
    const url = "/models/upload?file=" + encodeURIComponent(file.name) + (name ? "&name=" + encodeURIComponent(name) : "");
    postFile(form, url, file, {}, status, (ok, message) => {
      // The import runs on the appliance now: follow it here.
      if (ok) pollImport(bar, status);
      else status.textContent = "Failed: " + message;
    }, (loaded, total) => {
      bar.max = Math.max(1, total);
      bar.value = loaded;
      status.textContent = "Uploading: " + Math.round((100 * loaded) / total) + " % of " + file.name;
    });
  });
});

// Restore a backup: its bytes and passphrase to the appliance, which checks it, answers,
// then restarts to put it in place.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("restore");
  if (!form) return;
  const status = document.getElementById("restore-status");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const file = document.getElementById("rs-file").files[0];
    const pass = document.getElementById("rs-pass").value;
    if (!file || !pass) return;
    if (!window.confirm("Restore " + file.name + "? The appliance restarts and its current state is set aside.")) return;
    const headers = { "X-Backup-Passphrase": encodeURIComponent(pass) };
    postFile(form, "/system/restore", file, headers, status, (ok, message) => {
      status.textContent = (ok ? "" : "Refused: ") + message;
    });
  });
});
