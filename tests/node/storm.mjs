// A reconnect storm, for the bench: N apps (the apps' module) that all come back at once
// with the same old position, each to be caught up on the history since; and one app that
// stays live, printing when each live event arrives. Prints:
//   {"kind":"live","id":…,"at":<Unix ms, fractional>}   for each event the live app gets
//   {"kind":"caught-up","apps":N,"events":E,"ms":…}      once every storm app is live
// Settings: URL, TOKEN, STORM (N), OFFSET and EPOCH (the position the storm apps come back
// with), EXPECT (events each storm app must get before it counts as caught up).
import { io } from "socket.io-client";
import { connect } from "../../clients/js/vendora-observe.js";

const { URL: url, TOKEN: token, OFFSET: offset, EPOCH: epoch } = process.env;
const storm = Number(process.env.STORM || 0);
const expect = Number(process.env.EXPECT || 0);
const print = (o) => process.stdout.write(JSON.stringify(o) + "\n");
const now = () => performance.timeOrigin + performance.now();

// LIVE=0: the storm alone (the live app runs in a process of its own, so that the storm's
// work in this one does not delay what it measures).
if (process.env.LIVE !== "0") connect(io, url, {
  token,
  socketOptions: { transports: ["websocket"] },
  onEvent: (event, data, meta) => {
    if (event === "bench:live") print({ kind: "live", id: meta.id, at: now() });
  },
  onReady: () => print({ kind: "live-ready" }),
});

if (storm > 0) {
  const started = now();
  let done = 0;
  let events = 0;
  for (let i = 0; i < storm; i++) {
    let got = 0;
    let counted = false;
    connect(io, url, {
      token,
      position: { offset, epoch },
      socketOptions: { transports: ["websocket"], forceNew: true },
      onEvent: (event) => {
        if (event === "bench:live") return;
        got += 1;
        events += 1;
        if (!counted && got >= expect) {
          counted = true;
          done += 1;
          if (done === storm) {
            print({ kind: "caught-up", apps: storm, events, ms: now() - started });
          }
        }
      },
    });
  }
}
