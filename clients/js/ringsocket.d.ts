// Types of ringsocket.js, the client of the ringsocket.v1 protocol (docs/protocol.md).

/** The connection's state: "closed" only after `close()` (or a drop with `reconnect: false`). */
export type State = "connecting" | "open" | "closed";

/** A topic's position: the offset of a publication and the epoch its offsets count in. */
export interface Since {
  offset: number;
  epoch: string;
}

/** A publication, as handed to a subscription's callback, in offset order. */
export interface Publication<T = unknown> {
  topic: string;
  /** Counts the topic's publications from 1, one by one within an epoch. */
  offset: number;
  /** Changes whenever the topic's history is lost; offsets restart at 1 then. */
  epoch: string;
  /** The published JSON value; the base64 of the bytes when `encoding` is "base64". */
  data: T;
  /** Present for a binary publication (POST /publish with application/octet-stream, a raw binary message). */
  encoding?: "base64";
}

/** What `Subscription#ready` resolves with: the server's `subscribed` reply. */
export interface SubscribeResult {
  /** With `since`: every publication after it was still kept and follows. Always false without `since`. */
  recovered: boolean;
  /** How many publications after `since` follow the reply at once. */
  missed: number;
  /** The topic's last offset when the subscription started (0 if none). */
  offset: number;
  epoch: string;
  /** A conflated topic: offsets skip by design, and are not treated as a gap. */
  conflated: boolean;
}

/** The "subscribed" event: every subscribe and resubscribe the server answered. */
export interface SubscribedEvent extends SubscribeResult {
  topic: string;
  /** True after a reconnect or to fill a gap; false for the first subscribe of a topic. */
  resubscribed: boolean;
}

/** What `publish` resolves with: the server's `published` ack. */
export interface PublishAck {
  topic: string;
  offset: number;
  epoch: string;
}

/** The "reconnecting" event: a reconnect attempt is scheduled in `delay` ms. */
export interface ReconnectingEvent {
  /** 1 for the first attempt after a drop; reset by a connection that stayed open `resetBackoffAfter` ms. */
  attempt: number;
  delay: number;
}

/** The "disconnect" event: a WebSocket closed (or could not be opened). */
export interface DisconnectEvent {
  code: number;
  reason: string;
  wasClean: boolean;
}

/** Error codes of the protocol's error replies. */
export type ServerErrorCode =
  | "bad_request"
  | "bad_topic"
  | "not_allowed"
  | "too_many_topics"
  | "not_subscribed"
  | "unavailable";

/** Error codes of the client itself. */
export type ClientErrorCode =
  | "closed"
  | "disconnected"
  | "queue_full"
  | "unsubscribed"
  | "socket"
  | "token"
  | "protocol"
  | "callback"
  | "gap";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

export class RingSocketError extends Error {
  constructor(code: ErrorCode | (string & {}), message: string, extra?: { topic?: string; id?: number; cause?: unknown });
  readonly name: "RingSocketError";
  /** The protocol's code for an error reply, or one of the client's. */
  readonly code: ErrorCode | (string & {});
  /** The topic of the request or subscription concerned, when there is one. */
  readonly topic?: string;
  /** The id of the request an error reply answered. */
  readonly id?: number;
}

/** A token, or where to get one: called (and awaited) at every connect and reconnect. */
export type TokenSource = string | (() => string | null | undefined | Promise<string | null | undefined>);

/**
 * The WebSocket constructor used: the browser's, or the `ws` package's in node 20. The
 * client calls `new WebSocket(url, "ringsocket.v1")` and uses `protocol`, `send`, `close`
 * and the `onopen`, `onmessage`, `onerror` and `onclose` handlers.
 */
export type WebSocketConstructor = new (url: string, protocols: string) => any;

export interface RingSocketOptions {
  /** A JWT, sent as `?token=` (browsers cannot set headers on a WebSocket). Default: none. */
  token?: TokenSource | null;
  /** Reconnect after a drop, with exponential backoff and jitter. Default true. */
  reconnect?: boolean;
  /** The WebSocket constructor. Default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** The shortest reconnect delay, in ms. Default 250. */
  minReconnectDelay?: number;
  /** The longest reconnect delay, in ms. Default 10000. */
  maxReconnectDelay?: number;
  /** A connection open at least this long (ms) before it drops starts the backoff over. Default 5000. */
  resetBackoffAfter?: number;
  /** How many publishes may wait for the connection; beyond, `publish` rejects with "queue_full". Default 1000. */
  maxQueuedPublishes?: number;
}

export interface SubscribeOptions {
  /** Resume from a position the application kept (say, across page loads). */
  since?: Since;
}

export interface RingSocketEventMap {
  state: State;
  subscribed: SubscribedEvent;
  error: RingSocketError;
  reconnecting: ReconnectingEvent;
  disconnect: DisconnectEvent;
}

export class RingSocket {
  /**
   * Connects at once (after the current synchronous code). `url`: the server's `/v1`, as
   * `ws(s)://` or `http(s)://`; in a browser it may be relative to the page.
   */
  constructor(url: string | URL, options?: RingSocketOptions);
  /** The URL connected to, without the token. */
  readonly url: string;
  readonly state: State;
  on<K extends keyof RingSocketEventMap>(name: K, listener: (value: RingSocketEventMap[K]) => void): this;
  off<K extends keyof RingSocketEventMap>(name: K, listener: (value: RingSocketEventMap[K]) => void): this;
  /** Subscribes; the callback gets every publication in offset order, across reconnects. */
  subscribe<T = unknown>(topic: string, callback: (message: Publication<T>) => void, options?: SubscribeOptions): Subscription;
  /** Publishes any JSON value; resolves with the server's ack. Waits (queued) while not open. */
  publish(topic: string, data: unknown): Promise<PublishAck>;
  /** An application-level round trip (not needed for keepalive); resolves with its time in ms. */
  ping(): Promise<number>;
  /** Closes for good: waiting publishes and subscriptions reject with code "closed". */
  close(): void;
}

export class Subscription {
  private constructor();
  readonly topic: string;
  /** Resolves with the first `subscribed` reply; rejects with `.code` when refused, unsubscribed or closed before. */
  readonly ready: Promise<SubscribeResult>;
  /** False once unsubscribed, refused or closed. */
  readonly active: boolean;
  /** The offset of the last publication handled (or of the subscribed reply); null before it. */
  readonly offset: number | null;
  readonly epoch: string | null;
  /** Stops the callback at once and unsubscribes on the server unless another subscription of this client shares the topic. */
  unsubscribe(): void;
}
