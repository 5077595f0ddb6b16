//! UTF-8 for text messages (RFC 6455 §5.6, §8.1): a validated `Bytes` type and an
//! incremental validator that fails at the first invalid byte, even when the message
//! arrives in fragments and a fragment in pieces. Validation itself is `simdutf8`'s.

use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

/// Reference-counted bytes that are known to be valid UTF-8.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Utf8Bytes(Bytes);

impl Utf8Bytes {
    /// Wraps a static string without copying it.
    pub const fn from_static(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }

    /// The text.
    #[inline]
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor of `Utf8Bytes` either takes a `str`/`String` or
        // validates the bytes with simdutf8, and the inner `Bytes` is never mutated.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes.
    #[inline]
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Gives back the underlying bytes.
    #[inline]
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Wraps bytes the caller has already validated.
    ///
    /// # Safety
    /// `bytes` must be valid UTF-8.
    #[inline]
    pub(crate) unsafe fn from_bytes_unchecked(bytes: Bytes) -> Self {
        Self(bytes)
    }
}

impl TryFrom<Bytes> for Utf8Bytes {
    type Error = simdutf8::basic::Utf8Error;

    /// Validates `bytes` as UTF-8 without copying them.
    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        simdutf8::basic::from_utf8(&bytes)?;
        Ok(Self(bytes))
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

impl From<&str> for Utf8Bytes {
    fn from(s: &str) -> Self {
        Self(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl Deref for Utf8Bytes {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Utf8Bytes {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for Utf8Bytes {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8Bytes {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validates a text message that grows in place, a piece at a time.
///
/// Feed it the whole message received so far after each piece; it only re-reads the
/// bytes after the last complete character. An incomplete character at the end is
/// accepted until more bytes arrive; a byte that can never be part of valid UTF-8 is an
/// error at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Validator {
    valid_up_to: usize,
}

impl Utf8Validator {
    /// Checks `message[previously validated..]`. `Err(())` at the first invalid byte.
    #[inline]
    #[allow(clippy::result_unit_err)] // the only outcome is "invalid": close with 1007
    pub fn feed(&mut self, message: &[u8]) -> Result<(), ()> {
        let Some(rest) = message.get(self.valid_up_to..) else {
            return Err(());
        };
        match simdutf8::compat::from_utf8(rest) {
            Ok(_) => {
                self.valid_up_to = message.len();
                Ok(())
            }
            Err(e) if e.error_len().is_none() => {
                self.valid_up_to += e.valid_up_to();
                Ok(())
            }
            Err(_) => Err(()),
        }
    }

    /// Whether the message fed so far ends on a character boundary, i.e. is complete
    /// UTF-8. Call after the last piece.
    #[inline]
    pub fn is_complete(&self, message: &[u8]) -> bool {
        self.valid_up_to == message.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6455 §8.1: a multi-byte character split across pieces is accepted.
    #[test]
    fn split_character_is_accepted() {
        let text = "κόσμε€𝄞".as_bytes();
        for cut in 0..=text.len() {
            let mut v = Utf8Validator::default();
            assert_eq!(v.feed(&text[..cut]), Ok(()));
            assert_eq!(v.feed(text), Ok(()));
            assert!(v.is_complete(text));
        }
    }

    /// RFC 6455 §8.1: fail fast — the first invalid byte fails before the message ends.
    #[test]
    fn invalid_byte_fails_before_the_message_ends() {
        let mut msg = b"hello".to_vec();
        let mut v = Utf8Validator::default();
        assert_eq!(v.feed(&msg), Ok(()));
        msg.extend_from_slice(&[
            0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5,
        ]);
        assert_eq!(v.feed(&msg), Ok(()));
        msg.extend_from_slice(&[0xf4, 0x90, 0x80, 0x80]); // above U+10FFFF
        assert_eq!(v.feed(&msg), Err(()));
    }

    #[test]
    fn truncated_character_is_incomplete() {
        let msg = [b'a', 0xe2, 0x82];
        let mut v = Utf8Validator::default();
        assert_eq!(v.feed(&msg), Ok(()));
        assert!(!v.is_complete(&msg));
    }

    #[test]
    fn utf8_bytes_validates() {
        assert!(Utf8Bytes::try_from(Bytes::from_static(b"ok")).is_ok());
        assert!(Utf8Bytes::try_from(Bytes::from_static(&[0xff])).is_err());
        assert_eq!(Utf8Bytes::from("x"), "x");
    }
}
