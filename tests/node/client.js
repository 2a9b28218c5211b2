// An app: connects with the socket.io v4 client and prints every event it receives as a
// JSON line. Prints "connected" once connected.
"use strict";
const { io } = require("socket.io-client");
const url = process.argv[2];
const socket = io(url, { transports: ["websocket"], reconnection: true });
socket.on("connect", () => console.log("connected"));
socket.onAny((event, data) => console.log(JSON.stringify({ event, data })));
socket.on("connect_error", (e) => console.error("connect_error " + e.message));
