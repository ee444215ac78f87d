//! WireGuard public keys as they appear in the API: standard base64 of 32 bytes.

use std::{fmt, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD};

/// Length of a WireGuard key in bytes (a Curve25519 point).
pub const KEY_LEN: usize = 32;

/// The schema pattern for a key: exactly the canonical base64 encodings of 32 bytes. The last
/// character before `=` carries 2 data bits and 4 zero bits, hence its restricted set. Kept
/// equal to what [`WireGuardKey::from_str`] accepts (tested).
pub const KEY_PATTERN: &str = "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$";

/// The all-zero key: valid base64 of 32 bytes, but never a real public key.
pub const ZERO_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// A WireGuard public key. Public keys are not secret, so `Debug` shows them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WireGuardKey([u8; KEY_LEN]);

/// Why a string is not a WireGuard key; the messages say what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "is not valid base64 ({0}); write the key as `wg pubkey` prints it: 44 characters ending in '='"
    )]
    Base64(String),
    #[error(
        "decodes to {0} bytes, a WireGuard key has 32; write the key as `wg pubkey` prints it: 44 characters ending in '='"
    )]
    Length(usize),
    #[error("is the all-zero key, which is not a usable public key")]
    Zero,
}

impl WireGuardKey {
    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Builds a key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The base64 form, as `wg` prints it.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// A short, human-friendly prefix of the base64 form for tables and logs (`wg show` style).
    pub fn short(&self) -> String {
        let mut s = self.to_base64();
        s.truncate(8);
        s.push('…');
        s
    }
}

impl FromStr for WireGuardKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // STANDARD rejects non-canonical trailing bits, which keeps this equal to KEY_PATTERN.
        let bytes = STANDARD
            .decode(s)
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        let bytes: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| KeyError::Length(b.len()))?;
        if bytes == [0; KEY_LEN] {
            return Err(KeyError::Zero);
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for WireGuardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for WireGuardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireGuardKey({})", self.to_base64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    #[test]
    fn round_trips_a_real_key() {
        let key: WireGuardKey = KEY.parse().expect("valid key");
        assert_eq!(key.to_string(), KEY);
        assert_eq!(key.short(), "xTIBA5rb…");
    }

    #[test]
    fn rejects_bad_keys_with_reasons() {
        assert!(matches!(
            "not base64!".parse::<WireGuardKey>(),
            Err(KeyError::Base64(_))
        ));
        assert_eq!(
            "AAAA".parse::<WireGuardKey>(),
            Err(KeyError::Length(3)),
            "short key"
        );
        assert_eq!(
            ZERO_KEY.parse::<WireGuardKey>(),
            Err(KeyError::Zero),
            "zero key"
        );
        // Non-canonical: same bytes as a valid key, but the padding bits are not zero.
        assert!(
            "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dh="
                .parse::<WireGuardKey>()
                .is_err()
        );
    }

    /// The schema pattern and the parser accept the same strings.
    #[test]
    fn pattern_agrees_with_parser() {
        let re = regex_lite::Regex::new(KEY_PATTERN).expect("pattern compiles");
        let mut candidates = vec![
            KEY.to_string(),
            ZERO_KEY.to_string(),
            "AAAA".to_string(),
            format!("{KEY}="),
            KEY.trim_end_matches('=').to_string(),
        ];
        // Every possible last data character, to cover the padding-bit rule exhaustively.
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for c in alphabet.chars() {
            candidates.push(format!("{}{c}=", &KEY[..42]));
        }
        for candidate in candidates {
            let by_parser = match candidate.parse::<WireGuardKey>() {
                Ok(_) | Err(KeyError::Zero) => true,
                Err(_) => false,
            };
            assert_eq!(re.is_match(&candidate), by_parser, "{candidate}");
        }
    }
}
