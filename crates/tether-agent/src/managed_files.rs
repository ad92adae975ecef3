//! Managed files on the agent (protocol.md §7): the files the server assigns
//! to this agent, each downloaded by its sha256 into a temp file beside its
//! destination (streamed and hashed on the way, never whole in memory),
//! verified, given its mode and owner, and renamed into place; then its hook
//! runs. Only directories the local `agent.toml` allows (`[files]
//! allowed_dirs`) are written to, whatever path the server names.
//!
//! The manifest `state/files.json` lists what this agent placed. A file no
//! longer assigned is removed only if it is listed there and still holds
//! what the agent wrote; the agent never deletes anything else.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_proto::files::{AgentFile, ItemReport, check_path};
use tokio::io::AsyncWriteExt;

use crate::executor;
use crate::managed::{Ctx, Item, Reports, group_id, user_id};
use crate::session::Failure;
use crate::state::{self, StateDir, off_thread};

/// The manifest under `state/`.
pub const MANIFEST: &str = "files.json";

/// A file this agent placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    pub file_id: i64,
    /// Where it was written, its directories resolved.
    pub path: PathBuf,
    pub sha256: String,
    pub version: u64,
    /// Written, but its hook has not succeeded since: it runs on the next
    /// pass, also after a restart.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hook_pending: bool,
}

/// The managed files' loop state: the manifest and the reports sent.
#[derive(Debug)]
pub struct ManagedFiles {
    placed: BTreeMap<i64, Placed>,
    reports: Reports,
}

impl ManagedFiles {
    pub fn load(state: &StateDir) -> Self {
        let listed: Vec<Placed> = state.read_json(MANIFEST).unwrap_or_default();
        Self { placed: listed.into_iter().map(|p| (p.file_id, p)).collect(), reports: Reports::new(Item::File) }
    }

    fn record(&mut self, state: &StateDir, file_id: i64, placed: Option<Placed>) {
        match placed {
            Some(p) => self.placed.insert(file_id, p),
            None => self.placed.remove(&file_id),
        };
        let listed: Vec<&Placed> = self.placed.values().collect();
        if let Err(e) = state.write_json(MANIFEST, &listed) {
            tracing::error!(error = %e, "Could not save the managed files manifest");
        }
    }

    /// One full pass: every file the server assigns now put in place (and
    /// reported), every placed file no longer assigned removed. `Ok(false)`
    /// when something failed and the pass should be retried; `Err` when the
    /// server could not say what is assigned.
    pub async fn reconcile(&mut self, ctx: Ctx<'_>) -> Result<bool, Failure> {
        let desired = ctx.session.call(|c| async move { c.own_files().await }).await?;
        let mut ok = true;
        let mut in_use = BTreeSet::new();
        for file in &desired {
            let report = match self.converge(ctx, file).await {
                Ok(path) => {
                    in_use.insert(path);
                    ItemReport::applied(file.version)
                }
                Err(e) => {
                    tracing::warn!(file_id = file.file_id, path = %file.path, error = %e, "Managed file not applied");
                    ok = false;
                    ItemReport::failed(file.version, e)
                }
            };
            ok &= self.reports.send(ctx.session, file.file_id, report).await;
        }
        let assigned: BTreeSet<i64> = desired.iter().map(|f| f.file_id).collect();
        let unassigned: Vec<Placed> =
            self.placed.values().filter(|p| !assigned.contains(&p.file_id)).cloned().collect();
        for placed in unassigned {
            // Another assignment now owns the path: it is no longer ours to remove.
            if !in_use.contains(&placed.path) {
                let (path, sha256) = (placed.path.clone(), placed.sha256.clone());
                match off_thread(move || remove_if_unchanged(&path, &sha256)).await.and_then(|r| r) {
                    Ok(Removal::Removed) => tracing::info!(path = %placed.path.display(), "Removed an unassigned file"),
                    Ok(Removal::Gone) => {}
                    Ok(Removal::ChangedLocally) => tracing::warn!(
                        path = %placed.path.display(),
                        "Leaving an unassigned file in place: it was changed after the agent wrote it"
                    ),
                    Err(e) => {
                        tracing::warn!(path = %placed.path.display(), error = %e, "Could not remove an unassigned file");
                        ok = false;
                        continue;
                    }
                }
            }
            self.record(ctx.state, placed.file_id, None);
        }
        Ok(ok)
    }

