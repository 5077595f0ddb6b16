//! Why a broker could not start: one error type for every broker.

use std::fmt;
use std::time::Duration;

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

/// Refuses a publish queue bound of 0 and a duration setting of 0 (each named), as
/// every broker's `start` does.
pub(crate) fn check_nonzero(
    broker: BrokerName,
    (publish_queue, publish_queue_bytes): (usize, usize),
    durations: &[(&str, Duration)],
) -> Result<(), BrokerError> {
    if publish_queue == 0 || publish_queue_bytes == 0 {
        return Err(BrokerError::InvalidConfig(
            broker,
            "publish_queue and publish_queue_bytes must be above 0".into(),
        ));
    }
    for (name, value) in durations {
        if value.is_zero() {
            return Err(BrokerError::InvalidConfig(
                broker,
                format!("{name} must be above 0"),
            ));
        }
    }
    Ok(())
}

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

    #[test]
    fn zero_bounds_and_durations_are_refused_by_name() {
        let second = Duration::from_secs(1);
        let ok = [("a", second), ("b", second)];
        assert!(check_nonzero(BrokerName::Nats, (1, 1), &ok).is_ok());
        for queue in [(0, 1), (1, 0)] {
            let err = check_nonzero(BrokerName::Redis, queue, &ok).unwrap_err();
            assert_eq!(
                err.to_string(),
                "invalid Redis broker setting: publish_queue and publish_queue_bytes must be above 0"
            );
        }
        let err = check_nonzero(
            BrokerName::Nats,
            (1, 1),
            &[("a", second), ("b", Duration::ZERO)],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid NATS broker setting: b must be above 0"
        );
    }
}
