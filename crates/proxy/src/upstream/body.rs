//! Body types that stream: the request body passed upstream (with a size limit and a byte
//! count), and the response body passed back (with a byte count and a completion hook that
//! releases the server slot, returns the connection to the pool and writes the access log).
//! Nothing here buffers a whole body.

use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body sent upstream.
pub type ReqBody = UnsyncBoxBody<Bytes, BoxError>;
/// The body sent to clients.
pub type RespBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub fn empty() -> RespBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// A request body grew past the route's `max_body_size`.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {0} bytes")]
pub struct TooLarge(pub u64);

/// The client's request body failed (malformed chunked framing, a reset): the client's
/// fault, answered with 400 and not held against the server.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBody(#[source] pub BoxError);

/// The client sent no byte of its request body for `timeouts.client_body`: answered with
/// 408, and not held against the server (a slow POST).
#[derive(Debug, thiserror::Error)]
#[error("no request body byte for {0:?}")]
pub struct SlowBody(pub std::time::Duration);

/// What happens to a client's request trailers on their way to the origin.
pub enum Trailers {
    /// Dropped (the default: few origins need them, and a trailer can carry a field that
    /// portcullis removed from the head).
    Drop,
    /// Forwarded, less any that an origin merging trailers into the head could read as a
    /// field portcullis owns or set (in any spelling, `_` for `-`): see [`Kept`].
    Keep(Box<Kept>),
}

/// What a kept trailer may not be named.
pub struct Kept {
    /// The identity headers and the assertion (the snapshot's list), which only portcullis
    /// sets.
    pub protected: Arc<[HeaderName]>,
    /// The fields of the upstream head: what portcullis routed, authorized and set (the
    /// forwarded headers, an authorizer's context, a limit's mark) is not repeated, or
    /// contradicted, after the body.
    pub head: Vec<HeaderName>,
}

impl Trailers {
    fn filter(&self, mut t: HeaderMap) -> Option<HeaderMap> {
        let Trailers::Keep(kept) = self else {
            return None;
        };
        let doomed: Vec<HeaderName> = t
            .keys()
            .filter(|k| {
                let name = crate::fields::cgi_reading(k.as_str()).map_or(
                    std::borrow::Cow::Borrowed(k.as_str()),
                    std::borrow::Cow::Owned,
                );
                crate::fields::is_owned(&name)
                    || kept.protected.iter().any(|p| p.as_str() == name)
                    || kept.head.iter().any(|p| p.as_str() == name)
            })
            .cloned()
            .collect();
        for n in doomed {
            t.remove(n);
        }
        (!t.is_empty()).then_some(t)
    }
}

/// Whether a request body being sent upstream is waiting on its client: so that time spent
/// waiting for a slow client is not counted against the server (see
/// `phase::forward::within`). Shared between the body and the attempt that sends it.
#[derive(Clone, Default, Debug)]
pub struct BodyWait(Arc<std::sync::atomic::AtomicU8>);

const FLOWING: u8 = 0;
const ON_CLIENT: u8 = 1;
const ENDED: u8 = 2;
// The body failed, by the client's doing: the last state it is in.
const TOO_LARGE: u8 = 3;
const SLOW: u8 = 4;
const CLIENT_FAILED: u8 = 5;

/// How a request body failed by its client's doing (see [`BodyWait::failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// Over the route's `max_body_size` ([`TooLarge`]).
    TooLarge,
    /// Nothing for `timeouts.client_body` ([`SlowBody`]).
    Slow,
    /// The client's stream failed or ended early ([`ClientBody`]).
    Client,
}

impl BodyWait {
    /// True while the body's last read found nothing from the client yet.
    pub fn on_client(&self) -> bool {
        self.0.load(Ordering::Relaxed) == ON_CLIENT
    }

    /// How the body failed, if it did by its client's doing. An HTTP/2 origin connection
    /// sends the body from a task of its own, and the attempt sees only the stream it reset
    /// then: this says whose fault that was, so that a client cannot get a healthy server
    /// blamed (and ejected) with a body that is too large, too slow or cut short.
    pub fn failed(&self) -> Option<BodyFailure> {
        match self.0.load(Ordering::Acquire) {
            TOO_LARGE => Some(BodyFailure::TooLarge),
            SLOW => Some(BodyFailure::Slow),
            CLIENT_FAILED => Some(BodyFailure::Client),
            _ => None,
        }
    }

    fn set(&self, state: u8) {
        self.0.store(state, Ordering::Release);
    }
}

