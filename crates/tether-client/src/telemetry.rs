//! Telemetry (protocol.md §8): metric batches and inventory, the agent's
//! uploads and the operator's queries.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;
use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE};
use reqwest::{Method, RequestBuilder};
use serde::Serialize;
use tether_proto::telemetry::{
    InventoryChange, InventoryEntry, InventoryReplace, MetricBatch, MetricBatchAccepted, MetricQueryResult,
};
use tether_proto::{AgentId, Page};

use crate::{Client, Result};

/// `GET /api/v1/agents/{id}/metrics`: one metric of one agent over a time range.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricQuery {
    pub name: String,
    /// RFC 3339 or Unix milliseconds; the server's default when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// `GET /api/v1/agents/{id}/inventory`
#[derive(Debug, Clone, Default, Serialize)]
pub struct InventoryQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `body` as JSON, gzip-compressed.
fn gzip_json<T: Serialize>(body: &T) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    // Serialising plain data into memory cannot fail.
    serde_json::to_writer(&mut gz, body).expect("a JSON body serialises into memory");
    gz.flush().and_then(|()| gz.finish()).expect("gzip into memory cannot fail")
}

impl Client {
    // ----- agent side -----

    /// `POST /api/v1/agents/self/metrics`, sent gzip-compressed: a batch is
    /// many similar points, and agents may sit behind slow links. The bytes
    /// are final before the request is built, so a signature covers exactly
    /// what is sent. Sending the same `batch_id` again stores it once.
    pub async fn send_metrics(&self, batch: &MetricBatch) -> Result<MetricBatchAccepted> {
        self.send(self.metrics_request(batch)?).await
    }

    fn metrics_request(&self, batch: &MetricBatch) -> Result<RequestBuilder> {
        Ok(self
            .request(Method::POST, "api/v1/agents/self/metrics")?
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_ENCODING, "gzip")
            .body(gzip_json(batch)))
    }

    /// `POST /api/v1/agents/self/inventory`: upserts and removals, applied as one.
    pub async fn change_inventory(&self, change: &InventoryChange) -> Result<()> {
        self.send_empty(self.request(Method::POST, "api/v1/agents/self/inventory")?.json(change)).await
    }

    /// `PUT /api/v1/agents/self/inventory`: the whole inventory, replacing what the server had.
    pub async fn replace_inventory(&self, inventory: &InventoryReplace) -> Result<()> {
        self.send_empty(self.request(Method::PUT, "api/v1/agents/self/inventory")?.json(inventory)).await
    }

    // ----- operator side -----

    pub async fn agent_metrics(&self, id: AgentId, query: &MetricQuery) -> Result<MetricQueryResult> {
        self.send(self.request(Method::GET, &format!("api/v1/agents/{id}/metrics"))?.query(query)).await
    }

    pub async fn agent_inventory(&self, id: AgentId, query: &InventoryQuery) -> Result<Page<InventoryEntry>> {
        self.send_page(self.request(Method::GET, &format!("api/v1/agents/{id}/inventory"))?.query(query)).await
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use ed25519_dalek::{Signature, SigningKey, Verifier};
    use tether_proto::telemetry::MetricPoint;

    use super::*;

    /// The body as the server sees it on the wire, and what it signs.
    #[tokio::test]
    async fn a_metric_batch_goes_gzipped_and_the_signature_covers_the_compressed_bytes() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let client = Client::new("http://127.0.0.1:1/").expect("client").with_signing_key(key.clone());
        let batch = MetricBatch {
            batch_id: "0190f0e0-0000-7000-8000-000000000001".into(),
            points: vec![MetricPoint { name: "host.load1".into(), ts_ms: 1, value: 0.5, labels: Default::default() }],
        };
        let mut req = client.metrics_request(&batch).expect("request").build().expect("built");
        crate::signing::sign_request(&key, &mut req);
        assert_eq!(
            (req.headers()[CONTENT_ENCODING].as_bytes(), req.headers()[CONTENT_TYPE].as_bytes()),
            (&b"gzip"[..], &b"application/json"[..])
        );

        let sent = req.body().and_then(reqwest::Body::as_bytes).expect("a buffered body").to_vec();
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(sent.as_slice()).read_to_end(&mut json).expect("gzip");
        assert_eq!(serde_json::from_slice::<MetricBatch>(&json).expect("the batch"), batch);

        let header = |name: &str| req.headers()[name].to_str().expect("ascii").to_owned();
        let input = tether_proto::signing::signing_input(
            "POST",
            "/api/v1/agents/self/metrics",
            header(tether_proto::signing::TIMESTAMP_HEADER).parse().expect("seconds"),
            &header(tether_proto::signing::NONCE_HEADER),
            &crate::signing::body_digest_hex(&sent),
        );
        let signature = base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            header(tether_proto::signing::SIGNATURE_HEADER),
        )
        .expect("base64url");
        let signature = Signature::from_slice(&signature).expect("64 bytes");
        key.verifying_key().verify(input.as_bytes(), &signature).expect("signed over the gzip bytes");
    }
}
