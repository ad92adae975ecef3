//! The agent's state dir (protocol.md §12):
//!
//! ```text
//! DIR/agent.toml        local configuration (never written by the agent)
//! DIR/state/            agent_id, access_token, refresh_token, cursor, journal,
//!                       results/ (unacknowledged results), metrics/ (metric
//!                       batches the server has not taken yet), agent.sock,
//!                       config.json (last good configuration), files.json and
//!                       certs.json (what the agent placed and installed)
//! DIR/keys/agent.key    Ed25519 private key (raw 32 bytes)
//! DIR/certs/ DIR/files/ DIR/logs/  (default [certs] dir and [files] allowed_dirs)
//! ```
//!
//! Directories are 0700 and files 0600; wrong modes are fixed with a
//! warning. Every write is temp file + fsync + rename + directory fsync.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
const SUBDIRS: [&str; 7] = ["state", "state/results", "state/metrics", "keys", "certs", "files", "logs"];

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, FILE_MODE)
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of
/// the directory) with `mode`: readers see the old file or the new one. It
/// keeps the owner and group of the file it replaces (when the agent may set
/// them), so a service reading it still can.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp = temp_beside(path, mode)?;
    tmp.write_all(bytes)?;
    commit(tmp, path, None, None)
}

/// A new temp file in `path`'s directory with exactly `mode`, to be
/// [`commit`]ted over `path`. It has a random name and is created
/// exclusively, so nobody who can write to the directory can plant a
/// symlink or a file there for the agent to write through; dropped, it is
/// removed.
pub fn temp_beside(path: &Path, mode: u32) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("path has no parent"))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    // `mode` passes through the umask at creation; set it exactly.
    tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(tmp)
}

/// Puts the written `tmp` in place of `path`: owner `uid` and group `gid`
/// where given (a failure is an error), else those of the file it replaces
/// where the agent may set them; then fsync, rename, fsync of the directory.
pub fn commit(tmp: tempfile::NamedTempFile, path: &Path, uid: Option<u32>, gid: Option<u32>) -> std::io::Result<()> {
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::fchown(tmp.as_file(), uid, gid)?;
    } else if let Ok(old) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::MetadataExt;
        // Only root may give a file away; anyone else keeps their own.
        let _ = std::os::unix::fs::fchown(tmp.as_file(), Some(old.uid()), Some(old.gid()));
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    let dir = path.parent().ok_or_else(|| std::io::Error::other("path has no parent"))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Runs disk work on the blocking pool: the agent's one runtime thread never
/// waits on a disk (or on a slow network file system).
pub async fn off_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(std::io::Error::other)
}

fn fix_mode(path: &Path, want: u32) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode != want {
        tracing::warn!(path = %path.display(), found = format!("{mode:o}"), fixed_to = format!("{want:o}"), "Fixing permissions");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))?;
    }
    Ok(())
}

impl StateDir {
    /// Opens (creating) the state dir and enforces its permissions.
    pub fn open(root: &Path) -> std::io::Result<Self> {
        std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(root)?;
        fix_mode(root, DIR_MODE)?;
        for sub in SUBDIRS {
            let dir = root.join(sub);
            std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(&dir)?;
            fix_mode(&dir, DIR_MODE)?;
        }
        for dir in ["state", "keys"] {
            for entry in std::fs::read_dir(root.join(dir))? {
                let entry = entry?;
                if entry.file_type()?.is_file() {
                    fix_mode(&entry.path(), FILE_MODE)?;
                }
            }
        }
        Ok(Self { root: root.to_owned() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn config_file(&self) -> PathBuf {
        self.root.join("agent.toml")
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("state/agent.sock")
    }

    pub fn results_dir(&self) -> PathBuf {
        self.root.join("state/results")
    }

    pub fn metrics_dir(&self) -> PathBuf {
        self.root.join("state/metrics")
    }

    /// A small text file under `state/`, trimmed; `None` when absent.
    pub fn read(&self, name: &str) -> std::io::Result<Option<String>> {
        match std::fs::read_to_string(self.root.join("state").join(name)) {
            Ok(s) => Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write(&self, name: &str, value: &str) -> std::io::Result<()> {
        write_atomic(&self.root.join("state").join(name), value.as_bytes())
    }

    /// A JSON file under `state/`; `None` when absent, unreadable or
    /// corrupt (logged: the caller starts from empty).
    pub fn read_json<T: serde::de::DeserializeOwned>(&self, name: &str) -> Option<T> {
        let text = self
            .read(name)
            .inspect_err(|e| tracing::warn!(file = name, error = %e, "Cannot read a state file"))
            .ok()??;
        serde_json::from_str(&text)
            .inspect_err(|e| tracing::warn!(file = name, error = %e, "Ignoring a corrupt state file"))
            .ok()
    }

    pub fn write_json(&self, name: &str, value: &impl serde::Serialize) -> std::io::Result<()> {
        self.write(name, &serde_json::to_string(value).map_err(std::io::Error::other)?)
    }

    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.root.join("state").join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The agent's Ed25519 key, generated on first use (the private half never leaves this file).
    pub fn signing_key(&self) -> std::io::Result<ed25519_dalek::SigningKey> {
        let path = self.root.join("keys/agent.key");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let raw: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| std::io::Error::other(format!("{} must hold 32 bytes", path.display())))?;
                Ok(ed25519_dalek::SigningKey::from_bytes(&raw))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
                write_atomic(&path, key.as_bytes())?;
                Ok(key)
            }
            Err(e) => Err(e),
        }
    }
}

/// base64url (no padding) of the raw public key, as enrollment expects.
pub fn public_key_text(key: &ed25519_dalek::SigningKey) -> String {
    URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn an_atomic_write_replaces_a_symlink_instead_of_following_it_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").expect("victim");
        let path = dir.path().join("app.json");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        write_atomic_mode(&path, b"{}", 0o640).expect("write");
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "keep me");
        assert!(!std::fs::symlink_metadata(&path).expect("meta").file_type().is_symlink());
        assert_eq!((std::fs::read(&path).expect("read"), mode(&path)), (b"{}".to_vec(), 0o640));
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn creates_the_layout_private_and_fixes_loose_modes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("agent");
        let state = StateDir::open(&root).expect("open");
        for sub in SUBDIRS {
            assert_eq!(mode(&root.join(sub)), 0o700, "{sub}");
        }
        state.write("cursor", "1-2").expect("write");
        assert_eq!(mode(&root.join("state/cursor")), 0o600);
        assert_eq!(state.read("cursor").expect("read").as_deref(), Some("1-2"));
        let key = state.signing_key().expect("key");
        assert_eq!(mode(&root.join("keys/agent.key")), 0o600);
        assert_eq!(state.signing_key().expect("same key").as_bytes(), key.as_bytes());

        std::fs::set_permissions(root.join("state/cursor"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::set_permissions(root.join("state"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        StateDir::open(&root).expect("reopen");
        assert_eq!(mode(&root.join("state/cursor")), 0o600);
        assert_eq!(mode(&root.join("state")), 0o700);
    }
}
