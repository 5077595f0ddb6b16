// The JavaScript client of ringsocket's `ringsocket.v1` protocol (docs/protocol.md).
//
// One ES module with no dependencies and no build step: the server embeds this exact
// file and serves it at `/ringsocket.js`, so it runs as-is in a browser and in node 20
// (which has no global WebSocket: pass the `ws` package's as `options.WebSocket`).
//
//   import { RingSocket } from "/ringsocket.js";
//   const rs = new RingSocket("wss://example.com/v1", { token });
//   const sub = rs.subscribe("lobby", (m) => console.log(m.offset, m.data));
//   await sub.ready;
//   await rs.publish("lobby", { text: "hi" });
//
// Keepalive is WebSocket ping/pong, answered by the WebSocket implementation itself: the
// only timer this client sets is the reconnect backoff.

const PROTOCOL = "ringsocket.v1";
const EVENTS = ["state", "subscribed", "error", "reconnecting", "disconnect"];
// Resubscribing to fill a gap that is still there after this many tries in a row (no
// publication delivered in order in between) accepts the gap instead of trying forever.
const MAX_GAP_RETRIES = 3;

const DEFAULTS = Object.freeze({
  reconnect: true,
  minReconnectDelay: 250,
  maxReconnectDelay: 10_000,
  resetBackoffAfter: 5_000,
  maxQueuedPublishes: 1_000,
});

/**
 * An error of this client: `code` is the protocol's error code for an error reply
 * (`bad_request`, `bad_topic`, `not_allowed`, `too_many_topics`, `not_subscribed`,
 * `unavailable`) or one of the client's own (see README.md).
 */
export class RingSocketError extends Error {
  constructor(code, message, extra = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = "RingSocketError";
    this.code = code;
    if (extra.topic !== undefined) this.topic = extra.topic;
    if (extra.id !== undefined) this.id = extra.id;
  }
}

/** A subscription handle, returned by `RingSocket#subscribe`. */
export class Subscription {
  #client;
  #callback;
  #active = true;
  #settled = false;
  #resolve;
  #reject;
  #offset = null;
  #epoch = null;

  /** @internal Created by `RingSocket#subscribe` only. */
  constructor(client, topic, callback) {
    this.#client = client;
    this.#callback = callback;
    this.topic = topic;
    this.ready = new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    // Not awaiting `ready` must never crash node with an unhandled rejection: a
    // refusal is seen by whoever awaits it.
    this.ready.catch(() => {});
  }

  /** False once unsubscribed, refused by the server, or the client is closed. */
  get active() {
    return this.#active;
  }

