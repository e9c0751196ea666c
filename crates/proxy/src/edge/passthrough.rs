//! The connection wrappers (the idle timer in `listen` and the smuggling guard in
//! `smuggle`) do their own work on reads and pass most writes straight through.
//! `delegate_async_write!` writes that pass-through once.

/// Writes the named `AsyncWrite` methods of a wrapper as plain calls to the same method on
/// one of its fields, inside the wrapper's `impl AsyncWrite`. With only the field, it writes
/// all five; after a colon, only those listed, and the wrapper writes the others itself.
///
/// ```ignore
/// impl<T: AsyncWrite + Unpin> AsyncWrite for Guard<T> {
///     delegate_async_write!(inner);
/// }
/// impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
///     fn poll_write(..) { .. }
///     fn poll_write_vectored(..) { .. }
///     delegate_async_write!(inner: is_write_vectored, poll_flush, poll_shutdown);
/// }
/// ```
///
/// The wrapper must be `Unpin` (the field is reached through `Pin<&mut Self>`), and the calls
/// are static: no boxing, no dynamic dispatch.
macro_rules! delegate_async_write {
    (@ $field:tt poll_write) => {
        fn poll_write(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::tokio::io::AsyncWrite::poll_write(::std::pin::Pin::new(&mut self.$field), cx, buf)
        }
    };
    (@ $field:tt poll_write_vectored) => {
        fn poll_write_vectored(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::tokio::io::AsyncWrite::poll_write_vectored(
                ::std::pin::Pin::new(&mut self.$field),
                cx,
                bufs,
            )
        }
    };
    (@ $field:tt is_write_vectored) => {
        fn is_write_vectored(&self) -> bool {
            ::tokio::io::AsyncWrite::is_write_vectored(&self.$field)
        }
    };
    (@ $field:tt poll_flush) => {
        fn poll_flush(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::tokio::io::AsyncWrite::poll_flush(::std::pin::Pin::new(&mut self.$field), cx)
        }
    };
    (@ $field:tt poll_shutdown) => {
        fn poll_shutdown(
            mut self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::tokio::io::AsyncWrite::poll_shutdown(::std::pin::Pin::new(&mut self.$field), cx)
        }
    };
    ($field:tt) => {
        $crate::edge::passthrough::delegate_async_write!(
            $field: poll_write, poll_write_vectored, is_write_vectored, poll_flush, poll_shutdown
        );
    };
    ($field:tt: $($method:ident),+ $(,)?) => {
        $($crate::edge::passthrough::delegate_async_write!(@ $field $method);)+
    };
}
pub(crate) use delegate_async_write;

#[cfg(test)]
mod tests {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncWrite, AsyncWriteExt};

    /// Counts its flushes and writes the rest straight through.
    struct Counting<T> {
        inner: T,
        flushes: usize,
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        super::delegate_async_write!(
            inner: poll_write, poll_write_vectored, is_write_vectored, poll_shutdown
        );
    }

    /// Passes everything through.
    struct Plain<T>(Counting<T>);

    impl<T> Plain<T> {
        fn counting(&self) -> &Counting<T> {
            &self.0
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Plain<T> {
        super::delegate_async_write!(0);
    }

    #[tokio::test]
    async fn writes_reach_the_inner_stream_and_own_methods_stay_own() {
        let mut w = Plain(Counting {
            inner: Vec::new(),
            flushes: 0,
        });
        assert!(w.is_write_vectored(), "as a Vec is");
        w.write_all(b"one ").await.unwrap();
        let parts = [io::IoSlice::new(b"two "), io::IoSlice::new(b"three")];
        assert_eq!(w.write_vectored(&parts).await.unwrap(), 9);
        w.flush().await.unwrap();
        w.flush().await.unwrap();
        w.shutdown().await.unwrap();
        assert_eq!(w.counting().flushes, 2);
        assert_eq!(&w.counting().inner[..], b"one two three");
    }
}
