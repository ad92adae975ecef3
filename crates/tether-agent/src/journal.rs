//! The started-command journal: execution is at-most-once per command id
//! (protocol.md §5). An id is appended and fsynced *before* its process starts;
//! a journaled id is never started again. `D` lines mark results the
//! server acknowledged, so a restart can tell finished work from work a
//! crash interrupted.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use tether_proto::CommandId;

/// Entries are kept at least as long as the server keeps signals (7 days).
const KEEP_MS: i64 = 8 * 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub started_ms: i64,
    pub acknowledged: bool,
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
    entries: HashMap<CommandId, Entry>,
}

impl Journal {
    /// Loads the journal, dropping entries older than the retention, and
    /// rewrites it compactly.
    pub fn open(path: &Path, now_ms: i64) -> std::io::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut entries = HashMap::new();
        for line in text.lines() {
            let mut parts = line.split(' ');
            let (Some(kind), Some(id), Some(ts)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let (Ok(id), Ok(ts)) = (id.parse::<CommandId>(), ts.parse::<i64>()) else { continue };
            match kind {
                "S" => {
                    entries.entry(id).or_insert(Entry { started_ms: ts, acknowledged: false });
                }
                "D" => {
                    if let Some(e) = entries.get_mut(&id) {
                        e.acknowledged = true;
                    }
                }
                _ => {}
            }
        }
        entries.retain(|_, e| now_ms - e.started_ms < KEEP_MS);
        let mut compact = String::new();
        for (id, e) in &entries {
            compact.push_str(&format!("S {id} {}\n", e.started_ms));
            if e.acknowledged {
                compact.push_str(&format!("D {id} {}\n", e.started_ms));
            }
        }
        crate::state::write_atomic(path, compact.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path)?;
        Ok(Self { path: path.to_owned(), file, entries })
    }

    pub fn get(&self, id: CommandId) -> Option<Entry> {
        self.entries.get(&id).copied()
    }

    fn append(&mut self, line: String) -> std::io::Result<()> {
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()
    }

    /// Records that `id` is about to start. Returns false (and records
    /// nothing) when it was started before.
    pub fn start(&mut self, id: CommandId, now_ms: i64) -> std::io::Result<bool> {
        if self.entries.contains_key(&id) {
            return Ok(false);
        }
        self.append(format!("S {id} {now_ms}\n"))?;
        self.entries.insert(id, Entry { started_ms: now_ms, acknowledged: false });
        Ok(true)
    }

    /// Records that the server acknowledged `id`'s result.
    pub fn acknowledge(&mut self, id: CommandId) -> std::io::Result<()> {
        let Some(entry) = self.entries.get_mut(&id) else { return Ok(()) };
        if !entry.acknowledged {
            entry.acknowledged = true;
            let started = entry.started_ms;
            self.append(format!("D {id} {started}\n"))?;
        }
        Ok(())
    }

    /// Started, never acknowledged: interrupted by a crash or still in the spool.
    pub fn unacknowledged(&self) -> Vec<CommandId> {
        self.entries.iter().filter(|(_, e)| !e.acknowledged).map(|(id, _)| *id).collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_id_is_never_started_again_even_after_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let id = CommandId::new();
        let mut j = Journal::open(&path, 1_000).expect("open");
        assert!(j.start(id, 1_000).expect("start"));
        assert!(!j.start(id, 1_001).expect("again"));
        drop(j);
        let mut j = Journal::open(&path, 2_000).expect("reopen");
        assert!(!j.start(id, 2_000).expect("after restart"));
        assert_eq!(j.unacknowledged(), vec![id]);
        j.acknowledge(id).expect("ack");
        drop(j);
        let j = Journal::open(&path, 3_000).expect("reopen");
        assert_eq!(j.get(id), Some(Entry { started_ms: 1_000, acknowledged: true }));
        assert!(j.unacknowledged().is_empty());
        // Old entries age out.
        drop(j);
        let j = Journal::open(&path, 1_000 + KEEP_MS).expect("much later");
        assert_eq!(j.get(id), None);
    }
}
