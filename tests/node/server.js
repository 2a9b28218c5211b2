// The existing WebSocket server, in small: an HTTP endpoint that verifies
// X-Webhook-Signature over the raw body with node's crypto and rebroadcasts the event to
// every socket.io client. Prints "PORT <n>" when listening.
"use strict";
const http = require("http");
const crypto = require("crypto");
const { Server } = require("socket.io");

const secret = process.env.WEBHOOK_SECRET;
if (!secret) {
  console.error("WEBHOOK_SECRET is required");
  process.exit(2);
}

// For the benchmark only (GATED=1): webhooks wait while the gate is closed
// (POST /__gate/close, /__gate/open), and GET /__count tells how many were accepted.
// POST /__arrivals/reset starts recording when each row's first event arrived (ms since the
// epoch, by `data.id`), GET /__arrivals returns them; events of rows named `slow-row…` are
// answered after SLOW_MS (2000).
const gated = process.env.GATED === "1";
const slowMs = Number(process.env.SLOW_MS || 2000);
let slowOn = true; // POST /__slow/off answers them at once, /__slow/on slowly again
let open = true;
let held = [];
let accepted = 0;
let arrivals = null;

const server = http.createServer((req, res) => {
  if (gated && req.url.startsWith("/__gate/")) {
    open = req.url === "/__gate/open";
    if (open) held.splice(0).forEach((go) => go());
    return res.end("ok");
  }
  if (gated && req.url === "/__count") return res.end(String(accepted));
  if (gated && req.url === "/__arrivals/reset") {
    arrivals = {};
    return res.end("ok");
  }
  if (gated && req.url === "/__arrivals") return res.end(JSON.stringify(arrivals || {}));
  if (gated && req.url.startsWith("/__slow/")) {
    slowOn = req.url === "/__slow/on";
    return res.end("ok");
  }
  if (gated && !open) return held.push(() => handle(req, res));
  handle(req, res);
});

function handle(req, res) {
  if (req.method !== "POST" || req.url.startsWith("/socket.io")) return;
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const at = performance.timeOrigin + performance.now();
    const raw = Buffer.concat(chunks);
    const expected = crypto.createHmac("sha256", secret).update(raw).digest("hex");
    const given = Buffer.from(String(req.headers["x-webhook-signature"] || ""));
    const ok = given.length === expected.length && crypto.timingSafeEqual(Buffer.from(expected), given);
    if (!ok) {
      res.writeHead(401);
      return res.end("invalid signature");
    }
    const { event, data } = JSON.parse(raw.toString("utf8"));
    const answer = () => {
      res.writeHead(200, { "content-type": "application/json" });
      res.end('{"ok":true}');
    };
    if (gated && slowOn && data && String(data.name).startsWith("slow-row")) return setTimeout(answer, slowMs);
    io.emit(event, data);
    accepted += 1;
    if (arrivals && data && data.id !== undefined && !(data.id in arrivals)) arrivals[data.id] = at;
    answer();
  });
}
const io = new Server(server);
server.listen(0, "127.0.0.1", () => console.log("PORT " + server.address().port));
