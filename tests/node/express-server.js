// The WebSocket server's webhook endpoint with Express and socket.io: verifies the
// signature over the raw body, drops redeliveries, rebroadcasts to every app.
"use strict";
const http = require("http");
const crypto = require("crypto");
const express = require("express");
const { Server } = require("socket.io");

const secret = process.env.WEBHOOK_SECRET;
const app = express();
const server = http.createServer(app);
const io = new Server(server);
const seen = new Set(); // X-Webhook-Id of recent events: a retry is not broadcast twice

app.post(
  "/webhook", // WEBSOCKET_SERVER_URL=http://<this host>:3001/webhook
  // The signature covers the exact bytes sent: keep them raw, parse them yourself.
  express.raw({ type: "application/json", limit: "1mb" }),
  (req, res) => {
    if (!Buffer.isBuffer(req.body)) {
      return res.status(415).json({ error: "Content-Type must be application/json" });
    }
    const given = Buffer.from(req.get("X-Webhook-Signature") || "", "utf8");
    const expected = Buffer.from(
      crypto.createHmac("sha256", secret).update(req.body).digest("hex"),
      "utf8",
    );
    // timingSafeEqual throws when the lengths differ: a missing or short header is a 401.
    if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) {
      return res.status(401).json({ error: "invalid signature" });
    }
    const id = req.get("X-Webhook-Id");
    if (id && seen.has(id)) return res.json({ ok: true, duplicate: true });
    const { event, data } = JSON.parse(req.body);
    io.emit(event, data);
    if (id) {
      seen.add(id); // only once broadcast: a failed broadcast is retried, not lost
      if (seen.size > 10000) seen.delete(seen.values().next().value);
    }
    res.json({ ok: true });
  },
);

server.listen(process.env.PORT || 3001, () => console.log("PORT " + server.address().port));
