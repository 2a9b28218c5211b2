// The WebSocket server's webhook endpoint with Express and socket.io, doing for the apps
// what vendora-observe-server does: verifies the Standard Webhooks signature over the raw
// body (a replayed capture is refused), drops redeliveries, lets in only apps with a token
// and sends each event to the apps whose token allows its rooms, and replays what an app
// missed while it blinked (socket.io's connection state recovery).
"use strict";
const http = require("http");
const crypto = require("crypto");
const express = require("express");
const { Server } = require("socket.io");

const secret = process.env.WEBHOOK_SECRET;
// APP_TOKENS: `token=room1|room2` entries (a bare token hears every room), comma-separated.
const appTokens = new Map(
  (process.env.APP_TOKENS || "").split(/[\s,]+/).filter(Boolean).map((entry) => {
    const [token, rooms] = entry.split("=");
    return [token, rooms ? rooms.split("|") : "*"];
  }),
);
// APP_TOKEN_SECRET: the secret of the tokens the backend mints (AppToken in Rust).
const mintingSecrets = (process.env.APP_TOKEN_SECRET || "").split(/[\s,]+/).filter(Boolean);

const app = express();
const server = http.createServer(app);
const io = new Server(server, {
  maxHttpBufferSize: 16e3, // apps send nothing but their handshake
  // An app that reconnects within 2 minutes gets what it missed (`socket.recovered`);
  // its token is checked again all the same.
  connectionStateRecovery: { maxDisconnectionDuration: 2 * 60 * 1000, skipMiddlewares: false },
});
const seen = new Set(); // ids of recent events: a retry is not broadcast twice

const hmac = (key, data, encoding) =>
  crypto.createHmac("sha256", key).update(data).digest(encoding);
// Constant time, and no throw on a missing or short value.
const same = (a, b) => {
  const x = Buffer.from(String(a));
  const y = Buffer.from(String(b));
  return x.length === y.length && crypto.timingSafeEqual(x, y);
};

// `vo2.<payload>.<signature>`: the payload is base64url JSON {sub, rooms, iat, exp}, the
// signature the hex HMAC-SHA256 of `vo2.<payload>`. The claims, or null.
function mintedClaims(token) {
  const [version, payload, signature, extra] = String(token).split(".");
  if (version !== "vo2" || !payload || !signature || extra !== undefined) return null;
  if (!mintingSecrets.some((k) => same(hmac(k, `vo2.${payload}`, "hex"), signature))) return null;
  const claims = JSON.parse(Buffer.from(payload, "base64url").toString("utf8"));
  return claims.exp > Date.now() / 1000 ? claims : null;
}

io.use((socket, next) => {
  const token = socket.handshake.auth.token;
  const listed = [...appTokens].find(([t]) => same(t, token));
  const rooms = listed ? listed[1] : (mintedClaims(token) || {}).rooms;
  if (!rooms) return next(new Error("a valid token is required"));
  socket.join(rooms === "*" ? ["every-room"] : rooms.map((r) => "room:" + r));
  next();
});
io.on("connection", (socket) => {
  // Not recovered: the app loads its state from the backend (the apps' module calls its
  // onResync); recovered: what it missed was replayed first.
  socket.emit("vendora:ready", { recovered: socket.recovered });
});

app.post(
  "/webhook", // WEBSOCKET_SERVER_URL=http://<this host>:3001/webhook
  // The signature covers the exact bytes sent: keep them raw, parse them yourself.
  express.raw({ type: "application/json", limit: "1mb" }),
  (req, res) => {
    if (!Buffer.isBuffer(req.body)) {
      return res.status(415).json({ error: "Content-Type must be application/json" });
    }
    // Standard Webhooks: `v1,<base64 HMAC of "id.timestamp.body">`, within 5 minutes.
    const id = req.get("webhook-id");
    const timestamp = Number(req.get("webhook-timestamp"));
    const expected = "v1," + hmac(secret, `${id}.${timestamp}.${req.body}`, "base64");
    const signed = (req.get("webhook-signature") || "").split(" ").some((s) => same(s, expected));
    if (!id || !signed || Math.abs(Date.now() / 1000 - timestamp) > 300) {
      return res.status(401).json({ error: "invalid signature" });
    }
    if (seen.has(id)) return res.json({ ok: true, duplicate: true });
    const { event, data, rooms } = JSON.parse(req.body);
    // An event with rooms reaches the apps of those rooms and those of every room, once.
    if (rooms) io.to(["every-room", ...rooms.map((r) => "room:" + r)]).emit(event, data);
    else io.emit(event, data);
    seen.add(id); // only once broadcast: a failed broadcast is retried, not lost
    if (seen.size > 10000) seen.delete(seen.values().next().value);
    res.json({ ok: true });
  },
);

server.listen(process.env.PORT || 3001, () => console.log("PORT " + server.address().port));
