//! End-to-end tests driving real `tether` processes.

mod agent;
mod common;
mod durability;
mod python;
mod tls;
