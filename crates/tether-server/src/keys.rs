//! The server's secret keys (protocol.md §3 "Server keys"). With the
//! embedded store they are files in the data dir (`keys/`, 0600); with
//! PostgreSQL they live in the database, so every replica signs and
//! verifies with the same ones, wrapped by `TETHER_MASTER_KEY` when it is
//! set (XChaCha20-Poly1305 from RustCrypto; the key name is the associated
//! data, so a wrapped value cannot be moved to another name).

use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use tether_store::{BackendKind, Store};

use crate::auth::secret::random_bytes;

/// The key that signs agent access tokens.
pub const JWT_KEY: &str = "jwt";

/// Stored key formats: a version byte, then the key or its sealed form.
const PLAIN: u8 = 0;
const WRAPPED: u8 = 1;
const NONCE_LEN: usize = 24;

/// `TETHER_MASTER_KEY`: 32 bytes, given as 64 hex digits or base64.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            let unpadded = text.trim_end_matches('=');
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(unpadded)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(unpadded))
                .ok()
        };
        let key: [u8; 32] = bytes.and_then(|b| b.try_into().ok()).context(
            "TETHER_MASTER_KEY must be 32 random bytes as 64 hex digits or base64 (e.g. `openssl rand -hex 32`)",
        )?;
        Ok(Self(key))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    fn wrap(&self, name: &str, key: &[u8; 32]) -> Vec<u8> {
        let nonce = random_bytes::<NONCE_LEN>();
        let sealed = self
            .cipher()
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: key, aad: name.as_bytes() })
            .expect("sealing 32 bytes cannot fail");
        [&[WRAPPED][..], &nonce, &sealed].concat()
    }

    fn unwrap(&self, name: &str, stored: &[u8]) -> anyhow::Result<[u8; 32]> {
        let Some((nonce, sealed)) = stored.get(1..).and_then(|rest| rest.split_at_checked(NONCE_LEN)) else {
            bail!("the server key {name:?} in the database is cut short");
        };
        let opened = self
            .cipher()
            .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: name.as_bytes() })
            .map_err(|_| anyhow::anyhow!("TETHER_MASTER_KEY does not open the server key {name:?} in the database"))?;
        opened.try_into().map_err(|_| anyhow::anyhow!("the server key {name:?} in the database is not 32 bytes"))
    }
}

/// The server key `name`: from the data dir for the embedded store, from
/// the database (created by whichever replica comes first) for PostgreSQL.
pub async fn load(
    store: &dyn Store,
    data_dir: &Path,
    master: Option<&MasterKey>,
    name: &str,
) -> anyhow::Result<[u8; 32]> {
    match store.kind() {
        BackendKind::Sqlite => {
            if master.is_some() {
                tracing::warn!(
                    "TETHER_MASTER_KEY is set, but the embedded store keeps its keys as files in the data dir; it is not used"
                );
            }
            load_file(&data_dir.join("keys").join(format!("{name}.key")))
                .with_context(|| format!("loading the {name} key from {}", data_dir.display()))
        }
        BackendKind::Postgres => load_shared(store, master, name).await,
    }
}

/// Reads a 32-byte key file, creating it (0600, in a 0700 directory) on
/// first start. A key file or directory others could read is made private
/// again with a warning.
fn load_file(path: &Path) -> std::io::Result<[u8; 32]> {
    if let Some(dir) = path.parent() {
        crate::fsutil::ensure_private_dir(dir)?;
    }
    match std::fs::read(path) {
        Ok(bytes) => {
            crate::fsutil::ensure_private_file(
                path,
                "; whoever could read this key can forge agent access tokens: \
                 if that may have happened, stop the server, delete the file and start again",
            )?;
            bytes
                .try_into()
                .map_err(|_| std::io::Error::other(format!("{} must hold exactly 32 bytes", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = random_bytes::<32>();
            crate::fsutil::write_private(path, &secret)?;
            Ok(secret)
        }
        Err(e) => Err(e),
    }
}

async fn load_shared(store: &dyn Store, master: Option<&MasterKey>, name: &str) -> anyhow::Result<[u8; 32]> {
    let fresh = random_bytes::<32>();
    let candidate = match master {
        Some(m) => m.wrap(name, &fresh),
        None => [&[PLAIN][..], &fresh].concat(),
    };
    let stored = store.server_key(name, &candidate).await.with_context(|| format!("reading the {name} key"))?;
    match (stored.first(), master) {
        (Some(&WRAPPED), Some(m)) => m.unwrap(name, &stored),
        (Some(&WRAPPED), None) => {
            bail!("the server keys in the database are wrapped: set TETHER_MASTER_KEY to the key that wrapped them")
        }
        (Some(&PLAIN), _) => {
            let key: [u8; 32] = stored[1..]
                .try_into()
                .map_err(|_| anyhow::anyhow!("the server key {name:?} in the database is not 32 bytes"))?;
            match master {
                // Given a master key now: wrap the key in place (once, by
                // whichever replica gets there first).
                Some(m) => {
                    if store.replace_server_key(name, &stored, &m.wrap(name, &key)).await? {
                        tracing::info!(key = name, "Wrapped the server key with TETHER_MASTER_KEY");
                    }
                }
                None => tracing::warn!(
                    key = name,
                    "The server key is stored unwrapped in the database; set TETHER_MASTER_KEY to wrap it"
                ),
            }
            Ok(key)
        }
        _ => bail!("the server key {name:?} in the database has an unknown format"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_key_is_64_hex_digits_or_base64_of_32_bytes() {
        let hex_key = "00".repeat(31) + "ff";
        assert_eq!(MasterKey::parse(&hex_key).expect("hex").0[31], 0xff);
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(MasterKey::parse(&b64).expect("base64").0, [7; 32]);
        assert!(MasterKey::parse("too short").is_err());
        assert!(!format!("{:?}", MasterKey([1; 32])).contains('1'), "redacted");
    }

    #[test]
    fn a_wrapped_key_opens_only_with_its_master_key_and_name() {
        let master = MasterKey([3; 32]);
        let wrapped = master.wrap("jwt", &[9; 32]);
        assert_eq!(master.unwrap("jwt", &wrapped).expect("opens"), [9; 32]);
        assert!(master.unwrap("material", &wrapped).is_err(), "bound to its name");
        assert!(MasterKey([4; 32]).unwrap("jwt", &wrapped).is_err(), "another master key");
        assert!(master.unwrap("jwt", &wrapped[..10]).is_err(), "cut short");
    }
}