/// Passes a request body through, counting bytes and failing once it exceeds `limit`,
/// applies the route's rule for trailers, and fails with [`SlowBody`] when the client sends
/// nothing for the idle timeout while the body is being read.
pub struct Limited<B> {
    inner: B,
    limit: Option<u64>,
    pub seen: Arc<AtomicU64>,
    trailers: Trailers,
    /// How long the client may leave the body waiting, and the timer of the current wait
    /// (armed at the first wait, reset after each frame).
    idle: Option<(std::time::Duration, Option<Pin<Box<tokio::time::Sleep>>>)>,
    /// Whether the body waits on its client, for whoever sends it.
    wait: Option<BodyWait>,
}

impl<B> Limited<B> {
    pub fn new(inner: B, limit: Option<u64>, seen: Arc<AtomicU64>, trailers: Trailers) -> Self {
        Limited {
            inner,
            limit,
            seen,
            trailers,
            idle: None,
            wait: None,
        }
    }

    /// Tells `wait` whether the body is waiting on its client.
    pub fn with_wait(mut self, wait: BodyWait) -> Self {
        self.wait = Some(wait);
        self
    }

    fn note(&self, state: u8) {
        if let Some(w) = &self.wait {
            w.set(state);
        }
    }

    /// Fails the body when the client sends nothing for `d` while it is read.
    pub fn with_idle_timeout(mut self, d: std::time::Duration) -> Self {
        self.idle = Some((d, None));
        self
    }

