// `bun echo.js PORT`: Bun's WebSocket echo server (uWebSockets underneath), written the
// way Bun's docs show it: Bun.serve upgrades every request, and the `message` handler
// sends each message straight back. Bun runs JavaScript on one thread, so it compares
// with `ringsocket serve --workers 1` on one pinned core.
const port = Number(process.argv[2] ?? 9004);

// With TLS_CERT and TLS_KEY (PEM files) set, Bun serves wss:// (its `tls` option),
// for the TLS table of benches/README.md.
const tls = process.env.TLS_CERT
  ? { cert: Bun.file(process.env.TLS_CERT), key: Bun.file(process.env.TLS_KEY) }
  : undefined;

const compress = process.env.DEFLATE === "1";

const server = Bun.serve({
  hostname: "127.0.0.1",
  port,
  tls,
  fetch(req, server) {
    if (server.upgrade(req)) {
      return; // Bun answered the handshake with 101.
    }
    return new Response("WebSocket only\n", { status: 426 });
  },
  websocket: {
    // DEFLATE=1: permessage-deflate as Bun documents it (`perMessageDeflate: true`, its
    // shared compressor), for the compression table of benches/README.md.
    perMessageDeflate: compress,
    // Bun's defaults are kept: 16 MiB payload limit, 120 s idle timeout, backpressure.
    message(ws, message) {
      // Bun compresses a message only when asked to (its second argument).
      ws.send(message, compress);
    },
  },
});

console.log(`bun-echo listening on ${tls ? "wss" : "ws"}://${server.hostname}:${server.port}/`);
