//! The edge: accept connections (TCP, TLS with SNI and client certificates), serve HTTP/1.1
//! and h2, guard against request smuggling and slow clients, and put each request target
//! into its one canonical form before any phase reads it.

pub mod abuse;
pub mod canon;
pub mod conn;
pub mod frame_budget;
pub mod linger;
pub mod listen;
pub mod park;
pub mod passthrough;
pub mod ready;
pub mod sending;
pub mod smuggle;
pub mod tls;
