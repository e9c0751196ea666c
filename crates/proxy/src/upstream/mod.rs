//! The upstream side: connections to origins and their pool, the HTTP/1.1 client, request
//! and response bodies, the upstream head, tunnels (upgrades), and the built-in echo origin.

pub mod body;
pub mod echo;
pub mod h1;
pub mod head;
pub mod pool;
pub mod stream;
pub mod upgrade;
