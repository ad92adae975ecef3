//! Managed files and certificates (protocol.md §7): the operator's calls and
//! the agent's.

use std::time::Duration;

use reqwest::Method;
use tether_proto::certs::{
    AgentCert, CaCert, Cert, CertChanged, CertMaterial, ImportCa, IssueCert, IssuedCert, RenewRequest, ReplaceCert,
    SignRequest, UploadCert,
};
use tether_proto::files::{AgentFile, AssignFile, FileAssigned, FileAssignment, FleetStatus, ItemReport, StoredBlob};

use crate::{Client, Result, error_from};

/// A file transfer's time limit: generous, since files may be large and
/// links slow; a stalled transfer still ends.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl Client {
    // ----- files, operator side -----

    /// `POST /api/v1/files`: uploads `file` of `size` bytes (streamed from
    /// disk, never held whole in memory); the server answers with its sha256.
    pub async fn upload_file(&self, file: tokio::fs::File, size: u64) -> Result<StoredBlob> {
        let req = self
            .request(Method::POST, "api/v1/files")?
            .timeout(TRANSFER_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::from(file));
        self.send(req).await
    }

    pub async fn assign_file(&self, req: &AssignFile) -> Result<FileAssigned> {
        self.post("api/v1/files/assignments", req).await
    }

    pub async fn list_file_assignments(&self) -> Result<Vec<FileAssignment>> {
        Ok(self.send_page(self.request(Method::GET, "api/v1/files/assignments")?).await?.data)
    }

    pub async fn unassign_file(&self, id: i64) -> Result<FileAssigned> {
        self.send(self.request(Method::DELETE, &format!("api/v1/files/assignments/{id}"))?).await
    }

    pub async fn file_status(&self, id: i64) -> Result<FleetStatus> {
        self.get(&format!("api/v1/files/assignments/{id}/status")).await
    }

    // ----- files, agent side -----

    /// The files this agent must hold now.
    pub async fn own_files(&self) -> Result<Vec<AgentFile>> {
        self.get("api/v1/agents/self/files").await
    }

    /// `GET /api/v1/agents/self/files/{sha256}`: the content, as a response
    /// to stream from (the caller verifies the hash).
    pub async fn download_file(&self, sha256: &str) -> Result<reqwest::Response> {
        let req = self.request(Method::GET, &format!("api/v1/agents/self/files/{sha256}"))?.timeout(TRANSFER_TIMEOUT);
        let res = self.execute(req).await?;
        if res.status().is_success() { Ok(res) } else { Err(error_from(res).await) }
    }

    pub async fn report_file(&self, id: i64, report: &ItemReport) -> Result<serde_json::Value> {
        self.post(&format!("api/v1/agents/self/files/{id}/status"), report).await
    }

    // ----- certificates, operator side -----

    pub async fn upload_cert(&self, req: &UploadCert) -> Result<CertChanged> {
        self.post("api/v1/certs", req).await
    }

    pub async fn issue_cert(&self, req: &IssueCert) -> Result<CertChanged> {
        self.post("api/v1/certs/issued", req).await
    }

    pub async fn replace_cert(&self, id: i64, req: &ReplaceCert) -> Result<CertChanged> {
        self.post(&format!("api/v1/certs/{id}/replace"), req).await
    }

    pub async fn revoke_cert(&self, id: i64) -> Result<CertChanged> {
        self.post(&format!("api/v1/certs/{id}/revoke"), &serde_json::json!({})).await
    }

    /// Active certificates, then those revoked in the last day.
    pub async fn list_certs(&self) -> Result<Vec<Cert>> {
        Ok(self.send_page::<Cert>(self.request(Method::GET, "api/v1/certs")?).await?.data)
    }

    pub async fn get_cert(&self, id: i64) -> Result<Cert> {
        self.get(&format!("api/v1/certs/{id}")).await
    }

    pub async fn cert_status(&self, id: i64) -> Result<FleetStatus> {
        self.get(&format!("api/v1/certs/{id}/status")).await
    }

    /// The CAs agents trust, the active one first.
    pub async fn list_cas(&self) -> Result<Vec<CaCert>> {
        Ok(self.send_page::<CaCert>(self.request(Method::GET, "api/v1/certs/ca")?).await?.data)
    }

    /// A new CA signs from now on; the old one stays trusted until retired.
    pub async fn rotate_ca(&self) -> Result<CaCert> {
        self.post("api/v1/certs/ca/rotate", &serde_json::json!({})).await
    }

    pub async fn import_ca(&self, req: &ImportCa) -> Result<CaCert> {
        self.post("api/v1/certs/ca/import", req).await
    }

    /// Stops trusting every CA but the active one; the number retired.
    pub async fn retire_cas(&self) -> Result<serde_json::Value> {
        self.post("api/v1/certs/ca/retire", &serde_json::json!({})).await
    }

    // ----- certificates, agent side -----

    /// The certificates this agent must hold now.
    pub async fn own_certs(&self) -> Result<Vec<AgentCert>> {
        self.get("api/v1/agents/self/certs").await
    }

    /// An uploaded certificate's material.
    pub async fn cert_material(&self, id: i64) -> Result<CertMaterial> {
        self.get(&format!("api/v1/agents/self/certs/{id}")).await
    }

    /// Has the server's CA sign this agent's CSR for an issued certificate.
    pub async fn sign_csr(&self, id: i64, csr_pem: &str) -> Result<IssuedCert> {
        self.post(&format!("api/v1/agents/self/certs/{id}/csr"), &SignRequest { csr_pem: csr_pem.to_owned() }).await
    }

    pub async fn report_cert(&self, id: i64, report: &ItemReport) -> Result<serde_json::Value> {
        self.post(&format!("api/v1/agents/self/certs/{id}/status"), report).await
    }

    /// Asks for an uploaded certificate's renewal (audited; an operator fulfils it).
    pub async fn request_renewal(&self, id: i64, reason: &str) -> Result<serde_json::Value> {
        self.post(&format!("api/v1/agents/self/certs/{id}/renew"), &RenewRequest { reason: reason.to_owned() }).await
    }
}
