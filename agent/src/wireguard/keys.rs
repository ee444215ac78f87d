//! Secret keys (the node's private keys, preshared keys): generated on the node, stored with
//! mode 0600, never printed. `Debug` and `Display` are redacted, the bytes are zeroed on drop.

use std::{
    fmt,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use wgpin_crds::WireGuardKey;
use zeroize::Zeroize as _;

/// A private or preshared key.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Why a key could not be made, read or stored.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no randomness from the kernel: {0}")]
    Random(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} does not hold a WireGuard private key (44 base64 characters); move it away to have a new key generated"
    )]
    Malformed { path: String },
    #[error("{path} is readable by others (mode {mode:o}); the agent keeps private keys at 0600")]
    Exposed { path: String, mode: u32 },
}

impl SecretKey {
    /// A new private key, clamped as `wg genkey` does.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Ok(Self(bytes))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses base64 (as `wg genkey` and `wg genpsk` print it).
    pub fn from_base64(text: &str) -> Option<Self> {
        let mut decoded = STANDARD.decode(text.trim()).ok()?;
        let key = <[u8; 32]>::try_from(decoded.as_slice()).ok().map(Self);
        decoded.zeroize();
        key
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public key of this private key.
    pub fn public_key(&self) -> WireGuardKey {
        WireGuardKey::from_bytes(x25519_dalek::x25519(
            self.0,
            x25519_dalek::X25519_BASEPOINT_BYTES,
        ))
    }

    /// Reads the key at `path`, or generates one and stores it there (mode 0600, in a directory
    /// of mode 0700) when there is none. A key file that others can read is refused rather
    /// than used.
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        // The directory too: no one else may even list the keys (an agent before this one
        // left it 0755).
        if let Some(dir) = path.parent() {
            private_dir(dir).map_err(io)?;
        }
        match std::fs::metadata(path) {
            Ok(metadata) => {
                let mode = metadata.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyError::Exposed {
                        path: path.display().to_string(),
                        mode,
                    });
                }
                let mut text = std::fs::read_to_string(path).map_err(io)?;
                let key = Self::from_base64(&text);
                text.zeroize();
                key.ok_or_else(|| KeyError::Malformed {
                    path: path.display().to_string(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate()?;
                let mut encoded = STANDARD.encode(key.0);
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .and_then(|mut file| {
                        file.write_all(encoded.as_bytes())?;
                        file.sync_all()
                    });
                encoded.zeroize();
                written.map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// Creates `dir` (and its parents) for keys, or closes an existing one: mode 0700, so only
/// its owner (root) can list or enter it.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_wg_pubkey() {
        // What `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey` prints.
        let private = SecretKey::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=")
            .expect("valid key");
        assert_eq!(
            private.public_key().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = SecretKey::generate().expect("random");
        let shown = format!("{key:?}");
        assert_eq!(shown, "SecretKey(<redacted>)");
        assert!(!shown.contains(&STANDARD.encode(key.as_bytes())));
    }

    #[test]
    fn stored_with_mode_0600_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/wgpin0.key");
        let first = SecretKey::load_or_generate(&path).expect("generated");
        let mode = std::fs::metadata(&path)
            .expect("stored")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = |p: &Path| std::fs::metadata(p).expect("dir").permissions().mode() & 0o777;
        assert_eq!(dir_mode(&dir.path().join("keys")), 0o700);
        let second = SecretKey::load_or_generate(&path).expect("read back");
        assert_eq!(first, second);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            SecretKey::load_or_generate(&path),
            Err(KeyError::Exposed { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, "not a key").expect("overwrite");
        let error = SecretKey::load_or_generate(&path).expect_err("malformed");
        assert!(error.to_string().contains("move it away"), "{error}");
    }
}
