//! A lingering close for HTTP/1 connections, as nginx's `lingering_close` and HAProxy's
//! drain before close.
//!
//! portcullis often answers before it has read a request's body: a 401 or 403 to an upload
//! without credentials, a 413, a 429. hyper then closes the connection. Closing a socket
//! with bytes the client sent still unread makes the kernel reset the connection, and a
//! client that writes its whole body before it reads (Python's `http.client`, many SDKs,
//! any client without `Expect: 100-continue`) sees that reset instead of the answer, which
//! may even be discarded from its receive buffer.
//!
//! So when a connection closes in the middle of a client's message, its write side is shut
//! first (the answer and a FIN go out), and what the client goes on sending is read and
//! dropped until it closes its side, fails, or [`LINGER`] has passed: a client cannot hold
//! the connection longer than that. A connection that closes between messages (the usual
//! `Connection: close`) closes at once, as before.
//!
//! Written by hand: it is a few lines over tokio's `AsyncRead`/`AsyncWrite`, inside the IO
//! that hyper shuts down, where no crate reaches.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest a closing connection keeps reading what its client sends (nginx's
/// `lingering_time` is 30 s and its `lingering_timeout` 5 s; a client that writes its body
/// first needs only the time to send it, on loopback or a LAN well under a second for
/// hundreds of megabytes).
pub const LINGER: Duration = Duration::from_secs(5);

/// The state of one lingering close.
pub struct Linger {
    until: Pin<Box<tokio::time::Sleep>>,
    /// The write side has been shut down.
    shut: bool,
}

impl Linger {
    pub fn new(for_at_most: Duration) -> Linger {
        Linger {
            until: Box::pin(tokio::time::sleep(for_at_most)),
            shut: false,
        }
    }

    /// Shuts `io`'s write side down, then reads and drops what comes until the client closes,
    /// the connection fails, or the time is up. Ready when the connection may be dropped.
    pub fn poll_close<T: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.shut {
            match Pin::new(&mut *io).poll_shutdown(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => self.shut = true,
            }
        }
        let mut scratch = [0u8; 8192];
        loop {
            if self.until.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *io).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                // The client closed its side, or the connection failed: either way done.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn the_answer_reaches_a_client_that_writes_its_whole_body_first() {
        let (mut client, mut server) = pair().await;
        // The client is still sending (4 MiB, far more than the socket buffers hold) when
        // the server answers and closes.
        let writer = tokio::spawn(async move {
            let body = vec![b'x'; 4 << 20];
            let wrote = client.write_all(&body).await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            (wrote.is_ok(), answer)
        });
        let mut head = [0u8; 1024];
        let _ = server.read(&mut head).await.unwrap();
        server
            .write_all(b"HTTP/1.1 401 Unauthorized\r\n\r\n")
            .await
            .unwrap();
        let mut linger = Linger::new(LINGER);
        std::future::poll_fn(|cx| linger.poll_close(&mut server, cx))
            .await
            .unwrap();
        drop(server);
        let (wrote, answer) = writer.await.unwrap();
        assert!(wrote, "the client's body was reset");
        assert!(answer.starts_with(b"HTTP/1.1 401"), "{answer:?}");
    }

    #[tokio::test]
    async fn a_client_that_never_closes_is_held_no_longer_than_the_linger() {
        let (_client, mut server) = pair().await;
        let started = std::time::Instant::now();
        let mut linger = Linger::new(Duration::from_millis(200));
        std::future::poll_fn(|cx| linger.poll_close(&mut server, cx))
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
}