    /// Brings one file to what the server assigns; where it is.
    async fn converge(&mut self, ctx: Ctx<'_>, file: &AgentFile) -> Result<PathBuf, String> {
        let uid = file.owner.as_deref().map(user_id).transpose()?;
        let gid = file.group.as_deref().map(group_id).transpose()?;
        let (path, dirs) = (file.path.clone(), ctx.cfg.file_dirs.clone());
        let dest = off_thread(move || confine(&path, &dirs)).await.map_err(|e| e.to_string())??;
        let env = BTreeMap::from([("TETHER_FILE".to_owned(), dest.display().to_string())]);
        let hook = file.hook.as_deref().map(|name| executor::hook(ctx.cfg, name, &env)).transpose()?;
        let want = Want { sha256: file.sha256.clone(), size: file.size, mode: file.mode, uid, gid };
        let (at, checked) = (dest.clone(), want.clone());
        let present = off_thread(move || checked.is_at(&at))
            .await
            .and_then(|r| r)
            .map_err(|e| format!("reading {}: {e}", dest.display()))?;
        let previous = self.placed.get(&file.file_id).filter(|p| p.path == dest && p.sha256 == file.sha256);
        let hook_pending = previous.is_some_and(|p| p.hook_pending);
        if present && !hook_pending && previous.is_some_and(|p| p.version == file.version) {
            return Ok(dest);
        }
        if !present {
            download(ctx, &want, &dest).await?;
        }
        // The hook runs after the file changed, or until it succeeded once.
        let run_hook = hook.is_some() && (!present || hook_pending);
        let placed = Placed {
            file_id: file.file_id,
            path: dest.clone(),
            sha256: file.sha256.clone(),
            version: file.version,
            hook_pending: run_hook,
        };
        self.record(ctx.state, file.file_id, Some(placed.clone()));
        if let Some(spec) = hook.filter(|_| run_hook) {
            let label = format!("hook {:?}", file.hook.as_deref().unwrap_or_default());
            executor::run_hook(&spec, &label, ctx.stop).await?;
            self.record(ctx.state, file.file_id, Some(Placed { hook_pending: false, ..placed }));
        }
        Ok(dest)
    }
}

/// What a file must be.
#[derive(Debug, Clone)]
struct Want {
    sha256: String,
    size: u64,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
}

impl Want {
    /// The file at `path` is exactly this already (the hash is read only
    /// when everything else matches).
    fn is_at(&self, path: &Path) -> std::io::Result<bool> {
        let meta = match path.symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let same = meta.is_file()
            && meta.len() == self.size
            && meta.mode() & 0o7777 == self.mode
            && self.uid.is_none_or(|u| u == meta.uid())
            && self.gid.is_none_or(|g| g == meta.gid());
        Ok(same && sha256_of(path)?.is_some_and(|sha| sha == self.sha256))
    }
}

