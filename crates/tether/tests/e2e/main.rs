//! End-to-end tests driving real `tether` processes.

mod common;
mod durability;
