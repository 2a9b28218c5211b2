// A minimal stand-in for the WebSocket server's webhook endpoint, with node's own http and
// crypto and no npm packages. It verifies X-Webhook-Signature two ways: over the raw body,
// and over JSON.stringify(JSON.parse(body)) as servers using express.json() do. It prints
// its port, then one JSON line per request.
"use strict";
const http = require("http");
const crypto = require("crypto");

const secret = process.env.WEBHOOK_SECRET;
if (!secret) {
  console.error("WEBHOOK_SECRET is required");
  process.exit(2);
}

function matches(payload, signature) {
  const expected = crypto.createHmac("sha256", secret).update(payload).digest("hex");
  const a = Buffer.from(expected, "utf8");
  const b = Buffer.from(String(signature || ""), "utf8");
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const raw = Buffer.concat(chunks);
    const signature = req.headers["x-webhook-signature"];
    const rawOk = matches(raw, signature);
    let restringifiedOk = false;
    let event = null;
    try {
      const parsed = JSON.parse(raw.toString("utf8"));
      event = parsed.event;
      restringifiedOk = matches(JSON.stringify(parsed), signature);
    } catch (e) {
      restringifiedOk = false;
    }
    console.log(JSON.stringify({
      event,
      rawOk,
      restringifiedOk,
      id: req.headers["x-webhook-id"] || null,
      contentType: req.headers["content-type"] || null,
      userAgent: req.headers["user-agent"] || null,
    }));
    res.writeHead(rawOk ? 200 : 401, { "content-type": "application/json" });
    res.end(JSON.stringify({ ok: rawOk }));
  });
});

server.listen(0, "127.0.0.1", () => {
  console.log("PORT " + server.address().port);
});