    /// A wait for the client: true once it has lasted the idle timeout.
    fn waited_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let Some((d, timer)) = &mut self.idle else {
            return false;
        };
        let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(*d)));
        t.as_mut().poll(cx).is_ready()
    }

    /// A frame came: the next wait starts its own clock.
    fn progressed(&mut self) {
        if let Some((d, Some(t))) = &mut self.idle {
            t.as_mut().reset(tokio::time::Instant::now() + *d);
        }
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        this.note(match &polled {
            Poll::Pending => ON_CLIENT,
            Poll::Ready(Some(Ok(f))) if !f.is_trailers() => FLOWING,
            Poll::Ready(_) => ENDED,
        });
        match polled {
            Poll::Ready(Some(Ok(f))) if f.is_trailers() => {
                let kept = f.into_trailers().ok().and_then(|t| this.trailers.filter(t));
                // Trailers end a body: dropping them ends it here.
                Poll::Ready(kept.map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Some(Ok(f))) => {
                this.progressed();
                if let Some(d) = f.data_ref() {
                    let n = this.seen.fetch_add(d.len() as u64, Ordering::Relaxed) + d.len() as u64;
                    if let Some(l) = this.limit {
                        if n > l {
                            this.note(TOO_LARGE);
                            return Poll::Ready(Some(Err(Box::new(TooLarge(l)))));
                        }
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.note(CLIENT_FAILED);
                Poll::Ready(Some(Err(Box::new(ClientBody(e.into())))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if this.waited_too_long(cx) => {
                this.note(SLOW);
                let d = this.idle.as_ref().map(|(d, _)| *d).unwrap_or_default();
                Poll::Ready(Some(Err(Box::new(SlowBody(d)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body whose first frame was already read (to check it before a server is picked),
/// followed by the rest.
pub struct Prepend<B> {
    first: Option<Frame<Bytes>>,
    inner: B,
}

impl<B> Prepend<B> {
    pub fn new(first: Frame<Bytes>, inner: B) -> Self {
        Prepend {
            first: Some(first),
            inner,
        }
    }
}

impl<B> Body for Prepend<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let first = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        let inner = self.inner.size_hint();
        let mut h = SizeHint::new();
        h.set_lower(inner.lower() + first);
        if let Some(u) = inner.upper() {
            h.set_upper(u + first);
        }
        h
    }
}

/// Runs when a response body is finished or abandoned. `complete` says whether the whole
/// body was delivered.
pub trait OnDone: Send + Unpin + 'static {
    fn done(self, complete: bool, bytes: u64);
}

/// Passes a response body through, counting bytes, and calls `on_done` exactly once.
pub struct Tracked<B, D: OnDone> {
    state: State<B, D>,
    /// The body had nothing to send, so being dropped unpolled still means complete.
    empty: bool,
}

enum State<B, D: OnDone> {
    Own(Inner<B, D>),
    /// Watched by the connection, which may cut it (see `edge::sending`).
    Shared(Arc<Slot<B, D>>),
}

struct Inner<B, D: OnDone> {
    body: B,
    bytes: u64,
    on_done: Option<D>,
}

/// A watched response: its progress, and its body until it ends or is cut.
struct Slot<B, D: OnDone> {
    progress: crate::edge::sending::Progress,
    inner: parking_lot::Mutex<Option<Inner<B, D>>>,
}

impl<B, D: OnDone> Inner<B, D> {
    fn finish(&mut self, complete: bool) {
        if let Some(d) = self.on_done.take() {
            d.done(complete, self.bytes);
        }
    }
}

impl<B, D> crate::edge::sending::Watched for Slot<B, D>
where
    B: Send + 'static,
    D: OnDone,
{
    fn progress(&self) -> &crate::edge::sending::Progress {
        &self.progress
    }

    fn cut(&self) {
        let taken = self.inner.lock().take();
        if let Some(mut inner) = taken {
            tracing::debug!(
                bytes = inner.bytes,
                "a response waited on the client for the idle timeout; its upstream side is dropped"
            );
            inner.finish(false);
        }
        self.progress.asked();
    }
}

impl<B: Body, D: OnDone> Tracked<B, D> {
    pub fn new(body: B, on_done: D) -> Self {
        Tracked {
            empty: body.is_end_stream(),
            state: State::Own(Inner {
                body,
                bytes: 0,
                on_done: Some(on_done),
            }),
        }
    }

    /// As [`Tracked::new`], watched by the connection it is sent on: a response with
    /// something to send that waits on the client for the idle timeout is cut (see
    /// `edge::sending`).
    pub fn watched(body: B, on_done: D, sending: &crate::edge::sending::Sending) -> Self
    where
        B: Send + 'static,
    {
        if body.is_end_stream() {
            return Tracked::new(body, on_done);
        }
        let slot = Arc::new(Slot {
            progress: crate::edge::sending::Progress::default(),
            inner: parking_lot::Mutex::new(Some(Inner {
                body,
                bytes: 0,
                on_done: Some(on_done),
            })),
        });
        let weak: std::sync::Weak<dyn crate::edge::sending::Watched> = Arc::downgrade(&slot) as _;
        sending.watch(weak);
        Tracked {
            state: State::Shared(slot),
            empty: false,
        }
    }
}

/// Response trailer names that may not come after the body (RFC 9110 §6.5.1), besides the
/// [`crate::fields::FRAMING`] ones: cookies, authentication challenges and redirections, and
/// the request id portcullis sets in the head. An origin's `Set-Cookie` or `Location` in
/// trailers would reach HTTP/2 clients beside the head portcullis checked.
const NOT_IN_RESPONSE_TRAILERS: [&str; 6] = [
    "set-cookie",
    "www-authenticate",
    "proxy-authenticate",
    "location",
    "host",
    "x-request-id",
];

/// Removes from an origin's response trailers what may not be there.
fn strip_response_trailers(t: &mut HeaderMap) {
    // A few trailers (gRPC's two), looked up in the list rather than the list in them.
    let doomed: Vec<HeaderName> = t
        .keys()
        .filter(|k| {
            let k = k.as_str();
            crate::fields::FRAMING.contains(&k) || NOT_IN_RESPONSE_TRAILERS.contains(&k)
        })
        .cloned()
        .collect();
    for n in doomed {
        t.remove(n);
    }
}

/// One frame of `inner`'s body, counted, and `on_done` called when it ends.
fn poll_inner<B, D>(
    inner: &mut Inner<B, D>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    D: OnDone,
{
    match Pin::new(&mut inner.body).poll_frame(cx) {
        Poll::Ready(Some(Ok(f))) => {
            if let Some(d) = f.data_ref() {
                inner.bytes += d.len() as u64;
            }
            let f = match f.into_trailers() {
                Ok(mut t) => {
                    strip_response_trailers(&mut t);
                    Frame::trailers(t)
                }
                Err(f) => f,
            };
            if inner.body.is_end_stream() {
                inner.finish(true);
            }
            Poll::Ready(Some(Ok(f)))
        }
        Poll::Ready(Some(Err(e))) => {
            inner.finish(false);
            Poll::Ready(Some(Err(e.into())))
        }
        Poll::Ready(None) => {
            inner.finish(true);
            Poll::Ready(None)
        }
        Poll::Pending => Poll::Pending,
    }
}

impl<B, D: OnDone> Body for Tracked<B, D>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.state {
            State::Own(inner) => poll_inner(inner, cx),
            State::Shared(slot) => {
                slot.progress.asked();
                let mut guard = slot.inner.lock();
                let Some(inner) = guard.as_mut() else {
                    return Poll::Ready(Some(Err(
                        "the client took nothing of the response for the idle timeout".into(),
                    )));
                };
                let r = poll_inner(inner, cx);
                if matches!(&r, Poll::Ready(Some(Ok(_)))) && !inner.body.is_end_stream() {
                    slot.progress.gave();
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Own(inner) => inner.body.is_end_stream(),
            State::Shared(slot) => slot
                .inner
                .lock()
                .as_ref()
                .is_none_or(|i| i.body.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Own(inner) => inner.body.size_hint(),
            State::Shared(slot) => slot
                .inner
                .lock()
                .as_ref()
                .map_or_else(SizeHint::default, |i| i.body.size_hint()),
        }
    }
}

impl<B, D: OnDone> Drop for Tracked<B, D> {
    fn drop(&mut self) {
        let empty = self.empty;
        match &mut self.state {
            State::Own(inner) => inner.finish(empty),
            State::Shared(slot) => {
                // Finished and dropped in place (a body is large; taking it out moves it).
                let mut guard = slot.inner.lock();
                if let Some(inner) = guard.as_mut() {
                    inner.finish(empty);
                }
                *guard = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn response_trailers_lose_what_may_not_follow_a_body() {
        let mut t = HeaderMap::new();
        for k in [
            "grpc-status",
            "grpc-message",
            "set-cookie",
            "content-length",
            "location",
            "x-request-id",
            "x-checksum",
        ] {
            t.insert(HeaderName::from_static(k), "v".parse().unwrap());
        }
        strip_response_trailers(&mut t);
        let mut names: Vec<&str> = t.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["grpc-message", "grpc-status", "x-checksum"]);
    }

    use super::*;

    /// A kept trailer may not be named as a field portcullis owns, an identity header or a
    /// field of the head, in any spelling; others pass.
    #[test]
    fn kept_trailers_never_carry_what_portcullis_owns_or_set() {
        let kept = Trailers::Keep(Box::new(Kept {
            protected: vec![HeaderName::from_static("x-user")].into(),
            head: vec![HeaderName::from_static("x-tenant"), http::header::HOST],
        }));
        let mut t = HeaderMap::new();
        for k in [
            "x-forwarded-for",
            "x_real_ip",
            "authorization",
            "cookie",
            "x-original-url",
            "x-http-method-override",
            "content-length",
            "x-user",
            "x_user",
            "x.user",
            "x-api-key",
            "x.api.key",
            "x-portcullis-assertion",
            "x-tenant",
            "x_tenant",
            "grpc-status-details-bin",
            "x-checksum",
        ] {
            t.insert(HeaderName::from_static(k), "v".parse().unwrap());
        }
        let left = kept.filter(t).unwrap();
        let mut names: Vec<&str> = left.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["grpc-status-details-bin", "x-checksum"]);
        let mut only_owned = HeaderMap::new();
        only_owned.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
        assert!(
            kept.filter(only_owned).is_none(),
            "nothing left: no trailers"
        );
        assert!(Trailers::Drop.filter(HeaderMap::new()).is_none());
    }
    use std::time::Duration;

    /// A body fed by the test: frames sent on the channel, the end when it is dropped.
    fn fed() -> (
        tokio::sync::mpsc::Sender<Bytes>,
        impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let b = rx.recv().await?;
            Some((Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
        });
        (tx, http_body_util::StreamBody::new(Box::pin(frames)))
    }

    fn limited<B: Body<Data = Bytes> + Unpin>(b: B, idle: Duration) -> Limited<B> {
        Limited::new(b, None, Arc::default(), Trailers::Drop).with_idle_timeout(idle)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_after_the_idle_timeout() {
        let (tx, b) = fed();
        let mut b = limited(b, Duration::from_secs(30));
        tx.send(Bytes::from_static(b"first")).await.unwrap();
        assert!(b.frame().await.unwrap().is_ok());
        let t0 = tokio::time::Instant::now();
        let e = b.frame().await.unwrap().unwrap_err();
        assert!(e.is::<SlowBody>(), "{e}");
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_body_is_read_to_its_end() {
        let (tx, b) = fed();
        let mut b = limited(b, Duration::from_secs(30));
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                tx.send(Bytes::from_static(b"x")).await.unwrap();
            }
        });
        let mut n = 0;
        while let Some(f) = b.frame().await {
            assert!(f.is_ok(), "each wait is under the timeout");
            n += 1;
        }
        assert_eq!(n, 5);
        assert_eq!(b.seen.load(Ordering::Relaxed), 5);
    }
}
