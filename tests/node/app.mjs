// An app as the product ships it: socket.io-client v4 through the apps' module
// (clients/js/vendora-observe.js), printing one JSON line per thing that happens:
//   {"kind":"status","state":"live"|"down"|"refused"|"connecting","detail":…}
//   {"kind":"ready","recovered":…,"offset":…,"epoch":…}
//   {"kind":"resync","reason":…}
//   {"kind":"event","event":…,"data":…,"meta":{"id","offset","epoch"}}
//   {"kind":"duplicate",…}: an event the server sent twice (the module dropped it)
// Settings from the environment: URL, TOKEN (or TOKEN_FILE, read at every connection, so a
// test can hand it a fresh token), TRANSPORT ("websocket", "polling" or both by default),
// ORIGIN. Lines on stdin: "close" disconnects and exits.
import { io } from "socket.io-client";
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { connect } from "../../clients/js/vendora-observe.js";

const { URL: url, TOKEN: token, TOKEN_FILE: tokenFile, TRANSPORT: transport, ORIGIN: origin } =
  process.env;
const print = (o) => process.stdout.write(JSON.stringify(o) + "\n");

const socketOptions = {
  reconnectionDelay: 200,
  reconnectionDelayMax: 1000,
  randomizationFactor: 0,
};
if (transport) socketOptions.transports = [transport];
if (origin) socketOptions.extraHeaders = { Origin: origin };

const client = connect(io, url, {
  token: tokenFile ? () => readFileSync(tokenFile, "utf8").trim() : token,
  socketOptions,
  onEvent: (event, data, meta) => print({ kind: "event", event, data, meta }),
  onDuplicate: (event, meta) => print({ kind: "duplicate", event, meta }),
  onResync: (reason) => print({ kind: "resync", reason }),
  onReady: (r) => print({ kind: "ready", ...r }),
  onStatus: (state, detail) => print({ kind: "status", state, detail: detail || null }),
});

// SHOW_SID=1: print the engine.io session id (what a proxy's log would leak), for the test
// that tries to take the session over with it.
if (process.env.SHOW_SID === "1") {
  client.socket.on("connect", () => print({ kind: "sid", sid: client.socket.io.engine.id }));
}

createInterface({ input: process.stdin }).on("line", (line) => {
  if (line.trim() === "close") {
    client.close();
    process.exit(0);
  }
});
