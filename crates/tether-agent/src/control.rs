//! The control socket `state/agent.sock` (0600): one line in, one answer
//! out. `status` answers the status block as JSON; `poll-now` wakes the
//! stream loop.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::daemon::Control;

/// Binds the socket, replacing a stale one, readable by the owner only.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, control: Arc<dyn Control>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            s = listener.accept() => match s {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "Control socket accept failed");
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, control.as_ref()).await {
                tracing::debug!(error = %e, "Control connection failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, control: &dyn Control) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // Commands are one short line; cap what we read.
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 256));
    reader.read_line(&mut line).await?;
    let reply = match line.trim() {
        "status" => serde_json::to_string(&control.status()).map_err(std::io::Error::other)?,
        "poll-now" => {
            control.poll_now();
            "{\"ok\":true}".into()
        }
        other => serde_json::json!({"error": format!("unknown control command {other:?}")}).to_string(),
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    write.shutdown().await
}

/// Sends one control command to a running daemon and returns its answer.
pub async fn request(socket: &Path, command: &str) -> std::io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("no agent is running with state dir socket {} ({e})", socket.display()))
    })?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).await?;
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}
