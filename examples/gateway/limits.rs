//! What keeps anonymous clients from exhausting the gateway: a send timeout on every connection,
//! a timeout on request bodies, the open-files limit and a backed-off accept loop.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep_until, Instant, Sleep};

use crate::BoxError;

/// A clock that runs while a socket or body makes no progress: started by the first poll that
/// would wait, stopped by any that makes progress. Its timer is allocated once, on the first wait
/// (hyper needs the wrappers to be `Unpin`, so it is boxed).
#[derive(Debug)]
struct StallClock {
    sleep: Option<Pin<Box<Sleep>>>,
    limit: Option<Duration>,
    armed: bool,
}

impl StallClock {
    /// `limit: None` never runs out.
    fn new(limit: Option<Duration>) -> Self {
        Self {
            sleep: None,
            limit,
            armed: false,
        }
    }

    /// Something went through: the clock stops.
    fn progressed(&mut self) {
        self.armed = false;
    }

    /// Nothing went through: starts the clock if it is not running; `Ready(limit)` once it ran
    /// out.
    fn waiting(&mut self, cx: &mut Context<'_>) -> Poll<Duration> {
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        let deadline = Instant::now() + limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(sleep_until(deadline)));
        if !self.armed {
            sleep.as_mut().reset(deadline);
            self.armed = true;
        }
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(limit)
    }
}

pin_project! {
    /// A connection's socket that fails with `TimedOut` once it has accepted no byte for the
    /// send timeout while the server has something to send: a client that stopped reading
    /// loses its connection, not only its queue. The clock starts when a write or flush would
    /// block and restarts after every write that makes progress. Its timer is allocated once,
    /// for a connection whose writes block (hyper needs the IO to be `Unpin`).
    #[derive(Debug)]
    pub(crate) struct SendTimeout<T> {
        #[pin]
        inner: T,
        clock: StallClock,
    }
}

/// The error a connection ends with when its client accepted no byte for the send timeout.
#[derive(Debug)]
pub(crate) struct SendTimedOut(Duration);

impl fmt::Display for SendTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client accepted no byte for {:?} (--send-timeout)",
            self.0
        )
    }
}

impl Error for SendTimedOut {}

impl<T> SendTimeout<T> {
    /// `limit: None` never times out.
    pub(crate) fn new(inner: T, limit: Option<Duration>) -> Self {
        Self {
            inner,
            clock: StallClock::new(limit),
        }
    }

    /// Passes a ready write through (and stops the clock); on a blocked one, starts the clock
    /// if it is not running and fails once it ran out.
    fn check<R>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let clock = self.project().clock;
        if poll.is_ready() {
            clock.progressed();
            return poll;
        }
        let limit = ready!(clock.waiting(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            SendTimedOut(limit),
        )))
    }
}

impl<T: AsyncRead> AsyncRead for SendTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = self.as_mut().project().inner.poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = self.as_mut().project().inner.poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = self.as_mut().project().inner.poll_shutdown(cx);
        self.check(cx, poll)
    }
}

pin_project! {
    /// A request body that fails once its client sent no byte for the body timeout while the
    /// service waits for it (the proxy answers 408). The clock starts when a read would wait and
    /// restarts after every frame; its timer is allocated only for a body that waits.
    #[derive(Debug)]
    pub(crate) struct BodyTimeout<B> {
        #[pin]
        inner: B,
        clock: StallClock,
    }
}

/// The error of a request body whose client sent no byte for the body timeout.
#[derive(Debug)]
pub(crate) struct BodyTimedOut(Duration);

impl fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client sent no byte of the request body for {:?} (--body-timeout)",
            self.0
        )
    }
}

impl Error for BodyTimedOut {}

impl<B> BodyTimeout<B> {
    /// `limit: None` never times out.
    pub(crate) fn new(inner: B, limit: Option<Duration>) -> Self {
        Self {
            inner,
            clock: StallClock::new(limit),
        }
    }
}