  /** Offset of the last publication handled on this topic (null before the first reply). */
  get offset() {
    return (this.#active ? this.#client._position(this.topic)?.offset : undefined) ?? this.#offset;
  }

  /** Epoch of the topic's offsets (null before the first reply). */
  get epoch() {
    return (this.#active ? this.#client._position(this.topic)?.epoch : undefined) ?? this.#epoch;
  }

  /** Stops the callbacks at once; sends `unsubscribe` when no other subscription of this client needs the topic. */
  unsubscribe() {
    if (!this.#active) return;
    this._end(new RingSocketError("unsubscribed", `unsubscribed from ${this.topic}`, { topic: this.topic }));
    this.#client._unsubscribe(this);
  }

  /** @internal */
  _deliver(message) {
    if (this.#active) this.#callback.call(undefined, message);
  }

  /** @internal */
  _settle(info) {
    if (this.#settled) return;
    this.#settled = true;
    this.#offset = info.offset;
    this.#epoch = info.epoch;
    this.#resolve(info);
  }

  /** @internal Ends the subscription; rejects `ready` if it is still pending. Returns whether it had settled. */
  _end(error) {
    const position = this.#client._position(this.topic);
    if (position) {
      this.#offset = position.offset;
      this.#epoch = position.epoch;
    }
    this.#active = false;
    const settled = this.#settled;
    if (!settled) {
      this.#settled = true;
      this.#reject(error);
    }
    return settled;
  }
}

/**
 * A `ringsocket.v1` connection: many topics, acknowledged publishes, and recovery of
 * missed publications after a reconnect.
 */
export class RingSocket {
  #url;
  #token;
  #WebSocket;
  #reconnect;
  #minDelay;
  #maxDelay;
  #resetAfter;
  #maxQueue;

  #state = "connecting";
  #closed = false;
  #ws = null;
  #generation = 0;
  #attempt = 0;
  #timer = null;
  #openedAt = 0;
  #nextId = 1;
  #listeners = new Map(EVENTS.map((name) => [name, []]));
  // id -> { kind: "subscribe" | "unsubscribe" | "publish" | "ping", ... }; the requests
  // sent on the current connection and not answered yet.
  #pending = new Map();
  // Publishes waiting for the connection: { topic, json, resolve, reject }.
  #queue = [];
  // topic -> { topic, subs, phase: "idle" | "pending" | "active", offset, epoch,
  //            conflated, since, subscribedOnce, gapRetries }
  #topics = new Map();

  /**
   * @param {string | URL} url `ws://` or `wss://` URL of the server's `/v1` (`http(s)://`
   *   is turned into `ws(s)://`; in a browser a relative URL is resolved against the page).
   * @param {object} [options] See README.md.
   */
  constructor(url, options = {}) {
    this.#url = resolveUrl(url);
    const opts = { ...DEFAULTS, ...definedOnly(options) };
    this.#token = opts.token;
    if (this.#token != null && typeof this.#token !== "string" && typeof this.#token !== "function") {
      throw new TypeError("options.token must be a string or a function");
    }
    this.#WebSocket = opts.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function") {
      throw new TypeError("no WebSocket: pass options.WebSocket (in node 20: the ws package's WebSocket)");
    }
    this.#reconnect = Boolean(opts.reconnect);
    this.#minDelay = nonNegative(opts.minReconnectDelay, "minReconnectDelay");
    this.#maxDelay = Math.max(this.#minDelay, nonNegative(opts.maxReconnectDelay, "maxReconnectDelay"));
    this.#resetAfter = nonNegative(opts.resetBackoffAfter, "resetBackoffAfter");
    this.#maxQueue = nonNegative(opts.maxQueuedPublishes, "maxQueuedPublishes");
    // Connect after the caller's synchronous code, so that `on("state")` registered right
    // after the constructor sees the first "connecting".
    queueMicrotask(() => {
      if (this.#closed) return;
      this.#emit("state", "connecting");
      this.#connect();
    });
  }

  /** The URL connected to (without the `token` option's token). */
  get url() {
    return this.#url;
  }

  /** "connecting" | "open" | "closed". */
  get state() {
    return this.#state;
  }

  /** Adds a listener: "state", "subscribed", "error", "reconnecting" or "disconnect". */
  on(name, fn) {
    this.#listenersOf(name, fn).push(fn);
    return this;
  }

  /** Removes a listener added with `on`. */
  off(name, fn) {
    const list = this.#listenersOf(name, fn);
    const i = list.indexOf(fn);
    if (i !== -1) list.splice(i, 1);
    return this;
  }

  /**
   * Subscribes to a topic. `callback` gets `{topic, offset, epoch, data}` (plus
   * `encoding: "base64"` for binary publications) for every publication, in offset order.
   * @param {string} topic
   * @param {(message: object) => void} callback
   * @param {{since?: {offset: number, epoch: string}}} [options] `since`: resume from a
   *   position kept by the application (e.g. across page loads).
   * @returns {Subscription}
   */
  subscribe(topic, callback, options = {}) {
    if (typeof topic !== "string") throw new TypeError("topic must be a string");
    if (typeof callback !== "function") throw new TypeError("callback must be a function");
    if (this.#closed) throw new RingSocketError("closed", "the client is closed", { topic });
    const since = options?.since;
    if (since !== undefined) {
      if (!since || !Number.isSafeInteger(since.offset) || since.offset < 0 || typeof since.epoch !== "string") {
        throw new TypeError("since must be {offset: a whole number >= 0, epoch: a string}");
      }
    }
    let ts = this.#topics.get(topic);
    if (ts && since !== undefined) {
      throw new TypeError(`since: ${topic} is already subscribed on this client`);
    }
    const sub = new Subscription(this, topic, callback);
    if (ts) {
      ts.subs.push(sub);
      if (ts.phase === "active") {
        sub._settle({ recovered: false, missed: 0, offset: ts.offset, epoch: ts.epoch, conflated: ts.conflated });
      }
      return sub;
    }
    ts = {
      topic,
      subs: [sub],
      phase: "idle",
      offset: null,
      epoch: null,
      conflated: false,
      since: since ? { offset: since.offset, epoch: since.epoch } : null,
      subscribedOnce: false,
      gapRetries: 0,
    };
    this.#topics.set(topic, ts);
    if (this.#isOpen()) this.#sendSubscribe(ts);
    return sub;
  }

  /**
   * Publishes `data` (any JSON value) to a topic. Resolves with the server's ack,
   * `{topic, offset, epoch}`; rejects with a RingSocketError (`.code`) on an error reply,
   * when the queue for a connection not yet open is full (`queue_full`), when the
   * connection drops before the ack (`disconnected`: it may or may not have been
   * published; it is not resent) and when the client is closed (`closed`).
   */
  publish(topic, data) {
    if (typeof topic !== "string") return Promise.reject(new TypeError("topic must be a string"));
    let json;
    try {
      json = JSON.stringify(data);
    } catch (err) {
      return Promise.reject(err);
    }
    if (json === undefined) return Promise.reject(new TypeError("data must be a JSON value"));
    if (this.#closed) return Promise.reject(new RingSocketError("closed", "the client is closed", { topic }));
    return new Promise((resolve, reject) => {
      const item = { topic, json, resolve, reject };
      if (this.#isOpen()) {
        this.#sendPublish(item);
      } else if (this.#queue.length >= this.#maxQueue) {
        reject(new RingSocketError("queue_full", `${this.#queue.length} publishes already wait for the connection`, { topic }));
      } else {
        this.#queue.push(item);
      }
    });
  }

  /** An application-level round trip; resolves with the time it took in ms. Rejects when not open. */
  ping() {
    if (!this.#isOpen()) {
      const code = this.#closed ? "closed" : "disconnected";
      return Promise.reject(new RingSocketError(code, "not connected"));
    }
    return new Promise((resolve, reject) => {
      const id = this.#nextId++;
      this.#pending.set(id, { kind: "ping", started: now(), resolve, reject });
      this.#send({ id, type: "ping" });
    });
  }

  /** Closes the connection for good: pending publishes and subscriptions reject with code "closed". */
  close() {
    if (this.#closed) return;
    this.#shutdown(new RingSocketError("closed", "the client was closed"));
  }

  // ---- internals used by Subscription ------------------------------------------------

  /** @internal */
  _position(topic) {
    const ts = this.#topics.get(topic);
    return ts && ts.epoch !== null ? { offset: ts.offset, epoch: ts.epoch } : null;
  }

  /** @internal */
  _unsubscribe(sub) {
    const ts = this.#topics.get(sub.topic);
    if (!ts) return;
    const i = ts.subs.indexOf(sub);
    if (i === -1) return;
    ts.subs.splice(i, 1);
    if (ts.subs.length > 0) return;
    this.#topics.delete(ts.topic);
    if (this.#isOpen() && ts.phase !== "idle") this.#sendUnsubscribe(ts.topic);
  }

  // ---- connection ---------------------------------------------------------------------

  async #connect() {
    const generation = ++this.#generation;
    let url = this.#url;
    if (this.#token != null) {
      let token;
      try {
        token = typeof this.#token === "function" ? await this.#token() : this.#token;
      } catch (err) {
        if (generation !== this.#generation || this.#closed) return;
        this.#emitError(new RingSocketError("token", "the token function failed", { cause: err }));
        this.#connectionLost();
        return;
      }
      if (generation !== this.#generation || this.#closed) return;
      if (token != null && token !== "") {
        const u = new URL(url);
        u.searchParams.set("token", String(token));
        url = u.href;
      }
    }
    let ws;
    try {
      ws = new this.#WebSocket(url, PROTOCOL);
    } catch (err) {
      this.#emitError(new RingSocketError("socket", `cannot open a WebSocket: ${err?.message ?? err}`, { cause: err }));
      this.#connectionLost();
      return;
    }
    this.#ws = ws;
    ws.onopen = () => this.#onOpen(ws);
    ws.onmessage = (event) => this.#onMessage(ws, event);
    ws.onerror = (event) => this.#onSocketError(ws, event);
    ws.onclose = (event) => this.#onClose(ws, event);
  }

  #onOpen(ws) {
    if (ws !== this.#ws) return;
    if (ws.protocol !== PROTOCOL) {
      this.#emitError(new RingSocketError("protocol", `the server chose subprotocol ${JSON.stringify(ws.protocol)}, not ${PROTOCOL}`));
      try {
        ws.close();
      } catch {
        // The close event that follows (or not) is handled like any other.
      }
      return;
    }
    this.#openedAt = now();
    this.#state = "open";
    for (const ts of this.#topics.values()) this.#sendSubscribe(ts);
    const queue = this.#queue;
    this.#queue = [];
    for (const item of queue) this.#sendPublish(item);
    this.#emit("state", "open");
  }

  #onSocketError(ws, event) {
    if (ws !== this.#ws) return;
    const message = event?.message || event?.error?.message || "WebSocket error";
    this.#emitError(new RingSocketError("socket", message, { cause: event?.error ?? event }));
  }

  #onClose(ws, event) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    detach(ws);
    this.#emit("disconnect", { code: event?.code ?? 1006, reason: event?.reason ?? "", wasClean: Boolean(event?.wasClean) });
    if (this.#closed) return;
    const wasOpen = this.#state === "open";
    if (wasOpen && now() - this.#openedAt >= this.#resetAfter) this.#attempt = 0;
    this.#failPending();
    this.#connectionLost();
  }

  // Fails what was sent on the connection that just closed; the subscriptions are sent
  // again (with `since`) on the next one.
  #failPending() {
    const pending = this.#pending;
    this.#pending = new Map();
    for (const p of pending.values()) {
      if (p.kind === "publish" || p.kind === "ping") {
        p.reject(new RingSocketError("disconnected", "the connection closed before the reply", { topic: p.topic }));
      }
    }
    for (const ts of this.#topics.values()) ts.phase = "idle";
  }

  // After a failed attempt or a dropped connection: back off and try again, or close.
  #connectionLost() {
    if (this.#closed) return;
    if (!this.#reconnect) {
      this.#shutdown(new RingSocketError("closed", "the connection closed (reconnect is off)"));
      return;
    }
    this.#setState("connecting");
    if (this.#closed) return; // a "state" listener closed the client
    this.#attempt += 1;
    const delay = this.#backoff(this.#attempt);
    this.#emit("reconnecting", { attempt: this.#attempt, delay });
    if (this.#closed) return;
    const generation = this.#generation;
    this.#timer = setTimeout(() => {
      this.#timer = null;
      if (!this.#closed && generation === this.#generation) this.#connect();
    }, delay);
  }

  // Exponential backoff with jitter: attempt n waits a uniformly random time in
  // [max(min, hi/2), hi] with hi = min(maxDelay, minDelay * 2^n). The ranges of successive
  // attempts touch, so the delays never shrink until they reach the cap, and stay random
  // there ([maxDelay/2, maxDelay]) so that clients dropped together do not come back together.
  #backoff(attempt) {
    const hi = Math.min(this.#maxDelay, this.#minDelay * 2 ** Math.min(attempt, 40));
    const lo = Math.min(hi, Math.max(this.#minDelay, hi / 2));
    return Math.round(lo + Math.random() * (hi - lo));
  }

  #shutdown(error) {
    this.#closed = true;
    this.#generation += 1;
    if (this.#timer !== null) {
      clearTimeout(this.#timer);
      this.#timer = null;
    }
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000);
      } catch {
        // Already closing.
      }
    }
    const pending = this.#pending;
    this.#pending = new Map();
    for (const p of pending.values()) {
      if (p.kind === "publish" || p.kind === "ping") p.reject(withTopic(error, p.topic));
    }
    const queue = this.#queue;
    this.#queue = [];
    for (const item of queue) item.reject(withTopic(error, item.topic));
    const topics = [...this.#topics.values()];
    this.#topics.clear();
    for (const ts of topics) for (const sub of ts.subs) sub._end(withTopic(error, ts.topic));
    this.#setState("closed");
  }

  // ---- frames out ---------------------------------------------------------------------

  #isOpen() {
    return this.#state === "open" && this.#ws !== null;
  }

  #send(frame) {
    const text = typeof frame === "string" ? frame : JSON.stringify(frame);
    try {
      this.#ws.send(text);
    } catch (err) {
      // The socket is closing; its close event fails what is pending.
      this.#emitError(new RingSocketError("socket", `send failed: ${err?.message ?? err}`, { cause: err }));
    }
  }

  #sendSubscribe(ts) {
    const id = this.#nextId++;
    const frame = { id, type: "subscribe", topic: ts.topic };
    const since = ts.epoch !== null ? { offset: ts.offset, epoch: ts.epoch } : ts.since;
    if (since) frame.since = since;
    ts.phase = "pending";
    this.#pending.set(id, { kind: "subscribe", ts, topic: ts.topic, resubscribed: ts.subscribedOnce });
    this.#send(frame);
  }

  #sendUnsubscribe(topic) {
    const id = this.#nextId++;
    this.#pending.set(id, { kind: "unsubscribe", topic });
    this.#send({ id, type: "unsubscribe", topic });
  }

  #sendPublish(item) {
    const id = this.#nextId++;
    this.#pending.set(id, { kind: "publish", topic: item.topic, resolve: item.resolve, reject: item.reject });
    this.#send(`{"id":${id},"type":"publish","topic":${JSON.stringify(item.topic)},"data":${item.json}}`);
  }

  // ---- frames in ----------------------------------------------------------------------

  #onMessage(ws, event) {
    if (ws !== this.#ws) return;
    if (typeof event.data !== "string") {
      this.#emitError(new RingSocketError("protocol", "a binary frame on ringsocket.v1"));
      return;
    }
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      this.#emitError(new RingSocketError("protocol", `a frame that is not JSON: ${event.data.slice(0, 100)}`));
      return;
    }
    if (msg === null || typeof msg !== "object" || Array.isArray(msg)) {
      this.#emitError(new RingSocketError("protocol", "a frame that is not a JSON object"));
      return;
    }
    switch (msg.type) {
      case "pub":
        this.#onPub(msg);
        break;
      case "subscribed":
        this.#onReply(msg, "subscribe", (p) => this.#onSubscribed(p, msg));
        break;
      case "published":
        this.#onReply(msg, "publish", (p) => p.resolve({ topic: p.topic, offset: msg.offset, epoch: msg.epoch }));
        break;
      case "unsubscribed":
        this.#onReply(msg, "unsubscribe", () => {});
        break;
      case "pong":
        this.#onReply(msg, "ping", (p) => p.resolve(now() - p.started));
        break;
      case "error":
        this.#onErrorFrame(msg);
        break;
      default:
        // A type of a later protocol revision: nothing to do with it.
        break;
    }
  }

  #onReply(msg, kind, handle) {
    const p = this.#pending.get(msg.id);
    if (!p || p.kind !== kind) {
      this.#emitError(new RingSocketError("protocol", `a ${msg.type} reply with no ${kind} request of id ${msg.id}`));
      return;
    }
    this.#pending.delete(msg.id);
    handle(p);
  }

  #onSubscribed(p, msg) {
    const ts = p.ts;
    // Unsubscribed (and maybe subscribed anew) since: this reply is for nobody.
    if (this.#topics.get(ts.topic) !== ts) return;
    if (!Number.isSafeInteger(msg.offset) || typeof msg.epoch !== "string") {
      this.#emitError(new RingSocketError("protocol", `a subscribed reply without offset and epoch for ${ts.topic}`, { topic: ts.topic }));
      return;
    }
    const missed = Number.isSafeInteger(msg.missed) && msg.missed > 0 ? msg.missed : 0;
    ts.phase = "active";
    ts.epoch = msg.epoch;
    // The `missed` publications follow at once and end at `offset`: the position before
    // them is `offset - missed` (`since.offset` when everything was recovered).
    ts.offset = Math.max(0, msg.offset - missed);
    ts.conflated = msg.conflated === true;
    ts.subscribedOnce = true;
    const info = { recovered: msg.recovered === true, missed, offset: msg.offset, epoch: msg.epoch, conflated: ts.conflated };
    for (const sub of ts.subs.slice()) sub._settle(info);
    this.#emit("subscribed", { topic: ts.topic, ...info, resubscribed: p.resubscribed });
  }

  #onPub(msg) {
    const ts = this.#topics.get(msg.topic);
    // Not subscribed (any more), or a (re)subscribe whose reply has not come yet: what
    // arrives before that reply is covered by its `since`.
    if (!ts || ts.phase !== "active") return;
    if (!Number.isSafeInteger(msg.offset) || typeof msg.epoch !== "string") {
      this.#emitError(new RingSocketError("protocol", `a publication without offset and epoch on ${msg.topic}`, { topic: msg.topic }));
      return;
    }
    if (msg.epoch !== ts.epoch) {
      // The topic's history was lost while subscribed: offsets restart at 1.
      ts.epoch = msg.epoch;
      ts.offset = 0;
    }
    // Already handled. On a conflated topic a window's values may come after the
    // position a (re)subscription started from: keep them (they are the latest).
    if (msg.offset <= ts.offset && !ts.conflated) return;
    if (msg.offset > ts.offset + 1 && !ts.conflated) {
      if (ts.gapRetries < MAX_GAP_RETRIES) {
        ts.gapRetries += 1;
        this.#fillGap(ts);
        return;
      }
      this.#emitError(
        new RingSocketError("gap", `${msg.topic}: offsets ${ts.offset + 1} to ${msg.offset - 1} could not be recovered`, { topic: msg.topic }),
      );
    } else {
      ts.gapRetries = 0;
    }
    ts.offset = Math.max(ts.offset, msg.offset);
    const message = { topic: msg.topic, offset: msg.offset, epoch: msg.epoch, data: msg.data };
    if (msg.encoding !== undefined) message.encoding = msg.encoding;
    for (const sub of ts.subs.slice()) {
      try {
        sub._deliver(message);
      } catch (err) {
        this.#callbackError(err, `the callback of ${msg.topic}`);
      }
    }
  }

  // A publication skipped on a topic that is not conflated: subscribe again from the last
  // one handled. Unsubscribe first, as the protocol does not say what a second subscribe
  // to the same topic does; what comes before the new `subscribed` reply is dropped.
  #fillGap(ts) {
    this.#sendUnsubscribe(ts.topic);
    this.#sendSubscribe(ts);
  }

  #onErrorFrame(msg) {
    const p = msg.id === undefined || msg.id === null ? undefined : this.#pending.get(msg.id);
    const code = typeof msg.code === "string" ? msg.code : "unknown";
    const message = typeof msg.message === "string" && msg.message !== "" ? msg.message : code;
    if (!p) {
      this.#emitError(new RingSocketError(code, message, { id: msg.id ?? undefined }));
      return;
    }
    this.#pending.delete(msg.id);
    const error = new RingSocketError(code, message, { topic: p.topic, id: msg.id });
    switch (p.kind) {
      case "publish":
      case "ping":
        p.reject(error);
        break;
      case "subscribe": {
        const ts = p.ts;
        if (this.#topics.get(ts.topic) !== ts) return;
        // Refused: this topic is over for this client, whether it is the first subscribe or
        // a resubscribe (say, after a reconnect with a token that no longer allows it).
        this.#topics.delete(ts.topic);
        let anySettled = false;
        for (const sub of ts.subs) anySettled = sub._end(error) || anySettled;
        if (anySettled) this.#emitError(error);
        break;
      }
      case "unsubscribe":
        // `not_subscribed` for a subscribe that had been refused: nothing left to undo.
        if (code !== "not_subscribed") this.#emitError(error);
        break;
    }
  }

  // ---- events -------------------------------------------------------------------------

  #listenersOf(name, fn) {
    const list = this.#listeners.get(name);
    if (!list) throw new TypeError(`unknown event ${JSON.stringify(name)}; one of ${EVENTS.join(", ")}`);
    if (typeof fn !== "function") throw new TypeError("listener must be a function");
    return list;
  }

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.#emit("state", state);
  }

  #emit(name, arg) {
    for (const fn of this.#listeners.get(name).slice()) {
      try {
        fn.call(this, arg);
      } catch (err) {
        if (name === "error") reportUncaught(err);
        else this.#callbackError(err, `a "${name}" listener`);
      }
    }
  }

  #emitError(error) {
    if (this.#listeners.get("error").length > 0) this.#emit("error", error);
  }

  // A user callback threw: the client goes on; the error goes to the "error" listeners,
  // or to the console when there is none (it must not vanish).
  #callbackError(err, where) {
    const error = new RingSocketError("callback", `${where} threw: ${err?.message ?? err}`, { cause: err });
    if (this.#listeners.get("error").length > 0) this.#emit("error", error);
    else reportUncaught(error);
  }
}

function resolveUrl(url) {
  const base = globalThis.location?.href;
  const u = base === undefined ? new URL(String(url)) : new URL(String(url), base);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new SyntaxError(`not a ws:// or wss:// URL: ${u.href}`);
  }
  return u.href;
}

function definedOnly(options) {
  const out = {};
  for (const [key, value] of Object.entries(options ?? {})) if (value !== undefined) out[key] = value;
  return out;
}

function nonNegative(value, name) {
  if (typeof value !== "number" || !(value >= 0) || value === Infinity) {
    throw new TypeError(`options.${name} must be a finite number >= 0`);
  }
  return value;
}

function withTopic(error, topic) {
  if (topic === undefined) return error;
  return new RingSocketError(error.code, error.message, { topic, cause: error.cause });
}

// Handlers that do nothing rather than none: the `ws` package throws an "error" event
// that has no listener (as when a socket still connecting is closed).
function detach(ws) {
  const noop = () => {};
  ws.onopen = noop;
  ws.onmessage = noop;
  ws.onerror = noop;
  ws.onclose = noop;
}

function now() {
  return globalThis.performance?.now?.() ?? Date.now();
}

function reportUncaught(err) {
  globalThis.console?.error?.("ringsocket:", err);
}
