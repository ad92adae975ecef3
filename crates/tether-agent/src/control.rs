//! The control socket `state/agent.sock` (0600): one line in, one JSON
//! answer out. `status` answers the status block; `poll-now` wakes the
//! stream loop; `list-certs` lists the installed certificates; `renew NAME`
//! renews one now and answers when done. A failure answers `{"error": …}`.

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
    let error = |message: String| serde_json::json!({ "error": message }).to_string();
    let reply = match line.trim() {
        "status" => serde_json::to_string(&control.status()).map_err(std::io::Error::other)?,
        "poll-now" => {
            control.poll_now();
            "{\"ok\":true}".into()
        }
        "list-certs" => serde_json::to_string(&control.list_certs()).map_err(std::io::Error::other)?,
        command => match command.strip_prefix("renew ").map(str::trim).filter(|n| !n.is_empty()) {
            Some(name) => match control.renew(name.to_owned()).await {
                Ok(Ok(answer)) => answer.to_string(),
                Ok(Err(e)) => error(e),
                Err(_) => error("the agent is stopping".into()),
            },
            None => error(format!("unknown control command {command:?}")),
        },
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

#[cfg(test)]
mod tests {
    use tether_proto::certs::CertSource;
    use tokio::sync::oneshot;

    use super::*;
    use crate::daemon::Status;
    use crate::managed_certs::Listing;

    /// A daemon holding one certificate, `web`.
    struct Fake;

    impl Control for Fake {
        fn status(&self) -> Status {
            Status::default()
        }

        fn poll_now(&self) {}

        fn list_certs(&self) -> Vec<Listing> {
            let not_after = "2026-01-01T00:00:00Z".into();
            vec![Listing { name: "web".into(), serial: "0a".into(), not_after, source: CertSource::Issued }]
        }

        fn renew(&self, name: String) -> oneshot::Receiver<Result<serde_json::Value, String>> {
            let (reply, answer) = oneshot::channel();
            let outcome = if name == "web" {
                Ok(serde_json::json!({"name": name, "serial": "0b"}))
            } else {
                Err(format!("no certificate named {name:?} is assigned to this agent"))
            };
            let _ = reply.send(outcome);
            answer
        }
    }

    async fn ask(command: &str) -> serde_json::Value {
        let (client, server) = UnixStream::pair().expect("pair");
        let served = tokio::spawn(async move { answer(server, &Fake).await });
        let (read, mut write) = client.into_split();
        write.write_all(format!("{command}\n").as_bytes()).await.expect("send");
        let mut reply = String::new();
        BufReader::new(read).read_line(&mut reply).await.expect("reply");
        served.await.expect("task").expect("answered");
        serde_json::from_str(&reply).expect("json")
    }

    #[tokio::test]
    async fn list_certs_and_renew_answer_json_and_errors_name_the_problem() {
        let listed = ask("list-certs").await;
        assert_eq!(listed[0]["name"], "web");
        assert_eq!(listed[0]["source"], "issued");
        assert_eq!(listed[0]["not_after"], "2026-01-01T00:00:00Z");
        assert_eq!(ask("renew web").await["serial"], "0b");
        let unknown = ask("renew mail").await;
        assert!(unknown["error"].as_str().is_some_and(|e| e.contains("\"mail\"")), "{unknown}");
        assert!(ask("renew ").await["error"].as_str().is_some_and(|e| e.contains("unknown control command")));
    }
}
