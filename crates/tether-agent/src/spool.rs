//! Results not yet acknowledged by the server, one JSON file each under
//! `state/results/`, written atomically before the first send attempt and
//! removed once the server has them. They survive restarts.

use std::path::PathBuf;

use tether_proto::CommandId;
use tether_proto::command::ResultReport;

#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path(&self, id: CommandId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn put(&self, id: CommandId, report: &ResultReport) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(report).map_err(std::io::Error::other)?;
        crate::state::write_atomic(&self.path(id), &bytes)
    }

    pub fn contains(&self, id: CommandId) -> bool {
        self.path(id).exists()
    }

    pub fn remove(&self, id: CommandId) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every spooled result; unreadable files are skipped with a warning.
    pub fn all(&self) -> std::io::Result<Vec<(CommandId, ResultReport)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(id) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<CommandId>().ok()) else {
                continue;
            };
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(report) => out.push((id, report)),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "Skipping unreadable spooled result"),
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
