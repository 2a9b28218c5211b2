// An app: connects with the socket.io v4 client (with `auth: { token }` when a token is
// given) and prints every event it receives as a JSON line. Prints "connected" once
// connected, "connect_error <message>" when refused, "disconnected <reason>" when dropped.
// With "slow" as third argument it stops reading from its connection once connected: an
// app that does not keep up. MONITOR=1 asks for the live page's records.
"use strict";
const { io } = require("socket.io-client");
const [url, token, mode] = process.argv.slice(2);
const socket = io(url, {
  transports: ["websocket"],
  reconnection: mode !== "slow" && mode !== "once",
  auth: token ? (process.env.MONITOR === "1" ? { token, monitor: true } : { token }) : undefined,
  extraHeaders: process.env.ORIGIN ? { Origin: process.env.ORIGIN } : undefined,
});
socket.on("connect", () => {
  console.log("connected");
  if (mode === "slow") socket.io.engine.transport.ws._socket.pause();
});
socket.onAny((event, data) => {
  if (!event.startsWith("vendora:")) console.log(JSON.stringify({ event, data }));
});
socket.on("connect_error", (e) => console.log("connect_error " + e.message));
socket.on("disconnect", (reason) => console.log("disconnected " + reason));
