// vendora-observe: the apps' side of the WebSocket server (vendora-observe-server, or a
// Node server following the README's recipe). An ES module with no build step and no
// dependency of its own: pass it socket.io-client's `io` (v4), in a browser, React Native
// or Node.
//
//   import { io } from "socket.io-client";
//   import { connect } from "./vendora-observe.js";
//
//   const client = connect(io, "https://ws.example.com", {
//     token: () => fetch("/api/ws-token").then((r) => r.text()), // or a string
//     onEvent(event, data, meta) { store.apply(event, data); },   // each event once, in order
//     onResync(reason) { store.reload(); },                       // load the state from the API
//   });
//
// What it does for the app:
// - keeps where the app is in the server's history (the `offset` and `epoch` of the last
//   event) and sends them when it reconnects, so the server sends what was missed, in
//   order, before anything new;
// - drops an event it has already seen (by its id), so a replay never applies twice;
// - calls `onResync` whenever the app must load its state from the backend: on the first
//   connection (connect first, then load: nothing falls between), and when the server
//   cannot fill a gap (it lost its history, or the app was away longer than it keeps);
// - fetches a fresh token when the server disconnects the app because its token expired
//   (give `token` as a function), and says so through `onStatus` when it cannot go on
//   (`"refused"`: a wrong or revoked token).
//
// The protocol, for apps in other languages, is in the README ("What apps do on
// reconnect").

const KEEP_IDS = 1000;

/**
 * Connects to `url` with socket.io-client's `io`.
 *
 * @param {Function} io socket.io-client's `io`
 * @param {string} url the server, e.g. "https://ws.example.com"
 * @param {object} options
 * @param {string|Function} options.token the app's token, or a function returning it (or a
 *   promise of it), called on every connection
 * @param {Function} options.onEvent `(event, data, meta)` for every event, once, in order
 * @param {Function} [options.onResync] `(reason)`: load the state from the backend
 * @param {Function} [options.onReady] `({ recovered, offset, epoch })` once live
 * @param {Function} [options.onStatus] `(state, detail)`: "connecting", "live", "down",
 *   "refused"
 * @param {{offset: string, epoch: string}} [options.position] where the app left, if it
 *   keeps it across restarts (see `onPosition`)
 * @param {Function} [options.onPosition] `(position)` after each event, to keep it
 * @param {Function} [options.onDuplicate] `(event, meta)` for an event dropped as seen before
 * @param {boolean} [options.monitor] the live page's connection (an admin token)
 * @param {object} [options.socketOptions] more options for `io(url, …)`
 * @returns {{socket: object, position: Function, close: Function}}
 */
export function connect(io, url, options) {
  const {
    token,
    onEvent,
    onResync = () => {},
    onReady = () => {},
    onStatus = () => {},
    onPosition = () => {},
    onDuplicate = () => {},
    monitor = false,
    socketOptions = {},
  } = options;
  let position = options.position || null;
  let resynced = false; // on this connection
  let serverReason = null; // why the server disconnected the app, if it said
  const seen = new Set();
  const order = [];

  const remember = (id) => {
    seen.add(id);
    order.push(id);
    if (order.length > KEEP_IDS) seen.delete(order.shift());
  };
  const moveTo = (offset, epoch) => {
    position = { offset, epoch };
    onPosition(position);
  };

  const auth = (cb) => {
    Promise.resolve(typeof token === "function" ? token() : token).then(
      (t) => {
        const payload = { token: t };
        if (position) Object.assign(payload, position);
        if (monitor) payload.monitor = true;
        cb(payload);
      },
      () => cb({ token: "" }),
    );
  };

  const socket = io(url, { ...socketOptions, auth });
  onStatus("connecting");

  socket.onAny((event, ...args) => {
    if (event.startsWith("vendora:")) return;
    const meta = args.length > 1 ? args[args.length - 1] : null;
    const known = meta && typeof meta === "object" && "offset" in meta && "epoch" in meta;
    if (!known) {
      onEvent(event, args[0], null);
      return;
    }
    if (meta.id && seen.has(meta.id)) {
      onDuplicate(event, meta);
      return;
    }
    if (meta.id) remember(meta.id);
    moveTo(meta.offset, meta.epoch);
    onEvent(event, args[0], meta);
  });

  socket.on("connect", () => {
    resynced = false;
    serverReason = null;
  });
  socket.on("vendora:resync", (r) => {
    resynced = true;
    moveTo(r.offset, r.epoch);
    onResync(r.reason);
  });
  socket.on("vendora:ready", (r) => {
    // A server without history (a Node recipe) gives no position.
    if (r.offset !== undefined) moveTo(r.offset, r.epoch);
    if (!r.recovered && !resynced) onResync("first connection");
    onReady(r);
    onStatus("live");
  });
  socket.on("vendora:disconnect", (r) => {
    serverReason = r && r.reason;
  });
  socket.on("disconnect", (reason) => {
    if (reason !== "io server disconnect") {
      onStatus("down", reason); // socket.io reconnects by itself
      return;
    }
    // The server closed the session: with a token function, an expired token is renewed.
    if (serverReason === "the token has expired" && typeof token === "function") {
      onStatus("down", serverReason);
      socket.connect();
    } else {
      onStatus("refused", serverReason || reason);
    }
  });
  // A token that had expired when fetched (a cached one, a clock ahead): with a token
  // function, fetch again, waiting longer each time.
  let retry = 1000;
  socket.on("connect", () => {
    retry = 1000;
  });
  socket.on("connect_error", (e) => {
    if (socket.active) {
      onStatus("down", e.message);
    } else if (e.message === "the token has expired" && typeof token === "function") {
      onStatus("down", e.message);
      setTimeout(() => socket.connect(), retry);
      retry = Math.min(retry * 2, 30000);
    } else {
      onStatus("refused", e.message);
    }
  });

  return {
    socket,
    /** Where the app is in the server's history: `{ offset, epoch }`, or null. */
    position: () => position,
    close: () => socket.disconnect(),
  };
}
