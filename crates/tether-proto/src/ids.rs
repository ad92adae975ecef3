//! Typed ids. Each is a UUIDv7 (time-ordered, so keyset pagination by id is
//! pagination by creation time) and can only be built by parsing or `new()`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(value: Uuid) -> Self {
                Self(value)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.as_hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.as_hyphenated())
            }
        }
    };
}

id_type!(
    /// An enrolled agent; also its `device_id`/`device_public_id` (protocol.md §3, §16.4).
    AgentId
);
id_type!(
    /// One command for one agent.
    CommandId
);
id_type!(
    /// The set of commands created by one `POST /api/v1/commands`.
    BatchId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_text_and_sort_by_creation() {
        let a = AgentId::new();
        let b = AgentId::new();
        assert_eq!(a.to_string().parse::<AgentId>().expect("valid id"), a);
        assert!(a.to_string() < b.to_string());
        assert!("not-an-id".parse::<AgentId>().is_err());
    }
}
