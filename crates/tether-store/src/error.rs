//! What a store call can fail with, in terms no caller has to translate
//! from a database library: the backends map their driver errors here.

/// The kind of row a [`StoreError::NotFound`] is about, so callers can say
/// what was missing without remapping a bare "not found".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    User,
    ApiToken,
    EnrollToken,
    Agent,
    DeviceGrant,
    Command,
    Batch,
    Config,
    Blob,
    FileAssignment,
    Cert,
}

impl Entity {
    /// How an error message names it.
    pub fn name(self) -> &'static str {
        match self {
            Entity::User => "user",
            Entity::ApiToken => "token",
            Entity::EnrollToken => "enrollment token",
            Entity::Agent => "agent",
            Entity::DeviceGrant => "pending device code",
            Entity::Command => "command",
            Entity::Batch => "batch",
            Entity::Config => "config scope",
            Entity::Blob => "file content",
            Entity::FileAssignment => "file assignment",
            Entity::Cert => "certificate",
        }
    }
}

/// The error of a store call that did not error in its decision but in
/// getting to the data, boxed so that no driver type leaks out.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{} not found", .0.name())]
    NotFound(Entity),
    #[error("conflict: {0}")]
    Conflict(String),
    /// The write must say which version it replaces (`If-Match`).
    #[error("precondition required: {0}")]
    PreconditionRequired(String),
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },
    /// The database cannot be reached right now (down, restarting, out of
    /// connections, busy): nothing was written, and the same call may
    /// succeed later. Answered 503 with `Retry-After`.
    #[error("database unavailable: {0}")]
    Unavailable(BackendError),
    /// Any other database failure.
    #[error("database error: {0}")]
    Backend(BackendError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// Opening the store failed: unreachable, bad URL, migrations.
    #[error("{0}")]
    Open(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