/// Where the file at `path` may be written: inside one of the `allowed`
/// directories once every symbolic link in its directories is resolved.
/// Missing directories are created (0755), but only below an allowed one;
/// the file itself must not be a symbolic link, which the rename would
/// replace but whose target an operator may have meant.
pub fn confine(path: &str, allowed: &[PathBuf]) -> Result<PathBuf, String> {
    check_path(path)?;
    let outside = || format!("path {path} is outside the directories this agent allows ([files] allowed_dirs)");
    let path = Path::new(path);
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return Err(outside()) };
    let roots: Vec<PathBuf> = allowed.iter().filter_map(|d| d.canonicalize().ok()).collect();
    // The deepest directory that exists, resolved, must be inside an allowed
    // one before anything is created below it.
    let mut existing = parent;
    let mut missing = Vec::new();
    while existing.symlink_metadata().is_err() {
        missing.extend(existing.file_name());
        existing = existing.parent().ok_or_else(outside)?;
    }
    let mut dir = existing.canonicalize().map_err(|_| outside())?;
    let root = roots.iter().find(|r| dir.starts_with(r)).ok_or_else(outside)?;
    for component in missing.iter().rev() {
        dir.push(component);
        match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(format!("creating {}: {e}", dir.display()));
            }
            _ => {}
        }
    }
    // Resolved again: a directory swapped for a link meanwhile shows here.
    let parent = parent.canonicalize().map_err(|e| format!("resolving {}: {e}", parent.display()))?;
    if !parent.starts_with(root) {
        return Err(outside());
    }
    let dest = parent.join(name);
    if dest.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(format!("path {} is a symbolic link; the agent does not write through one", dest.display()));
    }
    Ok(dest)
}

