//! The sans-IO protocol core: RFC 6455 handshake, frames, masking, UTF-8, close codes
//! and the connection state machine, for both roles; the PROXY protocol header.
//!
//! Nothing here touches a socket, a runtime, a clock or an entropy source: bytes go in,
//! events and bytes to write come out, and randomness (handshake keys, masking seeds) is
//! passed in by the caller. That is what lets this layer be unit-tested, fuzzed and
//! benchmarked on its own, and shared by the server and the bench client.

pub mod close;
pub mod conn;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod limits;
pub mod mask;
pub mod proxy;
pub mod utf8;

pub use close::{CloseCode, CloseFrame};
pub use conn::{CloseState, Connection, Event, EventRef, Message, Role, SendError};
pub use deflate::{DeflateParams, PerMessageDeflate};
pub use error::ProtocolError;
pub use frame::{FrameHeader, OpCode};
pub use handshake::{
    AcceptKey, Accepted, ClientHandshake, ClientHandshakeError, ClientRequest, HandshakeError,
    HeadReader, Request,
};
pub use limits::{HandshakeLimits, Limits};
pub use proxy::{ProxyAddresses, ProxyError, ProxyHeader, ProxyVersion};
pub use utf8::Utf8Bytes;
