// The live page of a receiver (vendora-observe-server, `vendora-observe listen`): every
// webhook it handled, as the apps receive it. With the server it connects through the apps'
// own module (clients/js/vendora-observe.js: reconnects, catch-up) with the ADMIN_TOKEN,
// asking to monitor; with `listen`, through Server-Sent Events read with fetch, the token in
// a header (never in a URL, where proxies log it). Everything from the network is shown
// through textContent, never parsed as HTML.
import { connect as connectApp } from "/live/vendora-observe.js";

{
  const $ = (id) => document.getElementById(id);
  const KEEP = 2000; // events kept in the page
  let seen = [];
  const counts = { received: 0, broadcast: 0, duplicate: 0, retry: 0, refused: 0 };
  const transport = document.querySelector('meta[name="vendora-transport"]').content;

  function status(state, text) {
    const s = $("status");
    s.dataset.state = state;
    s.textContent = text;
  }

  // `#token=…&event=…&row=…`: the token is kept for the session and leaves the address bar
  // (and the history); the filters stay, so a filtered view can be shared without it.
  function token() {
    const params = new URLSearchParams(location.hash.slice(1));
    $("f-event").value = params.get("event") || "";
    $("f-row").value = params.get("row") || "";
    const fromHash = params.get("token");
    if (fromHash) {
      sessionStorage.setItem("vendora-token", fromHash);
      params.delete("token");
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
      return fromHash;
    }
    return sessionStorage.getItem("vendora-token");
  }

  function loggedOut(message) {
    status("refused", "refused: " + message);
    sessionStorage.removeItem("vendora-token");
    $("login").hidden = false;
  }

  // On each (re)connection the receiver sends what it handled recently, then each new one.
  function onHistory(list) {
    seen = [];
    for (const k of Object.keys(counts)) counts[k] = 0;
    list.forEach(record);
    render();
  }

  function onSeen(s) {
    record(s);
    if (matches(s)) append(s);
    summary();
  }

  // Server-Sent Events over fetch: `event:` and `data:` lines, a blank line ends one.
  async function stream(t) {
    for (let wait = 500; ; wait = Math.min(wait * 2, 5000)) {
      try {
        const res = await fetch("/live/events", { headers: { Authorization: "Bearer " + t } });
        if (res.status === 401) return loggedOut("a valid token is required");
        if (!res.ok || !res.body) throw new Error("HTTP " + res.status);
        status("live", "live");
        wait = 500;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let end;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            let name = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) name = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            }
            if (name === "vendora:history") onHistory(JSON.parse(data.join("\n")));
            else if (name === "vendora:seen") onSeen(JSON.parse(data.join("\n")));
          }
        }
      } catch (e) {
        // Dropped: retried below.
      }
      status("down", "disconnected, reconnecting…");
      await new Promise((r) => setTimeout(r, wait));
    }
  }

  function connect(t) {
    if (transport === "eventsource") {
      stream(t);
      return;
    }
    const client = connectApp(window.io, location.origin, {
      token: t,
      monitor: true,
      onEvent: () => {},
      onStatus: (state, detail) => {
        if (state === "live") status("live", "live");
        else if (state === "refused") loggedOut(detail || "refused");
        else if (state === "down") status("down", "disconnected, reconnecting…");
      },
    });
    client.socket.on("vendora:history", onHistory);
    client.socket.on("vendora:seen", onSeen);
  }

  function record(s) {
    seen.push(s);
    if (seen.length > KEEP) seen.shift();
    counts.received += 1;
    const bucket = s.outcome === "received" ? "broadcast" : s.outcome;
    if (bucket in counts) counts[bucket] += 1;
  }

  function matches(s) {
    const ev = $("f-event").value.trim();
    const row = $("f-row").value.trim();
    return (!ev || (s.event || "").includes(ev)) && (!row || s.row === row);
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }

  function append(s) {
    const tr = document.createElement("tr");
    tr.dataset.event = s.event || "";
    tr.dataset.row = s.row || "";
    tr.dataset.outcome = s.outcome;
    tr.dataset.signature = s.signature;
    tr.dataset.id = s.id || "";
    const t = new Date(s.at);
    cell(tr, t.toLocaleTimeString([], { hour12: false }) + "." + String(t.getMilliseconds()).padStart(3, "0"));
    cell(tr, s.event || "—");
    cell(tr, s.row || "—");
    cell(tr, s.signature === "ok" ? "✓ valid" : "✗ " + (s.reason || "invalid"), s.signature === "ok" ? "sig-ok" : "sig-bad");
    cell(tr, { broadcast: "broadcast", received: "received", duplicate: "duplicate dropped", retry: "retry asked (in progress)", failed: "broadcast failed (503)", refused: "refused" }[s.outcome] || s.outcome);
    cell(tr, s.latencyMs == null ? "—" : s.latencyMs + " ms");
    cell(tr, s.data === undefined || s.data === null ? "" : JSON.stringify(s.data), "data");
    $("events").tBodies[0].appendChild(tr);
  }

  function summary() {
    for (const k of Object.keys(counts)) $("n-" + k).textContent = counts[k];
    const shown = $("events").tBodies[0].rows.length;
    $("shown").textContent = shown === seen.length ? "" : shown + " of " + seen.length + " shown";
  }

  function render() {
    $("events").tBodies[0].replaceChildren();
    seen.filter(matches).forEach(append);
    summary();
  }

  // Per-second buckets of the last 60 s: events, and the median latency of broadcasts.
  function chart() {
    const now = Math.floor(Date.now() / 1000);
    const rate = new Array(60).fill(0);
    const lat = Array.from({ length: 60 }, () => []);
    for (const s of seen) {
      const i = 59 - (now - Math.floor(s.at / 1000));
      if (i < 0 || i > 59) continue;
      rate[i] += 1;
      if ((s.outcome === "broadcast" || s.outcome === "received") && s.latencyMs != null) {
        lat[i].push(s.latencyMs);
      }
    }
    const median = lat.map((l) => (l.length ? l.sort((a, b) => a - b)[l.length >> 1] : null));
    bars($("rate"), rate, "#3b6fd8");
    bars($("latency"), median, "#d8843b");
  }

  function bars(canvas, values, color) {
    const g = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    g.clearRect(0, 0, w, h);
    const max = Math.max(1, ...values.filter((v) => v != null));
    const bw = w / values.length;
    g.fillStyle = color;
    values.forEach((v, i) => {
      if (v == null) return;
      const bh = Math.max(1, (v / max) * (h - 16));
      g.fillRect(i * bw + 1, h - bh, bw - 2, bh);
    });
    g.fillStyle = "#1d2430";
    g.font = "11px system-ui";
    g.fillText("max " + max, 4, 12);
  }

  $("f-event").addEventListener("input", render);
  $("f-row").addEventListener("input", render);
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("token").value.trim();
    sessionStorage.setItem("vendora-token", t);
    $("login").hidden = true;
    connect(t);
  });
  setInterval(chart, 1000);
  chart();

  const t = token();
  if (t) connect(t);
  else {
    status("refused", "a token is needed");
    $("login").hidden = false;
  }
}
