// The tests' harness: a real `ringsocket serve` on a free port, a TCP proxy that can cut
// the connection, a WebSocket that records (or drops) frames, and waiting on events.
// Outside test/, where node's runner would take it for a test file.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { EventEmitter } from "node:events";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

const here = path.dirname(fileURLToPath(import.meta.url));
export const CLIENT_DIR = here;
export const BIN = process.env.RINGSOCKET_BIN
  ? path.resolve(process.env.RINGSOCKET_BIN)
  : path.resolve(CLIENT_DIR, "../../target/release/ringsocket");

// Generous: a 2-core machine shared with builds.
export const TIMEOUT = 30_000;

/** A port nobody listens on right now: bind port 0, read it, close. */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/**
 * Starts `ringsocket serve --bind 127.0.0.1:PORT --set K=V ...` (on a free port unless
 * `port` is given) and waits for its listening line. Returns { port, wsUrl, httpUrl,
 * stop(), output() }.
 */
export async function startServer({ settings = {}, args = [], port } = {}) {
  const sets = Object.entries(settings).flatMap(([k, v]) => ["--set", `${k}=${v}`]);
  if (port !== undefined) return spawnServer(port, [...sets, ...args]);
  let lastError;
  // The free port can be taken by someone else between the check and the bind: retry.
  for (let tries = 0; tries < 5; tries++) {
    const port = await freePort();
    try {
      return await spawnServer(port, [...sets, ...args]);
    } catch (err) {
      lastError = err;
      if (!/in use|AddrInUse/i.test(err.message)) throw err;
    }
  }
  throw lastError;
}

function spawnServer(port, extra) {
  // The server reads every RINGSOCKET_<FIELD> variable as a setting and refuses unknown
  // ones: RINGSOCKET_BIN is ours, not its. (Others, e.g. RINGSOCKET_IO_BACKEND, pass on.)
  const { RINGSOCKET_BIN: _, ...env } = process.env;
  const child = spawn(BIN, ["serve", "--bind", `127.0.0.1:${port}`, ...extra], {
    stdio: ["ignore", "pipe", "pipe"],
    env,
  });
  let stdout = "";
  let stderr = "";
  const output = () => `--- stdout\n${stdout}\n--- stderr\n${stderr.slice(-4000)}`;
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`ringsocket serve did not print its listening line in ${TIMEOUT} ms\n${output()}`));
    }, TIMEOUT);
    child.once("error", (err) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${BIN} (set RINGSOCKET_BIN): ${err.message}`));
    });
    child.stderr.setEncoding("utf8").on("data", (chunk) => {
      stderr += chunk;
    });
    child.stdout.setEncoding("utf8").on("data", (chunk) => {
      stdout += chunk;
      const m = /ringsocket listening on (\S+?):(\d+):/.exec(stdout);
      if (!m) return;
      clearTimeout(timer);
      const listening = Number(m[2]);
      resolve({
        port: listening,
        wsUrl: `ws://127.0.0.1:${listening}/v1`,
        httpUrl: `http://127.0.0.1:${listening}`,
        output,
        async stop() {
          if (child.exitCode !== null || child.signalCode !== null) return;
          child.kill("SIGTERM");
          const killer = setTimeout(() => child.kill("SIGKILL"), TIMEOUT);
          await exited;
          clearTimeout(killer);
        },
      });
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`ringsocket serve exited (code ${code}, signal ${signal}) before listening\n${output()}`));
    });
  });
}

/** POST /publish/{topic}; resolves with the response after checking it is 2xx. */
export async function httpPublish(server, topic, body, headers = {}) {
  const res = await fetch(`${server.httpUrl}/publish/${encodeURIComponent(topic)}`, { method: "POST", body, headers });
  const text = await res.text();
  if (!res.ok) throw new Error(`POST /publish/${topic}: ${res.status} ${text}`);
  return res;
}

/** GET /history/{topic}?since=N as JSON. */
export async function httpHistory(server, topic, since = 0) {
  const res = await fetch(`${server.httpUrl}/history/${encodeURIComponent(topic)}?since=${since}`);
  const text = await res.text();
  if (!res.ok) throw new Error(`GET /history/${topic}: ${res.status} ${text}`);
  return JSON.parse(text);
}

/**
 * A TCP proxy to 127.0.0.1:targetPort. cut() drops every connection and then drops each
 * new one at once, until restore().
 */
