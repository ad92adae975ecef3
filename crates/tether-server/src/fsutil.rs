//! Private files in the data dir: directories 0700, files 0600, written
//! atomically (temp file, fsync, rename). Wrong modes found on disk are
//! fixed with a warning, as the agent does with its state dir.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("path has no parent directory"))?;
    ensure_private_dir(dir)?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(FILE_MODE).open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `dir` (0700) if needed; an existing one with other modes is set
/// to 0700 with a warning.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    fix_mode(dir, DIR_MODE, "")
}

/// Sets an existing secret file to 0600, with a warning when it was not:
/// whoever could read it may hold a copy, which `why` tells the operator.
pub fn ensure_private_file(path: &Path, why: &str) -> std::io::Result<()> {
    fix_mode(path, FILE_MODE, why)
}

fn fix_mode(path: &Path, want: u32, why: &str) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode != want {
        tracing::warn!(
            path = %path.display(),
            found = format!("{mode:o}"),
            fixed_to = format!("{want:o}"),
            "Fixing permissions{why}"
        );
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(want))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn loose_dirs_and_files_are_made_private() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("data");
        ensure_private_dir(&dir).expect("create");
        assert_eq!(mode(&dir), 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_private_dir(&dir).expect("fix");
        assert_eq!(mode(&dir), 0o700);

        let file = dir.join("secret");
        write_private(&file, b"x").expect("write");
        assert_eq!(mode(&file), 0o600);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        ensure_private_file(&file, "").expect("fix");
        assert_eq!(mode(&file), 0o600);
    }
}