/// The sha256 (hex) of the regular file at `path`, without following a
/// final symbolic link; `None` when no regular file is there.
fn sha256_of(path: &Path) -> std::io::Result<Option<String>> {
    use nix::libc::{ELOOP, O_NOFOLLOW, O_NONBLOCK};
    // O_NONBLOCK: opening a FIFO someone put there must not hang the agent.
    let mut file = match std::fs::OpenOptions::new().read(true).custom_flags(O_NOFOLLOW | O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(ELOOP) => return Ok(None),
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(Some(hex::encode(hasher.finalize())))
}

/// What became of a placed file no longer assigned.
#[derive(Debug, PartialEq, Eq)]
enum Removal {
    Removed,
    /// Nothing is at the path any more.
    Gone,
    /// Something other than what the agent wrote is there: left alone.
    ChangedLocally,
}

/// Removes the file at `path` only while it holds `sha256`, what the agent wrote.
fn remove_if_unchanged(path: &Path, sha256: &str) -> std::io::Result<Removal> {
    match sha256_of(path)? {
        Some(found) if found == sha256 => {
            std::fs::remove_file(path)?;
            Ok(Removal::Removed)
        }
        Some(_) => Ok(Removal::ChangedLocally),
        None if path.symlink_metadata().is_ok() => Ok(Removal::ChangedLocally),
        None => Ok(Removal::Gone),
    }
}

/// Downloads `want` and puts it at `dest`; the old file stays unless the
/// download is complete and verified.
async fn download(ctx: Ctx<'_>, want: &Want, dest: &Path) -> Result<(), String> {
    let sha256 = want.sha256.as_str();
    let fetch_error = |e: &dyn std::fmt::Display| format!("downloading {sha256}: {e}");
    let mut body =
        ctx.session.call(|c| async move { c.download_file(sha256).await }).await.map_err(|e| fetch_error(&e))?;
    let mut incoming = Incoming::beside(dest, want).await?;
    while let Some(chunk) = body.chunk().await.map_err(|e| fetch_error(&e))? {
        incoming.write(&chunk).await?;
    }
    incoming.finish(dest).await
}

/// A download being written: a temp file beside its destination, with the
/// mode it will have, and the hash of what was written so far.
#[derive(Debug)]
struct Incoming {
    tmp: tempfile::NamedTempFile,
    file: tokio::fs::File,
    hasher: Sha256,
    written: u64,
    want: Want,
}

impl Incoming {
    async fn beside(dest: &Path, want: &Want) -> Result<Self, String> {
        let (at, mode) = (dest.to_owned(), want.mode);
        let tmp = off_thread(move || state::temp_beside(&at, mode))
            .await
            .and_then(|r| r)
            .map_err(|e| format!("creating a temp file beside {}: {e}", dest.display()))?;
        let file = tmp.as_file().try_clone().map_err(|e| format!("opening {}: {e}", tmp.path().display()))?;
        Ok(Self { tmp, file: tokio::fs::File::from_std(file), hasher: Sha256::new(), written: 0, want: want.clone() })
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.written += chunk.len() as u64;
        // A server sending more than it assigned must not fill the disk.
        if self.written > self.want.size {
            return Err(format!("the download is longer than the {} bytes assigned", self.want.size));
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).await.map_err(|e| format!("writing {}: {e}", self.tmp.path().display()))
    }

    /// Verifies the hash, then puts the file at `dest` with its owner and
    /// group (fsync, rename). On a mismatch the temp file is removed and
    /// the file at `dest` is left as it was.
    async fn finish(mut self, dest: &Path) -> Result<(), String> {
        self.file.flush().await.map_err(|e| format!("writing {}: {e}", self.tmp.path().display()))?;
        let got = hex::encode(self.hasher.finalize());
        if got != self.want.sha256 {
            return Err(format!("sha256 mismatch: expected {}, got {got}", self.want.sha256));
        }
        let (tmp, at, uid, gid) = (self.tmp, dest.to_owned(), self.want.uid, self.want.gid);
        off_thread(move || state::commit(tmp, &at, uid, gid))
            .await
            .and_then(|r| r)
            .map_err(|e| format!("installing {}: {e}", dest.display()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn want(bytes: &[u8], mode: u32) -> Want {
        Want { sha256: sha(bytes), size: bytes.len() as u64, mode, uid: None, gid: None }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_path_is_confined_to_the_allowed_dirs_and_missing_dirs_are_created_only_inside() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let allowed = tmp.path().join("allowed");
        std::fs::create_dir(&allowed).expect("mkdir");
        let dirs = [allowed.clone()];
        let inside = format!("{}/app/conf.d/app.conf", allowed.display());
        let dest = confine(&inside, &dirs).expect("inside");
        assert_eq!(dest, allowed.canonicalize().expect("canonical").join("app/conf.d/app.conf"));
        assert!(dest.parent().expect("parent").is_dir(), "missing directories are created");

        let elsewhere = format!("{}/elsewhere/x/app.conf", tmp.path().display());
        let err = confine(&elsewhere, &dirs).expect_err("outside");
        assert!(err.contains("is outside the directories this agent allows ([files] allowed_dirs)"), "{err}");
        assert!(!tmp.path().join("elsewhere").exists(), "nothing is created outside");
        assert!(confine("/etc/passwd", &dirs).is_err());
        assert!(confine(&inside, &[]).is_err(), "no allowed dir allows nothing");

        let dotdot = format!("{}/../escape.conf", allowed.display());
        assert!(confine(&dotdot, &dirs).expect_err("..").contains(".."));
        assert!(confine("relative/app.conf", &dirs).is_err());
    }

    #[test]
    fn symbolic_links_cannot_lead_out_of_an_allowed_dir_or_be_written_through() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let allowed = tmp.path().join("allowed");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&allowed).expect("mkdir");
        std::fs::create_dir(&outside).expect("mkdir");
        let dirs = [allowed.clone()];

        // A symlinked parent pointing out of the allowed dir.
        std::os::unix::fs::symlink(&outside, allowed.join("link")).expect("symlink");
        let err = confine(&format!("{}/link/app.conf", allowed.display()), &dirs).expect_err("escape");
        assert!(err.contains("is outside"), "{err}");
        let err = confine(&format!("{}/link/new/app.conf", allowed.display()), &dirs).expect_err("escape");
        assert!(err.contains("is outside"), "{err}");
        assert!(!outside.join("new").exists(), "no directory created through the link");

        // The destination itself is a symlink.
        std::fs::write(outside.join("target"), "keep").expect("target");
        std::os::unix::fs::symlink(outside.join("target"), allowed.join("app.conf")).expect("symlink");
        let err = confine(&format!("{}/app.conf", allowed.display()), &dirs).expect_err("symlink");
        assert!(err.contains("symbolic link"), "{err}");

        // A link that stays inside is fine: it is resolved.
        std::fs::create_dir(allowed.join("real")).expect("mkdir");
        std::os::unix::fs::symlink(allowed.join("real"), allowed.join("alias")).expect("symlink");
        let dest = confine(&format!("{}/alias/app.conf", allowed.display()), &dirs).expect("inside");
        assert_eq!(dest, allowed.canonicalize().expect("canonical").join("real/app.conf"));
    }

    #[tokio::test]
    async fn a_verified_download_replaces_the_file_and_a_mismatch_keeps_the_old_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dest = tmp.path().join("app.conf");
        std::fs::write(&dest, "old").expect("old");

        let mut wrong = want(b"new content", 0o640);
        wrong.size = 64;
        let mut incoming = Incoming::beside(&dest, &wrong).await.expect("temp");
        incoming.write(b"tampered").await.expect("write");
        let err = incoming.finish(&dest).await.expect_err("mismatch");
        assert!(
            err.starts_with(&format!("sha256 mismatch: expected {}, got {}", sha(b"new content"), sha(b"tampered"))),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&dest).expect("read"), "old");
        assert_eq!(names(tmp.path()), ["app.conf"], "the temp file is gone");

        let mut incoming = Incoming::beside(&dest, &want(b"0123456789", 0o640)).await.expect("temp");
        incoming.write(b"0123456789").await.expect("write");
        let err = incoming.write(b"!").await.expect_err("longer than assigned");
        assert!(err.contains("longer than the 10 bytes"), "{err}");
        drop(incoming);
        assert_eq!(names(tmp.path()), ["app.conf"]);

        let good = want(b"new content", 0o640);
        let mut incoming = Incoming::beside(&dest, &good).await.expect("temp");
        for chunk in [&b"new "[..], b"content"] {
            incoming.write(chunk).await.expect("write");
        }
        incoming.finish(&dest).await.expect("verified");
        assert_eq!(std::fs::read_to_string(&dest).expect("read"), "new content");
        assert_eq!(std::fs::metadata(&dest).expect("meta").permissions().mode() & 0o777, 0o640);
        assert!(good.is_at(&dest).expect("check"));
        assert!(!want(b"new content", 0o644).is_at(&dest).expect("check"), "another mode is not in place");
        assert_eq!(names(tmp.path()), ["app.conf"]);
    }

    #[test]
    fn only_a_placed_file_still_holding_what_the_agent_wrote_is_removed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let unchanged = tmp.path().join("unchanged.conf");
        let edited = tmp.path().join("edited.conf");
        std::fs::write(&unchanged, "placed").expect("write");
        std::fs::write(&edited, "edited by hand").expect("write");
        assert_eq!(remove_if_unchanged(&unchanged, &sha(b"placed")).expect("remove"), Removal::Removed);
        assert!(!unchanged.exists());
        assert_eq!(remove_if_unchanged(&edited, &sha(b"placed")).expect("keep"), Removal::ChangedLocally);
        assert_eq!(std::fs::read_to_string(&edited).expect("read"), "edited by hand");
        assert_eq!(remove_if_unchanged(&unchanged, &sha(b"placed")).expect("gone"), Removal::Gone);

        // A symlink put where the file was is not followed, nor removed.
        let target = tmp.path().join("target");
        std::fs::write(&target, "placed").expect("write");
        std::os::unix::fs::symlink(&target, &unchanged).expect("symlink");
        assert_eq!(remove_if_unchanged(&unchanged, &sha(b"placed")).expect("keep"), Removal::ChangedLocally);
        assert!(unchanged.symlink_metadata().is_ok() && target.exists());
    }

    #[test]
    fn the_manifest_lists_what_was_placed_and_survives_a_restart() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(tmp.path()).expect("state");
        let mut files = ManagedFiles::load(&state);
        let placed =
            Placed { file_id: 7, path: "/srv/app.conf".into(), sha256: sha(b"x"), version: 2, hook_pending: true };
        files.record(&state, 7, Some(placed.clone()));
        let meta = std::fs::metadata(tmp.path().join("state").join(MANIFEST)).expect("manifest");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(ManagedFiles::load(&state).placed.get(&7), Some(&placed));
        files.record(&state, 7, None);
        assert!(ManagedFiles::load(&state).placed.is_empty());
    }
}