export async function startProxy(targetPort) {
  const sockets = new Set();
  let cut = false;
  const server = net.createServer((client) => {
    if (cut) {
      client.destroy();
      return;
    }
    const upstream = net.connect(targetPort, "127.0.0.1");
    sockets.add(client);
    sockets.add(upstream);
    const end = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    for (const s of [client, upstream]) {
      s.on("error", end);
      s.on("close", end);
    }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const { port } = server.address();
  return {
    port,
    wsUrl: `ws://127.0.0.1:${port}/v1`,
    cut() {
      cut = true;
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    restore() {
      cut = false;
    },
    async close() {
      this.cut();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** A list that can be waited on: push() adds, wait(pred) resolves once pred(items) holds. */
export class Recorder {
  items = [];
  #events = new EventEmitter();

  push(item) {
    this.items.push(item);
    this.#events.emit("push");
  }

  wait(pred, what, ms = TIMEOUT) {
    if (pred(this.items)) return Promise.resolve(this.items);
    return new Promise((resolve, reject) => {
      const check = () => {
        if (!pred(this.items)) return;
        clearTimeout(timer);
        this.#events.off("push", check);
        resolve(this.items);
      };
      const timer = setTimeout(() => {
        this.#events.off("push", check);
        const got = JSON.stringify(this.items, replacer);
        reject(new Error(`timed out after ${ms} ms waiting for ${what}; got ${got.slice(-3000)}`));
      }, ms);
      this.#events.on("push", check);
    });
  }

  /** Waits for at least n items. */
  count(n, what = `${n} items`, ms = TIMEOUT) {
    return this.wait((items) => items.length >= n, what, ms);
  }
}

function replacer(_key, value) {
  if (value instanceof Error) return { error: value.message, code: value.code };
  return value;
}

/** Records every event of the given names on a RingSocket into one Recorder of {name, value}. */
export function recordEvents(rs, names = ["state", "subscribed", "error", "reconnecting", "disconnect"]) {
  const rec = new Recorder();
  for (const name of names) rs.on(name, (value) => rec.push({ name, value }));
  rec.of = (name) => rec.items.filter((e) => e.name === name).map((e) => e.value);
  rec.waitFor = (name, pred = () => true, what = name) =>
    rec.wait((items) => items.some((e) => e.name === name && pred(e.value)), what).then(
      (items) => items.filter((e) => e.name === name && pred(e.value)).at(-1).value,
    );
  return rec;
}

/**
 * A WebSocket class (the `ws` package's, extended) that records the frames each socket
 * sends and receives in `wire` ({dir: "out" | "in", frame, socket}), the URLs it was opened
 * with in `urls`, its instances in `sockets`; incoming frames for which `drop(frame)` is
 * true never reach the client, those for which `repeat(frame)` is true reach it twice.
 */
export function wiredWebSocket({ drop = () => false, repeat = () => false } = {}) {
  const wire = new Recorder();
  const urls = [];
  const sockets = [];
  class Wired extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      urls.push({ url: String(url), at: performance.now() });
      sockets.push(this);
      const n = sockets.length;
      this.addEventListener("message", (e) => wire.push({ dir: "in", frame: parse(e.data), socket: n }));
    }
    send(data, ...rest) {
      wire.push({ dir: "out", frame: parse(data), socket: sockets.indexOf(this) + 1 });
      return super.send(data, ...rest);
    }
    set onmessage(fn) {
      super.onmessage = (e) => {
        const frame = parse(e.data);
        if (drop(frame)) return;
        fn(e);
        if (repeat(frame)) fn(e);
      };
    }
    get onmessage() {
      return super.onmessage;
    }
  }
  return { WebSocket: Wired, wire, urls, sockets };
}

function parse(data) {
  try {
    return JSON.parse(String(data));
  } catch {
    return String(data);
  }
}

/** An HS256 JWT for a server started with jwt_secret = secret. */
export function jwt(claims, secret) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** Resolves (with the error) when the promise rejects; fails when it resolves. */
export async function rejection(promise, what = "the promise") {
  try {
    const value = await promise;
    throw Object.assign(new Error(`${what} resolved with ${JSON.stringify(value)}, expected a rejection`), { unexpected: true });
  } catch (err) {
    if (err.unexpected) throw err;
    return err;
  }
}

/** Rejects after ms (a guard for promises that must settle). */
export function within(promise, what, ms = TIMEOUT) {
  let timer;
  const guard = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, guard]).finally(() => clearTimeout(timer));
}

export { WebSocket };
