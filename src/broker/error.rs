//! Why a broker could not start: one error type for every broker.

use std::fmt;

/// Which broker an error is about; its messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerName {
    /// Redis Pub/Sub ([`super::redis`]).
    Redis,
    /// NATS with JetStream ([`super::nats`]).
    Nats,
}

impl fmt::Display for BrokerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Redis => "Redis",
            Self::Nats => "NATS",
        })
    }
}

/// Why the broker could not start.
///
/// Every URL in a message is written with its passwords masked
/// ([`crate::config::mask_url_password`]) where the error is made, so neither
/// `Display` nor `Debug` shows a secret.
#[derive(Debug)]
#[non_exhaustive]
pub enum BrokerError {
    /// The URL is not a URL of that broker this build can use.
    InvalidUrl(BrokerName, String),
    /// A setting is out of range (named).
    InvalidConfig(BrokerName, String),
    /// The OS could not give a random origin id or start a thread.
    Os(BrokerName, std::io::Error),
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidUrl(b, e) => write!(f, "invalid {b} URL: {e}"),
            Self::InvalidConfig(b, e) => write!(f, "invalid {b} broker setting: {e}"),
            Self::Os(b, e) => write!(f, "cannot start the {b} broker: {e}"),
        }
    }
}

impl std::error::Error for BrokerError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_broker() {
        let cases = [
            (
                BrokerError::InvalidUrl(BrokerName::Redis, "x".into()),
                "invalid Redis URL: x",
            ),
            (
                BrokerError::InvalidUrl(BrokerName::Nats, "x".into()),
                "invalid NATS URL: x",
            ),
            (
                BrokerError::InvalidConfig(BrokerName::Redis, "x".into()),
                "invalid Redis broker setting: x",
            ),
            (
                BrokerError::InvalidConfig(BrokerName::Nats, "x".into()),
                "invalid NATS broker setting: x",
            ),
            (
                BrokerError::Os(BrokerName::Redis, std::io::Error::other("x")),
                "cannot start the Redis broker: x",
            ),
            (
                BrokerError::Os(BrokerName::Nats, std::io::Error::other("x")),
                "cannot start the NATS broker: x",
            ),
        ];
        for (err, want) in cases {
            assert_eq!(err.to_string(), want);
        }
    }
}
