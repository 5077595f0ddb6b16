//! The Redis Pub/Sub broker (see the module docs of [`crate::broker`]).