impl<B> Body for BodyTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            this.clock.progressed();
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let limit = ready!(this.clock.waiting(cx));
        Poll::Ready(Some(Err(Box::new(BodyTimedOut(limit)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The HTTP/2 streams of one connection, watched for a client that stops granting flow-control
/// window: hyper then holds a stream's next frame without writing to the socket, so the socket
/// never blocks and [`SendTimeout`] cannot see it. Like nginx, the gateway applies the send
/// timeout to such a stream too, closing its connection (hyper gives no handle to reset one
/// stream from outside). HTTP/1 responses are not registered: their stalls block the socket.
#[derive(Debug)]
pub(crate) struct StallWatch {
    streams: std::sync::Mutex<Vec<std::sync::Weak<Held>>>,
    registered: tokio::sync::Notify,
    epoch: Instant,
}

/// When a stream's body last handed hyper a data frame that hyper has not come back from, in
/// milliseconds since the watch's epoch plus one; 0 while the body is polled or waits for data.
#[derive(Debug)]
pub(crate) struct Held {
    since: std::sync::atomic::AtomicU64,
    epoch: Instant,
}

impl Held {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl StallWatch {
    pub(crate) fn new() -> Self {
        Self {
            streams: std::sync::Mutex::new(Vec::new()),
            registered: tokio::sync::Notify::new(),
            epoch: Instant::now(),
        }
    }

    /// Watches one more stream: its body reports through the returned handle.
    pub(crate) fn register(&self) -> std::sync::Arc<Held> {
        let held = std::sync::Arc::new(Held {
            since: std::sync::atomic::AtomicU64::new(0),
            epoch: self.epoch,
        });
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.retain(|stream| stream.strong_count() > 0);
        streams.push(std::sync::Arc::downgrade(&held));
        drop(streams);
        self.registered.notify_one();
        held
    }

    /// Resolves once a stream's frame has waited for the client longer than `limit`. Checks
    /// four times per `limit`, and only once a stream was registered.
    pub(crate) async fn stalled(&self, limit: Duration) {
        loop {
            let registered = self.registered.notified();
            if !self
                .streams
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                break;
            }
            registered.await;
        }
        let every = (limit / 4).max(Duration::from_millis(10));
        let mut ticks = tokio::time::interval(every);
        let limit_ms = limit.as_millis() as u64;
        loop {
            ticks.tick().await;
            let now = self.epoch.elapsed().as_millis() as u64 + 1;
            let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
            let stalled = streams
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .any(|held| {
                    let since = held.since.load(std::sync::atomic::Ordering::Relaxed);
                    since != 0 && now.saturating_sub(since) > limit_ms
                });
            if stalled {
                return;
            }
        }
    }
}

pin_project! {
    /// A response body that tells its [`StallWatch`] when hyper holds one of its data frames
    /// (from handing it over until the next poll). Without a watch, it only passes frames on.
    #[derive(Debug)]
    pub(crate) struct Watched<B> {
        #[pin]
        inner: B,
        held: Option<std::sync::Arc<Held>>,
    }
}

impl<B> Watched<B> {
    pub(crate) fn new(inner: B, held: Option<std::sync::Arc<Held>>) -> Self {
        Self { inner, held }
    }
}

impl<B: Body> Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        use std::sync::atomic::Ordering::Relaxed;
        let this = self.project();
        let Some(held) = this.held else {
            return this.inner.poll_frame(cx);
        };
        held.since.store(0, Relaxed);
        let poll = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll {
            if frame.is_data() {
                held.since.store(held.now(), Relaxed);
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `error` or one of its causes is a request body timeout.
pub(crate) fn is_body_timeout(error: &(dyn Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<BodyTimedOut>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// What became of `--sched-slice` on the thread that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CpuSlice {
    /// The kernel runs the thread in slices of this many nanoseconds.
    Applied(u64),
    /// The kernel took the request for this many nanoseconds and does not show its slices.
    Requested(u64),
    /// The kernel took the request but keeps its own slice (before Linux 6.12, or not Linux).
    Unsupported,
    /// The thread has a real-time or deadline policy of its own (set with `chrt`, say): kept.
    OtherPolicy,
}

/// Asks the kernel to run the calling thread in CPU slices of `slice` (Linux 6.12 and later: the
/// EEVDF scheduler's custom slice for a normal thread, `sched_attr.sched_runtime`, clamped by the
/// kernel to 0.1-100 ms). A thread with a short slice runs sooner once woken, and yields sooner
/// to a thread woken while it runs, for the same share of the CPU: its weight (its nice value)
/// is kept. That is what a proxy wants from the cores it shares: each event is a short run of
/// work, and one waiting behind another process's longer run is the tail of its latency (README,
/// Sizing). Asks for nothing when `slice` is zero.
#[cfg(target_os = "linux")]
// Neither std nor rustix wraps `sched_getattr` and `sched_setattr`: two raw system calls on a
// plain struct, the gateway's only unsafe code (the library forbids it).
#[allow(unsafe_code)]
pub(crate) fn request_cpu_slice(slice: Duration) -> io::Result<CpuSlice> {
    /// `struct sched_attr` of `sched_setattr(2)`, as far as the `SCHED_FLAG_UTIL_CLAMP` fields.
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }
    const RESET_ON_FORK: u64 = 0x01;
    if slice.is_zero() {
        return Ok(CpuSlice::Unsupported);
    }
    let size = std::mem::size_of::<SchedAttr>() as u32;
    let mut attr = SchedAttr::default();
    // SAFETY: `sched_getattr` writes at most `size` bytes into `attr`, which has that size; the
    // thread id 0 is the calling thread.
    let got = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            std::ptr::from_mut(&mut attr),
            size,
            0,
        )
    };
    if got != 0 {
        return Err(io::Error::last_os_error());
    }
    if attr.policy != libc::SCHED_OTHER as u32 && attr.policy != libc::SCHED_BATCH as u32 {
        return Ok(CpuSlice::OtherPolicy);
    }
    // The thread's policy, nice value and reset-on-fork flag, with the slice asked for.
    attr.size = size;
    attr.flags &= RESET_ON_FORK;
    attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
    // SAFETY: `attr` is a complete `sched_attr` of `size` bytes that the kernel only reads.
    let set = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::from_ref(&attr), 0) };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    // Kernels before custom slices take `sched_runtime` of a normal thread and ignore it; the
    // thread's own scheduler statistics tell which.
    let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
    let now = sched
        .lines()
        .find_map(|line| line.strip_prefix("se.slice"))
        .and_then(|rest| {
            rest.trim_start_matches([' ', ':'])
                .trim()
                .parse::<u64>()
                .ok()
        });
    let asked = attr.runtime.clamp(100_000, 100_000_000);
    Ok(match now {
        Some(now) if now == asked => CpuSlice::Applied(now),
        Some(_) => CpuSlice::Unsupported,
        None => CpuSlice::Requested(asked),
    })
}

/// Elsewhere the kernel has no such request.
#[cfg(not(target_os = "linux"))]
pub(crate) fn request_cpu_slice(_slice: Duration) -> io::Result<CpuSlice> {
    Ok(CpuSlice::Unsupported)
}

/// Raises the soft limit of open files to the hard one, as nginx's `worker_rlimit_nofile`: each
/// connection is a file, and the usual soft limit (1,024) is far below what a gateway holds.
/// Returns the limits before and after.
#[cfg(unix)]
pub(crate) fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(u64::MAX);
    if limit.current.is_some() && limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok((before, limit.current.unwrap_or(u64::MAX)))
}

/// How long the accept loop pauses after a failed accept: 10 ms, doubling up to 1 s while the
/// failures go on (out of file descriptors, say: the pending connection stays in the backlog and
/// every retry would fail at once), back to the start after a success. It logs one line when a
/// burst of failures starts and one when it ends.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    failures: u64,
    since: Option<std::time::Instant>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// Records a failed accept; returns how long to wait before the next one.
    pub(crate) fn failed(&mut self, error: &io::Error) -> Duration {
        if self.failures == 0 {
            self.since = Some(std::time::Instant::now());
            eprintln!(
                "accept failed: {error}; backing off (10 ms doubling to 1 s) until it succeeds"
            );
        }
        self.failures += 1;
        let shift = (self.failures - 1).min(16) as u32;
        Self::FIRST.saturating_mul(1 << shift).min(Self::MAX)
    }

    /// Records a successful accept.
    pub(crate) fn accepted(&mut self) {
        if self.failures > 0 {
            let took = self.since.map(|since| since.elapsed()).unwrap_or_default();
            eprintln!(
                "accepting again after {} failed accepts over {took:.1?}",
                self.failures
            );
            self.failures = 0;
            self.since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_socket_that_takes_no_byte_fails_after_the_send_timeout() {
        let (client, server) = tokio::io::duplex(64);
        let mut server = SendTimeout::new(server, Some(Duration::from_secs(1)));
        let started = Instant::now();
        let error = server.write_all(&[b'x'; 1024]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.get_ref().unwrap().is::<SendTimedOut>());
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_keeps_the_clock_from_running_out() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = SendTimeout::new(server, Some(Duration::from_secs(1)));
        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            let mut read = 0;
            while read < 1024 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                read += client.read(&mut buf).await.unwrap();
            }
        });
        // 1 KiB at 16 bytes every 0.9 s: almost a minute, never a second without progress.
        server.write_all(&[b'x'; 1024]).await.unwrap();
        reader.await.unwrap();
        // Off: never times out.
        let (_client, server) = tokio::io::duplex(64);
        let mut server = SendTimeout::new(server, None);
        let write = server.write_all(&[b'x'; 1024]);
        assert!(tokio::time::timeout(Duration::from_secs(3600), write)
            .await
            .is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_whose_frame_waits_for_the_client_is_reported_after_the_limit() {
        let watch = StallWatch::new();
        let (mut sender, body) =
            http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
        let mut body = Watched::new(body, Some(watch.register()));
        let limit = Duration::from_secs(1);
        // A body waiting for its own data is not a stall.
        let idle = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                () = watch.stalled(limit) => {}
                _ = body.frame() => unreachable!("no frame was sent"),
            }
        });
        assert!(idle.await.is_err());
        // A frame handed over and not followed by a poll is.
        sender.send_data(Bytes::from_static(b"x")).await.unwrap();
        body.frame().await.unwrap().unwrap();
        let started = Instant::now();
        watch.stalled(limit).await;
        let took = started.elapsed();
        assert!(
            took > limit && took <= limit + limit / 4 + Duration::from_millis(10),
            "{took:?}"
        );
        // Polled again: no longer held.
        drop(sender);
        assert!(body.frame().await.is_none());
        drop(body);
        assert!(
            tokio::time::timeout(Duration::from_secs(10), watch.stalled(limit))
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_silent_for_the_timeout_fails_and_a_slow_one_does_not() {
        let (mut sender, body) =
            http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(1);
        let mut body = BodyTimeout::new(body, Some(Duration::from_secs(1)));
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                sender.send_data(Bytes::from_static(b"x")).await.unwrap();
            }
            // Then silence, the sender kept.
            std::future::pending::<()>().await;
        });
        for _ in 0..5 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
        }
        let started = Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(is_body_timeout(&*error));
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_starts_over_after_a_success() {
        let mut backoff = AcceptBackoff::default();
        let error = io::Error::from_raw_os_error(24);
        let waits: Vec<_> = (0..10).map(|_| backoff.failed(&error)).collect();
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        backoff.accepted();
        assert_eq!(backoff.failed(&error), Duration::from_millis(10));
    }
}
