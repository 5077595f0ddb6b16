#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/, one small file per named case.

The corpora are checked in; rerun this after changing a target's input layout:
    python3 fuzz/seeds.py
`cargo fuzz fmt <target> <file>` shows how a server_conn or roundtrip seed decodes.
"""

import base64
import hashlib
import json
import pathlib
import shutil
import struct
import zlib

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"
KEY = (0x37, 0xFA, 0x21, 0x3D)  # RFC 6455 §5.7's masking key


def frame(opcode, payload=b"", fin=True, key=KEY, rsv=0, length_form=None):
    """One frame; masked with `key` unless it is None. `length_form` forces 16/64."""
    out = bytearray([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if key is not None else 0
    n = len(payload)
    if length_form is None:
        length_form = 7 if n <= 125 else 16 if n <= 0xFFFF else 64
    if length_form == 7:
        out.append(mask_bit | n)
    elif length_form == 16:
        out += bytes([mask_bit | 126]) + struct.pack(">H", n)
    else:
        out += bytes([mask_bit | 127]) + struct.pack(">Q", n)
    if key is not None:
        out += bytes(key)
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(out + payload)


def close_body(code, reason=b""):
    return struct.pack(">H", code) + reason


# ---- handshake: byte 0 picks the piece sizes, the rest is a request or response ----

SAMPLE_KEY = base64.b64encode(b"the sample nonce").decode()  # dGhlIHNhbXBsZSBub25jZQ==
ACCEPT = base64.b64encode(
    hashlib.sha1((SAMPLE_KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
).decode()  # s3pPLMBiTxaQ9kYGzzhZRbK+xOo=


def request(method="GET", target="/chat", version="1.1", headers=None):
    if headers is None:
        headers = request_headers() + [
            ("Origin", "http://example.com"),
            ("Sec-WebSocket-Protocol", "chat, superchat"),
        ]
    lines = [f"{method} {target} HTTP/{version}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def without(name):
    return [h for h in request_headers() if h[0] != name]


def request_headers():
    return [
        ("Host", "server.example.com"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", SAMPLE_KEY),
        ("Sec-WebSocket-Version", "13"),
    ]


RESPONSE_101 = (
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Accept: {ACCEPT}\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
).encode()

HANDSHAKE = {
    # RFC 6455 §1.2's sample request, in 1-byte, up-to-7, up-to-100 and 4 KiB pieces.
    "rfc-request-pieces-1": b"\x00" + request(),
    "rfc-request-pieces-7": b"\x45" + request(),
    "rfc-request-pieces-100": b"\x8b" + request(),
    "rfc-request-whole": b"\xc0" + request(),
    "query-extensions-frame-after": b"\x63"
    + request(
        target="/ws/room?token=x&y",
        headers=request_headers()
        + [
            ("Sec-WebSocket-Extensions", 'permessage-deflate; client_max_window_bits, x; a="b"'),
            ("Connection", "keep-alive, Upgrade"),
        ],
    )
    + frame(0x1, b"Hello"),
    "bad-version-8": b"\x80" + request(headers=without("Sec-WebSocket-Version") + [("Sec-WebSocket-Version", "8")]),
    "no-version": b"\x80" + request(headers=without("Sec-WebSocket-Version")),
    "bad-key": b"\x80" + request(headers=without("Sec-WebSocket-Key") + [("Sec-WebSocket-Key", "c2hvcnQ=")]),
    "two-hosts": b"\x80" + request(headers=request_headers() + [("Host", "other")]),
    "no-upgrade": b"\x80" + request(headers=without("Upgrade")),
    "post": b"\x80" + request(method="POST"),
    "http-1.0": b"\x80" + request(version="1.0"),
    "partial-head": b"\x21" + request()[:60],
    "bare-lf": b"\x9c" + request().replace(b"\r\n", b"\n"),
    "malformed-token": b"\x80GE(T / HTTP/1.1\r\n\r\n",
    # HeadReader in 1-byte pieces with no line end, past the 256-byte small limit.
    "long-line-1-byte-pieces": b"\x00" + b"a" * 258,
    "response-101": b"\xc0" + RESPONSE_101,
    "response-426": b"\x80HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n"
    b"Content-Length: 0\r\n\r\n",
}

# ---- frame_header: raw bytes --------------------------------------------------------

FRAME_HEADER = {
    "text-hello": frame(0x1, b"Hello", key=None),
    "text-hello-masked": frame(0x1, b"Hello"),  # 81 85 37 fa 21 3d 7f 9f 4d 51 58
    "fragment-first": frame(0x1, b"Hel", fin=False, key=None),
    "fragment-last": frame(0x0, b"lo", key=None),
    "ping-hello": frame(0x9, b"Hello", key=None),
    "pong-hello-masked": frame(0xA, b"Hello"),
    "close-1000-masked": frame(0x8, close_body(1000, b"bye")),
    "binary-256-len16": frame(0x2, bytes(256), key=None)[:4],
    "binary-64k-len64": frame(0x2, b"", key=None, length_form=64)[:2]
    + struct.pack(">Q", 65536),
    "nonminimal-len16": frame(0x2, bytes(5), length_form=16),
    "nonminimal-len64": frame(0x2, bytes(300), key=None, length_form=64)[:10],
    "len64-top-bit": b"\x82\x7f\x80\x00\x00\x00\x00\x00\x00\x01",
    "reserved-opcode-3": b"\x83\x00",
    "rsv-bits": frame(0x1, b"", rsv=0b111),
}

# ---- server_conn: tight byte, pieces (01 len16le action)* 00, then client bytes -----


def conn(data, pieces=(), tight=False):
    out = bytearray([1 if tight else 0])
    for length, action in pieces:
        out += b"\x01" + struct.pack("<HB", length, action)
    return bytes(out + b"\x00" + data)


HELLO = frame(0x1, b"Hello")
FRAGMENTED = frame(0x1, b"Hel", fin=False) + frame(0x0, b"lo")
SERVER_CONN = {
    "rfc-masked-hello": conn(HELLO),
    "rfc-masked-hello-1-byte-pieces": conn(HELLO, [(1, 0)] * len(HELLO)),
    "fragmented-hello-ping-between": conn(
        frame(0x1, b"Hel", fin=False) + frame(0x9, b"hi") + frame(0x0, b"lo"),
        [(3, 1), (5, 0), (9, 16)],
    ),
    "ping-pong-close": conn(
        frame(0x9, b"ping") + frame(0xA, b"pong") + frame(0x8, close_body(1000, b"bye"))
    ),
    "close-empty": conn(frame(0x8)),
    "app-ping-binary-then-close": conn(
        FRAGMENTED + frame(0x8, close_body(1001)), [(7, 4 | 8), (0, 2)]
    ),
    "binary-300-len16": conn(frame(0x2, bytes(range(256)) + bytes(44)), [(50, 1)]),
    "binary-300-tight": conn(frame(0x2, bytes(300)), tight=True),
    "fragments-over-tight-message": conn(
        frame(0x2, bytes(100), fin=False) + frame(0x0, bytes(100), fin=False)
        + frame(0x0, bytes(100), fin=False) + frame(0x0, bytes(100)),
        tight=True,
    ),
    "text-invalid-utf8": conn(frame(0x1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80")),
    "text-split-character": conn(
        frame(0x1, "κόσμε".encode()[:3], fin=False) + frame(0x0, "κόσμε".encode()[3:])
    ),
    "unmasked-frame": conn(frame(0x1, b"Hello", key=None)),
    "continuation-without-start": conn(frame(0x0, b"lo")),
    "close-code-1005": conn(frame(0x8, close_body(1005))),
    "close-length-one": conn(frame(0x8, b"\x03")),
    "ping-126-bytes": conn(frame(0x9, bytes(126))),
    "fragmented-ping": conn(frame(0x9, b"x", fin=False)),
    "server-closes-first": conn(frame(0x9, b"a") + frame(0x8, close_body(1000)), [(7, 2)]),
}

# ---- roundtrip: fragment, seed, pieces, then ops (01 op)* ---------------------------
# Lengths of strings and payloads are read from the END of the input, last op first.

TEXT, BINARY, PING, PONG, CLOSE = (bytes([0, 0, 0, v]) for v in (0x00, 0x34, 0x67, 0x9A, 0xCD))


def roundtrip(ops, fragment=None, seed=7, pieces=()):
    front = bytearray(b"\x00" if fragment is None else b"\x01" + struct.pack("<H", fragment))
    front.append(seed)
    for length in pieces:
        front += b"\x01" + struct.pack("<H", length)
    front += b"\x00"
    lengths = []
    for op in ops:
        front += b"\x01" + op[0]
        if op[0] == CLOSE:
            front += struct.pack("<H", op[1])
            body = op[2]
        else:
            body = op[1]
        front += body
        lengths.append(len(body))
    data = bytes(front) + bytes(reversed(lengths))
    assert len(data) <= 256, "a length would take two bytes"
    return data


ROUNDTRIP = {
    "text-binary": roundtrip([(TEXT, "Hello, κόσμε".encode()), (BINARY, bytes(range(40)))]),
    "fragmented-3": roundtrip(
        [(TEXT, b"fragmented text"), (BINARY, bytes(10)), (TEXT, b"")], fragment=3, pieces=[1, 5]
    ),
    "ping-pong-close": roundtrip(
        [(PING, b"hi"), (PONG, b"unsolicited"), (CLOSE, 1000, b"bye"), (TEXT, b"late")],
        pieces=[2, 2, 2],
    ),
    "ping-130-bytes": roundtrip([(PING, bytes(130))]),
    "close-unsendable-1005": roundtrip([(CLOSE, 1005, b""), (CLOSE, 4000, "é".encode() * 64)]),
    "close-reason-long": roundtrip([(CLOSE, 3000, b"r" * 130)]),
}

# ---- inflate: config, seed, direct limit (u16 LE), then (flags len16le payload)* -----
# config: bit 0 client takeover, bits 1-3 client_max_window_bits - 8, bits 4-6 the
# message limit (4 KiB << n). flags: bit 0 text, 1 plain, 2 deflated by the target's
# client compressor, 3 Ping between fragments, 4-6 fragments - 1, 7 corrupt a byte.

F_TEXT, F_PLAIN, F_DEFLATE, F_PING, F_CORRUPT = 1, 2, 4, 8, 0x80


def deflated(data, level=6, wbits=15, zdict=None):
    """RFC 7692 §7.2.1: raw deflate, sync flush, the final 00 00 ff ff removed."""
    c = zlib.compressobj(level, zlib.DEFLATED, -wbits, **({"zdict": zdict} if zdict else {}))
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate_config(takeover=False, bits=15, limit_kib=64):
    return (1 if takeover else 0) | (bits - 8) << 1 | (limit_kib // 4).bit_length() - 1 << 4


def inflate_seed(messages, takeover=False, bits=15, limit_kib=64, seed=7, direct_limit=4096):
    out = bytearray([inflate_config(takeover, bits, limit_kib), seed])
    out += struct.pack("<H", direct_limit)
    for flags, payload, fragments in messages:
        out += bytes([flags | (fragments - 1) << 4]) + struct.pack("<H", len(payload)) + payload
    return bytes(out)


def chat(n):
    """A chat room's JSON messages, repetitive as real ones are."""
    return json.dumps(
        [{"type": "message", "room": "general", "user": f"user{i % 7}", "text": f"hello {i}", "ts": 1700000000 + i}
         for i in range(n)],
        separators=(",", ":"),
    ).encode()


