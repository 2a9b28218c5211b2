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

const server = http.createServer((req, res) => {
  if (req.method !== "POST" || req.url.startsWith("/socket.io")) return;
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const raw = Buffer.concat(chunks);
    const expected = crypto.createHmac("sha256", secret).update(raw).digest("hex");
    const given = Buffer.from(String(req.headers["x-webhook-signature"] || ""));
    const ok = given.length === expected.length && crypto.timingSafeEqual(Buffer.from(expected), given);
    if (!ok) {
      res.writeHead(401);
      return res.end("invalid signature");
    }
    const { event, data } = JSON.parse(raw.toString("utf8"));
    io.emit(event, data);
    res.writeHead(200, { "content-type": "application/json" });
    res.end('{"ok":true}');
  });
});
const io = new Server(server);
server.listen(0, "127.0.0.1", () => console.log("PORT " + server.address().port));
