//! The configuration the server distributes to this agent (protocol.md §6):
//! its reserved `agent.*` keys, which tune the agent live; the local sinks
//! that hand the document to other programs (a file, a hook, an HTTP POST),
//! all configured in the agent's own `agent.toml`; and the last good
//! configuration, kept in the state dir so the agent starts from it when
//! the server cannot be reached.
//!
//! An apply is all or nothing for what the agent controls: a document with
//! a bad reserved value changes nothing, and a hook that fails puts the
//! previous file back, so the agent is never left without a working
//! configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tether_proto::config::Doc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{ConfigSinks, FileFormat};
use crate::executor::{self, ProcessSpec};
use crate::state::{StateDir, off_thread, write_atomic_mode};

/// The file under `state/` holding the last good configuration.
pub const CACHE: &str = "config.json";

/// The agent's own settings a configuration may tune, under `agent`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tuning {
    pub poll_wait_s: Option<u32>,
    pub heartbeat_s: Option<u64>,
    pub metrics_s: Option<u64>,
    pub log_level: Option<String>,
    pub max_concurrent_commands: Option<usize>,
}

const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// Reads and checks the reserved keys (the `agent` object); the error names
/// the first bad one and what it must be.
pub fn tuning(doc: &Doc) -> Result<Tuning, String> {
    let Some(agent) = doc.get("agent") else { return Ok(Tuning::default()) };
    let agent = agent.as_object().ok_or("agent must be an object of agent.* settings")?;
    let int = |key: &str, range: std::ops::RangeInclusive<u64>| -> Result<Option<u64>, String> {
        match agent.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().filter(|n| range.contains(n)).map(Some).ok_or_else(|| {
                format!("agent.{key} must be an integer in {}..={}, not {v}", range.start(), range.end())
            }),
        }
    };
    let mut tuning = Tuning {
        poll_wait_s: int("poll_wait_s", 0..=30)?.map(|n| n as u32),
        heartbeat_s: int("heartbeat_s", 1..=86_400)?,
        metrics_s: int("metrics_s", 1..=86_400)?,
        log_level: None,
        max_concurrent_commands: int("max_concurrent_commands", 1..=256)?.map(|n| n as usize),
    };
    if let Some(level) = agent.get("log_level") {
        let level = level
            .as_str()
            .filter(|l| LOG_LEVELS.contains(l))
            .ok_or_else(|| format!("agent.log_level must be one of {}, not {level}", LOG_LEVELS.join(", ")))?;
        tuning.log_level = Some(level.to_owned());
    }
    const KNOWN: [&str; 5] = ["poll_wait_s", "heartbeat_s", "metrics_s", "log_level", "max_concurrent_commands"];
    if let Some(unknown) = agent.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("agent.{unknown} is not a setting this agent knows ({})", KNOWN.join(", ")));
    }
    Ok(tuning)
}

/// A configuration as applied: its hash (the server's `ETag`) and document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub hash: String,
    pub doc: Doc,
}

/// The last good configuration, if one was kept.
pub fn load_cached(state: &StateDir) -> Option<Applied> {
    state.read_json(CACHE)
}

pub fn save(state: &StateDir, applied: &Applied) -> std::io::Result<()> {
    state.write_json(CACHE, applied)
}

/// The document as the file sink writes it.
fn render(doc: &Doc, format: FileFormat) -> Result<Vec<u8>, String> {
    match format {
        FileFormat::Json => {
            let mut text = serde_json::to_vec_pretty(doc).expect("a document serializes");
            text.push(b'\n');
            Ok(text)
        }
        FileFormat::Toml => toml::to_string(doc)
            .map(String::into_bytes)
            .map_err(|e| format!("the configuration cannot be written as TOML: {e}")),
    }
}

