//! Fuzz harnesses for every parser of untrusted bytes in the gateway (see `docs/security-testing.md`).
//!
//! [`checks`] holds one property-checking function per target; `fuzz_targets/*.rs` wrap them for
//! libFuzzer, or, built without `cargo fuzz`, as replay tools over corpus files ([`replay`]).

pub mod checks;
pub mod replay;
