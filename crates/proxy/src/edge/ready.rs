//! Waiting until a client connection has bytes to read, without reading them: how a parked
//! connection (`park`) waits for its client's next request. Each layer that enforces a
//! timeout on reads (the idle timer, the smuggling guard's header timeout) enforces it here
//! too. Its own module so that the layers and `park` do not import each other.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A layer of the client connection that can wait until a read would not block, without
/// reading. Layers that enforce a timeout on reads enforce it here too (as an error).
pub trait ReadReady {
    fn poll_read_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for tokio::net::TcpStream {
    fn poll_read_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(&self, cx)
    }
}

/// A connection is only parked after hyper's read returned `Pending`, so rustls holds no
/// plaintext then: new bytes from the socket are what can make a read succeed.
impl ReadReady for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn poll_read_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.poll_read_ready(cx)
    }
}