/// Writes the file sink (when its content changes) and runs the hook (when
/// the file changed, or on every new hash without a file). A failing hook
/// puts the previous file back. `previous_hash` is the configuration the
/// agent ran until now.
pub async fn apply_locally(
    sinks: &ConfigSinks,
    applied: &Applied,
    previous_hash: Option<&str>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let mut restore = None;
    let changed = match &sinks.file {
        Some(path) => {
            let bytes = render(&applied.doc, sinks.format())?;
            let old = tokio::fs::read(path).await.ok();
            if old.as_deref() == Some(bytes.as_slice()) {
                false
            } else {
                write_off_thread(path, Some(bytes), sinks.mode())
                    .await
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                restore = Some((path, old));
                true
            }
        }
        None => previous_hash != Some(applied.hash.as_str()),
    };
    if changed
        && !sinks.on_change.is_empty()
        && let Err(e) = run_hook(sinks, &applied.hash, stop).await
    {
        if let Some((path, old)) = restore
            && let Err(err) = write_off_thread(path, old, sinks.mode()).await
        {
            tracing::error!(path = %path.display(), error = %err, "Could not put the previous configuration file back");
        }
        return Err(e);
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically, or removes it for `None`, off the
/// runtime thread.
async fn write_off_thread(path: &std::path::Path, bytes: Option<Vec<u8>>, mode: u32) -> std::io::Result<()> {
    let path = path.to_owned();
    off_thread(move || match bytes {
        Some(bytes) => write_atomic_mode(&path, &bytes, mode),
        None => std::fs::remove_file(&path),
    })
    .await?
}

/// Runs `on_change`; stopping the agent stops the hook (and fails the apply).
async fn run_hook(sinks: &ConfigSinks, hash: &str, stop: &CancellationToken) -> Result<(), String> {
    let mut extra = std::collections::BTreeMap::new();
    extra.insert("TETHER_CONFIG_HASH".to_owned(), hash.to_owned());
    if let Some(file) = &sinks.file {
        extra.insert("TETHER_CONFIG_FILE".to_owned(), file.display().to_string());
    }
    let spec = ProcessSpec {
        argv: sinks.on_change.clone(),
        env: executor::command_env(|k| std::env::var(k).ok(), &extra),
        timeout: Duration::from_secs(sinks.on_change_timeout_s.unwrap_or(30)),
        output_cap: executor::HOOK_OUTPUT_CAP,
    };
    executor::run_hook(&spec, "on_change hook", stop).await
}

/// Delivers the newest document to `url`: POSTs it as JSON and, until a 2xx
/// answers, retries with backoff (1 s doubling to 5 min, `base_s` first); a
/// newer document replaces one still being retried.
pub async fn post_loop(url: String, mut docs: watch::Receiver<Option<Doc>>, base_s: u64, stop: CancellationToken) {
    let http = reqwest::Client::new();
    let mut backoff = Backoff::new(Duration::from_secs(base_s), Box::new(rand::random::<f64>));
    loop {
        let Some(doc) = docs.borrow_and_update().clone() else {
            tokio::select! {
                changed = docs.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
            continue;
        };
        let sent = tokio::select! {
            sent = http.post(&url).json(&Value::Object(doc)).timeout(Duration::from_secs(30)).send() => sent,
            _ = stop.cancelled() => return,
        };
        let delay = match sent {
            Ok(res) if res.status().is_success() => {
                backoff.success();
                tracing::info!(url = %url, "Configuration delivered");
                tokio::select! {
                    changed = docs.changed() => if changed.is_err() { return },
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            Ok(res) => {
                let delay = backoff.failure(None);
                tracing::warn!(url = %url, status = res.status().as_u16(), retry_in_ms = delay.as_millis() as u64, "Configuration not accepted");
                delay
            }
            Err(e) => {
                let delay = backoff.failure(None);
                tracing::warn!(url = %url, error = %e, retry_in_ms = delay.as_millis() as u64, "Configuration not delivered");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            // A newer document goes out at once.
            changed = docs.changed() => if changed.is_err() { return },
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn doc(v: Value) -> Doc {
        v.as_object().expect("an object").clone()
    }

    #[test]
    fn reserved_keys_are_read_and_checked() {
        let t = tuning(&doc(json!({"agent": {"poll_wait_s": 10, "heartbeat_s": 5, "log_level": "debug"}})));
        let t = t.expect("valid");
        assert_eq!((t.poll_wait_s, t.heartbeat_s, t.log_level.as_deref()), (Some(10), Some(5), Some("debug")));
        assert_eq!(tuning(&doc(json!({"url": "x"}))).expect("no agent key"), Tuning::default());
        for (bad, mentions) in [
            (json!({"agent": {"poll_wait_s": 31}}), "agent.poll_wait_s"),
            (json!({"agent": {"heartbeat_s": 0}}), "agent.heartbeat_s"),
            (json!({"agent": {"heartbeat_s": "30"}}), "agent.heartbeat_s"),
            (json!({"agent": {"max_concurrent_commands": 0}}), "agent.max_concurrent_commands"),
            (json!({"agent": {"log_level": "loud"}}), "agent.log_level"),
            (json!({"agent": {"poll_wait": 5}}), "agent.poll_wait "),
            (json!({"agent": 5}), "agent must be an object"),
        ] {
            let err = tuning(&doc(bad.clone())).expect_err(&bad.to_string());
            assert!(err.contains(mentions.trim()), "{bad}: {err}");
        }
    }

    #[test]
    fn the_file_is_json_or_toml_and_toml_refuses_null() {
        let d = doc(json!({"url": "https://ip.me", "n": 2}));
        assert_eq!(render(&d, FileFormat::Json).expect("json"), b"{\n  \"n\": 2,\n  \"url\": \"https://ip.me\"\n}\n");
        assert_eq!(render(&d, FileFormat::Toml).expect("toml"), b"n = 2\nurl = \"https://ip.me\"\n");
        assert!(render(&doc(json!({"x": null})), FileFormat::Toml).is_err());
    }

    #[tokio::test]
    async fn the_file_is_written_with_its_mode_and_left_alone_when_unchanged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("app.json");
        let sinks = ConfigSinks { file: Some(file.clone()), mode: Some("0640".into()), ..ConfigSinks::default() };
        let applied = Applied { hash: "h1".into(), doc: doc(json!({"a": 1})) };
        apply_locally(&sinks, &applied, None, &CancellationToken::new()).await.expect("apply");
        assert_eq!(std::fs::metadata(&file).expect("file").permissions().mode() & 0o777, 0o640);
        let written = std::fs::metadata(&file).expect("file").modified().expect("mtime");
        apply_locally(&sinks, &applied, Some("h1"), &CancellationToken::new()).await.expect("again");
        assert_eq!(std::fs::metadata(&file).expect("file").modified().expect("mtime"), written, "not rewritten");
    }
}