def takeover_pair(bits=15):
    """Two messages from one compressor that keeps its context: the second points back."""
    c = zlib.compressobj(6, zlib.DEFLATED, -bits)
    first = c.compress(chat(8)) + c.flush(zlib.Z_SYNC_FLUSH)
    second = c.compress(chat(8)) + c.flush(zlib.Z_SYNC_FLUSH)
    return first[:-4], second[:-4]


FIRST, SECOND = takeover_pair()
BOMB = deflated(bytes(1 << 20), level=9)  # 1 MiB of zeros in about 1 KiB
INFLATE = {
    "text-compressed": inflate_seed([(F_TEXT, deflated(chat(10)), 1)]),
    "binary-compressed-fragments-ping": inflate_seed([(F_PING, deflated(chat(30)), 4)]),
    "takeover-two-messages": inflate_seed([(F_TEXT, FIRST, 1), (F_TEXT, SECOND, 2)], takeover=True),
    "takeover-second-without-context": inflate_seed([(F_TEXT, SECOND, 1)], takeover=True),
    "no-takeover-refers-back": inflate_seed([(F_TEXT, FIRST, 1), (F_TEXT, SECOND, 1)]),
    "window-9-takeover-client": inflate_seed(
        [(F_TEXT | F_DEFLATE, chat(12), 3), (F_TEXT | F_DEFLATE, chat(12), 1)], takeover=True, bits=9
    ),
    "window-8-takeover-client": inflate_seed(
        [(F_DEFLATE, chat(6), 2), (F_DEFLATE, chat(6), 1)], takeover=True, bits=8, limit_kib=4
    ),
    "client-compressed-corrupt": inflate_seed([(F_TEXT | F_DEFLATE | F_CORRUPT, chat(10), 2)], seed=99),
    "bomb-over-4k": inflate_seed([(0, BOMB, 1)], limit_kib=4, direct_limit=65535),
    "bomb-client-over-4k": inflate_seed([(F_DEFLATE, bytes(5000), 5)], limit_kib=4),
    "plain-then-compressed": inflate_seed([(F_TEXT | F_PLAIN, b"plain", 1), (F_TEXT, deflated(chat(3)), 1)]),
    "stored-block-final": inflate_seed([(0, b"\x01\x05\x00\xfa\xffhello", 1)]),
    "invalid-utf8-inflated": inflate_seed([(F_TEXT, deflated(b"\xff" * 300), 1)]),
    "empty-compressed": inflate_seed([(F_TEXT, b"", 1), (0, b"\x00", 1)]),
    "garbage": inflate_seed([(0, b"\xff" * 20, 1)]),
    "dictionary-direct": inflate_seed([(F_TEXT, deflated(chat(4), zdict=chat(4)), 1)]),
}

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(command=0x21, family=0x11, payload=b""):
    """A PROXY protocol v2 header: signature, version/command, family, length, payload."""
    return V2_SIG + bytes([command, family]) + struct.pack(">H", len(payload)) + payload


PROXY_PROTOCOL = {
    "v1-tcp4": b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n\r\n",
    "v1-tcp6": b"PROXY TCP6 2001:db8::1 2001:db8::2 4711 80\r\n",
    "v1-unknown": b"PROXY UNKNOWN\r\n",
    "v1-bad-port": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 1\r\n",
    "v2-tcp4": proxy_v2(payload=bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack(">HH", 56324, 443)),
    "v2-tcp6-tlv": proxy_v2(
        family=0x21,
        payload=bytes(15) + b"\x01" + bytes(15) + b"\x02" + struct.pack(">HH", 4711, 443) + b"\x04\x00\x03abc",
    ),
    "v2-local": proxy_v2(command=0x20, family=0x00),
    "v2-unix": proxy_v2(family=0x31, payload=bytes(216)),
}


def main():
    for target, seeds in [
        ("handshake", HANDSHAKE),
        ("frame_header", FRAME_HEADER),
        ("server_conn", SERVER_CONN),
        ("roundtrip", ROUNDTRIP),
        ("proxy_protocol", PROXY_PROTOCOL),
        ("inflate", INFLATE),
    ]:
        folder = CORPUS / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
