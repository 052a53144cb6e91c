//! The shared state of a fan-out hub: one topic per stream key, one bounded queue per client,
//! and the background task that reads the upstream body and feeds the queues.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body::Body;
use tokio::sync::{oneshot, Notify};
use tokio::time::{sleep, Instant};
use tower_service::Service;

use super::{Config, SlowClient};
use crate::replay::{AlreadyRecorded, Ids, Recorder, ReplayStore};
use crate::telemetry;
use crate::wire::{is_plain_event_stream, Parser, LAST_EVENT_ID};

/// A poisoned lock is still consistent here: every update completes before anything can panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The topics of one [`FanoutLayer`](super::FanoutLayer) and its clones.
#[derive(Debug, Default)]
pub(super) struct Hub {
    topics: Mutex<HashMap<Bytes, Arc<Topic>>>,
    /// Clients being fed: counted while their queue is on a topic's list.
    clients: Arc<AtomicUsize>,
    tasks: AtomicUsize,
    /// Subscriptions that hold an upstream response (or are calling for one): at most
    /// `max_subscriptions`, however many topics are being evicted.
    upstreams: Mutex<usize>,
    /// Notified when an upstream slot is freed.
    freed: Notify,
}

/// A subscription's right to hold an upstream response; dropped with the upstream body.
struct Slot {
    hub: Arc<Hub>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        *lock(&self.hub.upstreams) -= 1;
        self.hub.freed.notify_waiters();
    }
}

impl Hub {
    pub(super) fn subscriptions(&self) -> usize {
        self.tasks.load(Ordering::Relaxed)
    }

    pub(super) fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Attaches a new client to the subscription of `key`, opening one if none runs. Returns the
    /// client and, when it opened the subscription, the topic to start; `None` when the hub
    /// holds `max` subscriptions and none of them can be closed (every one has clients).
    pub(super) fn attach(
        self: &Arc<Self>,
        key: Bytes,
        max: usize,
    ) -> Option<(Client, Option<Arc<Topic>>)> {
        let mut topics = lock(&self.topics);
        let queue = Arc::new(Queue::default());
        let mut resume_id = None;
        if let Some(topic) = topics.get(&key) {
            // Checked and joined under one lock: a subscription that is ending takes nobody.
            let mut state = lock(&topic.state);
            if matches!(state.phase, Phase::Opening | Phase::Open) && !state.closed {
                state.clients.push(queue.clone());
                state.idle_since = None;
                drop(state);
                let topic = topic.clone();
                drop(topics);
                return Some((self.client(topic, queue), None));
            }
            // An ended subscription hands its upstream position to the next one.
            resume_id = state.resume_id.clone();
        } else if topics.len() >= max {
            // A batch (1/64 of the cap) per scan of the topics, so that a stream of new keys on
            // a full hub costs O(64) topic checks per request, not O(max).
            let excess = (topics.len() + 1 - max).max(max / 64);
            evict_idle(&mut topics, excess);
            if topics.len() >= max {
                return None;
            }
        }
        let topic = Arc::new(Topic::new(key.clone(), resume_id, self.clients.clone()));
        lock(&topic.state).clients.push(queue.clone());
        topics.insert(key, topic.clone());
        drop(topics);
        Some((self.client(topic.clone(), queue), Some(topic)))
    }

    /// An upstream slot when fewer than `max` are taken.
    fn take_slot(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let mut upstreams = lock(&self.upstreams);
        (*upstreams < max).then(|| {
            *upstreams += 1;
            Slot { hub: self.clone() }
        })
    }

    fn client(self: &Arc<Self>, topic: Arc<Topic>, queue: Arc<Queue>) -> Client {
        self.clients.fetch_add(1, Ordering::Relaxed);
        telemetry::subscribers_changed(1);
        Client { topic, queue }
    }

    /// Forgets `topic` unless a newer subscription took its key.
    fn remove(&self, topic: &Arc<Topic>) {
        let mut topics = lock(&self.topics);
        if topics
            .get(&topic.key)
            .is_some_and(|current| Arc::ptr_eq(current, topic))
        {
            topics.remove(&topic.key);
        }
    }
}

/// The shared response head, given to every client of a subscription.
#[derive(Debug)]
pub(super) struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    extensions: http::Extensions,
}

impl Head {
    pub(super) fn response<B>(&self, body: B) -> Response<B> {
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        *response.version_mut() = self.version;
        *response.headers_mut() = self.headers.clone();
        *response.extensions_mut() = self.extensions.clone();
        response
    }
}

#[derive(Debug)]
enum Phase {
    /// The inner service has not answered yet.
    Opening,
    /// The upstream body is being fanned out.
    Open,
    /// The inner service failed or did not answer with a shareable event stream.
    Failed,
    /// The upstream ended, or nobody came back before the linger expired.
    Ended,
}

/// Closes up to `count` subscriptions that have no client, the one idle for longest first.
fn evict_idle(topics: &mut HashMap<Bytes, Arc<Topic>>, count: usize) {
    let mut idle: Vec<(Instant, Bytes)> = topics
        .iter()
        .filter_map(|(key, topic)| {
            let state = lock(&topic.state);
            let since = state.idle_since.filter(|_| state.clients.is_empty())?;
            Some((since, key.clone()))
        })
        .collect();
    if idle.len() > count {
        idle.select_nth_unstable_by_key(count, |(since, _)| *since);
        idle.truncate(count);
    }
    for (_, key) in idle {
        if let Some(topic) = topics.remove(&key) {
            lock(&topic.state).close();
        }
    }
}

/// One stream key's subscription.
#[derive(Debug)]
pub(super) struct Topic {
    key: Bytes,
    state: Mutex<TopicState>,
    /// The hub's count of clients being fed.
    fed: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct TopicState {
    phase: Phase,
    head: Option<Arc<Head>>,
    clients: Vec<Arc<Queue>>,
    /// Woken when the last client leaves, so the linger starts.
    task: Option<Waker>,
    /// The upstream's last event id, for the next subscription of this key.
    resume_id: Option<Bytes>,
    /// Since when nobody is attached (`None` while somebody is).
    idle_since: Option<Instant>,
    /// Whether a client was attached when the response head came, or took it later: only then
    /// does the subscription linger.
    served: bool,
    /// Taken off the hub (idle, to make room, or abandoned): the task ends at once.
    closed: bool,
}

impl TopicState {
    /// Takes the subscription off duty: the task hears of it and ends.
    fn close(&mut self) {
        self.closed = true;
        if let Some(task) = &self.task {
            task.wake_by_ref();
        }
    }

    fn register(&mut self, task: &Waker) {
        match &self.task {
            Some(waker) if waker.will_wake(task) => {}
            _ => self.task = Some(task.clone()),
        }
    }

    /// Notes that the last client left.
    fn emptied(&mut self) {
        if self.clients.is_empty() && self.idle_since.is_none() {
            self.idle_since = Some(Instant::now());
        }
    }
}

/// What the task of a subscription learns about its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Audience {
    /// Somebody is attached.
    Attached,
    /// Nobody is attached, and somebody got the response head: linger.
    Idle,
    /// Nobody is attached and nobody ever got a response: nobody comes back for it.
    Abandoned,
    /// The hub closed the subscription.
    Closed,
}

impl Topic {
    fn new(key: Bytes, resume_id: Option<Bytes>, fed: Arc<AtomicUsize>) -> Self {
        Self {
            key,
            fed,
            state: Mutex::new(TopicState {
                phase: Phase::Opening,
                head: None,
                clients: Vec::new(),
                task: None,
                resume_id,
                idle_since: None,
                served: false,
                closed: false,
            }),
        }
    }

    fn open(&self, head: Head) {
        let mut state = lock(&self.state);
        state.phase = Phase::Open;
        state.head = Some(Arc::new(head));
        // Whoever is attached now gets this response (and may come back for the rest).
        state.served |= !state.clients.is_empty();
        for queue in &state.clients {
            queue.wake();
        }
    }

    /// Ends the subscription for every client: what is queued is still delivered.
    fn end(&self, resume_id: Option<Bytes>) {
        let mut state = lock(&self.state);
        state.phase = match state.phase {
            Phase::Opening | Phase::Failed => Phase::Failed,
            Phase::Open | Phase::Ended => Phase::Ended,
        };
        if resume_id.is_some() {
            state.resume_id = resume_id;
        }
        self.fed.fetch_sub(state.clients.len(), Ordering::Relaxed);
        telemetry::subscribers_changed(-(state.clients.len() as isize));
        for queue in state.clients.drain(..) {
            queue.end(End::Clean);
        }
        state.emptied();
    }

    /// Queues `frame` for every client, applying the slow-client policy.
    fn broadcast(&self, frame: &Bytes, config: &Config) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let before = state.clients.len();
        state
            .clients
            .retain(|queue| queue.offer(frame, now, config));
        let cut = before - state.clients.len();
        if cut > 0 {
            self.fed.fetch_sub(cut, Ordering::Relaxed);
            telemetry::subscribers_changed(-(cut as isize));
            state.emptied();
        }
    }

    /// Who is attached; registers the task to hear when that changes.
    fn audience(&self, task: &Waker) -> Audience {
        let mut state = lock(&self.state);
        state.register(task);
        if state.closed {
            Audience::Closed
        } else if !state.clients.is_empty() {
            Audience::Attached
        } else if state.served {
            Audience::Idle
        } else {
            Audience::Abandoned
        }
    }

    fn detach(&self, queue: &Arc<Queue>) {
        let mut state = lock(&self.state);
        if let Some(index) = state.clients.iter().position(|q| Arc::ptr_eq(q, queue)) {
            state.clients.swap_remove(index);
            self.fed.fetch_sub(1, Ordering::Relaxed);
            telemetry::subscribers_changed(-1);
            if state.clients.is_empty() {
                state.emptied();
                if let Some(task) = &state.task {
                    task.wake_by_ref();
                }
            }
        }
    }
}

/// How a client's queue ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Clean,
    /// Cut off by the slow-client policy: the body ends with [`ClientTooSlow`](super::ClientTooSlow).
    Cut,
}

/// One client's bounded queue of whole-event frames, each with the instant it was queued.
#[derive(Debug, Default)]
pub(super) struct Queue {
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    frames: VecDeque<(Instant, Bytes)>,
    waker: Option<Waker>,
    end: Option<End>,
}

impl QueueState {
    fn register(&mut self, cx: &Context<'_>) {
        match &self.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.waker = Some(cx.waker().clone()),
        }
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// What a client's body reads next.
pub(super) enum Next {
    Frame(Bytes),
    Cut,
    End,
}

impl Queue {
    fn wake(&self) {
        lock(&self.state).wake();
    }

    fn end(&self, end: End) {
        let mut state = lock(&self.state);
        if end == End::Cut {
            state.frames.clear();
        }
        state.end.get_or_insert(end);
        state.wake();
    }

    /// Queues `frame` unless the client is too slow. Returns whether it stays attached.
    fn offer(&self, frame: &Bytes, now: Instant, config: &Config) -> bool {
        let mut state = lock(&self.state);
        let full = state.frames.len() >= config.queue;
        let late = config.write_deadline.is_some_and(|deadline| {
            state
                .frames
                .front()
                .is_some_and(|(queued, _)| now.saturating_duration_since(*queued) >= deadline)
        });
        match config.slow_client {
            SlowClient::Disconnect if full || late => {
                telemetry::slow_client("disconnect");
                drop(state);
                self.end(End::Cut);
                return false;
            }
            SlowClient::SkipEvents if full => {
                telemetry::slow_client("skip");
                return true;
            }
            _ => {}
        }
        state.frames.push_back((now, frame.clone()));
        state.wake();
        true
    }

    pub(super) fn poll_next(&self, cx: &Context<'_>) -> Poll<Next> {
        let mut state = lock(&self.state);
        if let Some((_, frame)) = state.frames.pop_front() {
            return Poll::Ready(Next::Frame(frame));
        }
        match state.end {
            Some(End::Cut) => {
                state.end = Some(End::Clean);
                Poll::Ready(Next::Cut)
            }
            Some(End::Clean) => Poll::Ready(Next::End),
            None => {
                state.register(cx);
                Poll::Pending
            }
        }
    }

    pub(super) fn is_end_stream(&self) -> bool {
        let state = lock(&self.state);
        state.frames.is_empty() && state.end == Some(End::Clean)
    }
}

/// What a client waiting for the response head learns.
pub(super) enum HeadState {
    Open(Arc<Head>),
    Failed,
}

/// A client's place in a subscription; dropping it detaches the client.
#[derive(Debug)]
pub(super) struct Client {
    topic: Arc<Topic>,
    queue: Arc<Queue>,
}

impl Client {
    pub(super) fn poll_head(&self, cx: &Context<'_>) -> Poll<HeadState> {
        let mut state = lock(&self.topic.state);
        if let Some(head) = &state.head {
            let head = head.clone();
            state.served = true;
            return Poll::Ready(HeadState::Open(head));
        }
        if matches!(state.phase, Phase::Failed | Phase::Ended) {
            return Poll::Ready(HeadState::Failed);
        }
        // The task wakes every client's queue when the head arrives; the topic lock is held, so
        // that cannot happen between this check and the registration.
        lock(&self.queue.state).register(cx);
        Poll::Pending
    }

    pub(super) fn queue(&self) -> &Queue {
        &self.queue
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.topic.detach(&self.queue);
    }
}

/// Why the owner of a subscription gets the inner service's answer to itself.
pub(super) enum Declined<B, E> {
    /// Not a shareable event stream: the response, untouched.
    Response(Response<B>),
    /// The inner service failed.
    Error(E),
}

/// Ends the topic however the task ends (finished, panicked, or dropped with the runtime).
struct TaskGuard {
    hub: Arc<Hub>,
    topic: Arc<Topic>,
    resume_id: Option<Bytes>,
    /// Why the subscription ended, for telemetry ("dropped": the runtime went away).
    reason: &'static str,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.hub.remove(&self.topic);
        self.topic.end(self.resume_id.take());
        self.hub.tasks.fetch_sub(1, Ordering::Relaxed);
        telemetry::subscription_closed(self.reason);
    }
}

/// Whether a response can be shared: a 200 event stream that no layer has encoded.
fn is_shareable<B>(response: &Response<B>) -> bool {
    response.status() == StatusCode::OK && is_plain_event_stream(response.headers())
}

/// Everything the subscription task needs besides the inner service and the request.
pub(super) struct Subscription<St> {
    pub(super) hub: Arc<Hub>,
    pub(super) topic: Arc<Topic>,
    pub(super) config: Arc<Config>,
    pub(super) store: Option<St>,
}

/// The background task of one subscription: calls the inner service once, then reads its body
/// and fans it out until the upstream ends or the linger after the last client expires.
pub(super) async fn run<S, ReqBody, ResBody, St>(
    subscription: Subscription<St>,
    mut inner: S,
    mut request: Request<ReqBody>,
    owner: oneshot::Sender<Declined<ResBody, S::Error>>,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
    St: ReplayStore,
{
    let Subscription {
        hub,
        topic,
        config,
        store,
    } = subscription;
    hub.tasks.fetch_add(1, Ordering::Relaxed);
    telemetry::subscription_opened();
    let mut guard = TaskGuard {
        hub,
        topic,
        resume_id: None,
        reason: "dropped",
    };
    let topic = guard.topic.clone();
    let inherited = lock(&topic.state).resume_id.clone();
    match inherited.and_then(|id| HeaderValue::from_maybe_shared(id).ok()) {
        Some(id) => {
            request.headers_mut().insert(LAST_EVENT_ID, id);
        }
        None if config.ids == Ids::AssignAlways => {
            // The client's ids are the store's, which the upstream never saw.
            request.headers_mut().remove(LAST_EVENT_ID);
        }
        None => {}
    }
    // An upstream slot first: the hub never holds more than `max_subscriptions` upstream
    // responses, counting those of subscriptions it closed that have not let go yet.
    let slot = loop {
        let freed = guard.hub.freed.notified();
        let mut freed = pin!(freed);
        freed.as_mut().enable();
        if let Some(slot) = guard.hub.take_slot(config.max_subscriptions) {
            break slot;
        }
        let wait = poll_fn(|cx| {
            if freed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            match topic.audience(cx.waker()) {
                Audience::Attached => Poll::Pending,
                audience => Poll::Ready(Some(audience)),
            }
        })
        .await;
        if wait.is_some() && close_if_idle(&guard.hub, &topic) {
            guard.reason = "abandoned";
            return;
        }
    };
    // Calling the upstream; when every client leaves before it answers, the call is dropped.
    let call = async {
        match poll_fn(|cx| inner.poll_ready(cx)).await {
            Ok(()) => inner.call(request).await,
            Err(error) => Err(error),
        }
    };
    let mut call = pin!(call);
    let response = loop {
        let step = poll_fn(|cx| {
            if let Poll::Ready(response) = call.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            match topic.audience(cx.waker()) {
                Audience::Attached => Poll::Pending,
                _ => Poll::Ready(None),
            }
        })
        .await;
        match step {
            Some(response) => break response,
            None if close_if_idle(&guard.hub, &topic) => {
                guard.reason = "abandoned";
                return;
            }
            // A client attached in between: keep waiting (the task hears of the next change).
            None => tokio::task::yield_now().await,
        }
    };
    let response = match response {
        Ok(response) if is_shareable(&response) => response,
        Ok(response) => {
            guard.reason = "not_shareable";
            let _ = owner.send(Declined::Response(response));
            return;
        }
        Err(error) => {
            guard.reason = "inner_error";
            let _ = owner.send(Declined::Error(error));
            return;
        }
    };
    drop(owner);
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    if store.is_some() {
        parts.extensions.insert(AlreadyRecorded);
    }
    topic.open(Head {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        extensions: parts.extensions,
    });
    let mut pump = Pump {
        parser: Parser::with_limits(config.limits),
        out: BytesMut::new(),
        recorder: store
            .map(|store| Recorder::new(store, topic.key.clone(), config.ids, true, None)),
        events: 0,
    };
    // Boxed, so that it can be dropped before the linger that follows an upstream end.
    let mut body = Box::pin(body);
    let linger = sleep(config.linger);
    let mut linger = pin!(linger);
    let mut lingering = false;
    loop {
        let step = poll_fn(|cx| {
            let audience = topic.audience(cx.waker());
            if audience == Audience::Closed {
                return Poll::Ready(Step::Closed);
            }
            if audience == Audience::Abandoned {
                // Nobody ever got this response: nobody comes back to it, no linger.
                return Poll::Ready(Step::LingerExpired);
            }
            if audience == Audience::Idle {
                if !lingering {
                    linger.as_mut().reset(Instant::now() + config.linger);
                    lingering = true;
                }
                if linger.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Step::LingerExpired);
                }
            } else {
                lingering = false;
            }
            match body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Step::Frame(frame.into_data().ok())),
                // An upstream error ends the subscription like its end: clients reconnect.
                Poll::Ready(_) => Poll::Ready(Step::UpstreamEnded),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match step {
            Step::Frame(None) => {}
            Step::Frame(Some(data)) => match pump.events(data) {
                Ok(Some(frame)) => topic.broadcast(&frame, &config),
                Ok(None) => {}
                // Past the parser's limits: end cleanly; clients resume where they are.
                Err(()) => {
                    guard.reason = "limits";
                    break;
                }
            },
            Step::LingerExpired => {
                if close_if_idle(&guard.hub, &topic) {
                    guard.reason = "linger_expired";
                    return;
                }
                lingering = false;
            }
            Step::Closed => {
                guard.reason = "evicted";
                return;
            }
            Step::UpstreamEnded => {
                guard.reason = "upstream_ended";
                break;
            }
        }
    }
    // The upstream is gone: clients end now; the topic stays for the linger so that whoever
    // comes back resubscribes from the upstream's last id.
    let resume_id = pump.resume_id();
    topic.end(resume_id.clone());
    guard.resume_id = resume_id;
    drop(body);
    drop(slot);
    // Until the linger expires or the hub needs the room.
    let linger = sleep(config.linger);
    let mut linger = pin!(linger);
    poll_fn(|cx| {
        if topic.audience(cx.waker()) == Audience::Closed {
            return Poll::Ready(());
        }
        linger.as_mut().poll(cx)
    })
    .await;
}

enum Step {
    Frame(Option<Bytes>),
    LingerExpired,
    UpstreamEnded,
    /// The hub closed the subscription to make room for another.
    Closed,
}

/// Removes the topic when still nobody is attached; both locks at once, so that no client can
/// attach to a subscription that is closing.
fn close_if_idle(hub: &Hub, topic: &Arc<Topic>) -> bool {
    let mut topics = lock(&hub.topics);
    let mut state = lock(&topic.state);
    if state.closed {
        return true;
    }
    if !state.clients.is_empty() {
        return false;
    }
    state.phase = Phase::Ended;
    state.closed = true;
    if topics
        .get(&topic.key)
        .is_some_and(|current| Arc::ptr_eq(current, topic))
    {
        topics.remove(&topic.key);
    }
    true
}

/// Turns upstream chunks into frames of whole events, recorded and with ids as configured.
struct Pump<St: ReplayStore> {
    parser: Parser,
    out: BytesMut,
    recorder: Option<Recorder<St>>,
    /// Events in the frame being built.
    events: usize,
}

impl<St: ReplayStore> Pump<St> {
    /// The whole events completed by `data`, as one frame; `Err` past the parser's limits.
    fn events(&mut self, data: Bytes) -> Result<Option<Bytes>, ()> {
        self.parser.push(data);
        while let Some(event) = self.parser.next_event() {
            let mut event = event.map_err(|_| ())?;
            if let Some(recorder) = &mut self.recorder {
                recorder.stamp(&mut event);
                // Stored as encoded for the clients: a copy that owns its buffer, so a store that
                // counts its bytes never holds the frame or the upstream chunk.
                recorder.record(&event, None);
            }
            event.encode_into(&mut self.out);
            self.events += 1;
        }
        if let Some(recorder) = &mut self.recorder {
            recorder.flush();
        }
        if self.out.is_empty() {
            return Ok(None);
        }
        telemetry::fanned_out(self.events);
        self.events = 0;
        Ok(Some(self.out.split().freeze()))
    }

    fn resume_id(&self) -> Option<Bytes> {
        let id = self.parser.last_event_id();
        (!id.is_empty()).then(|| Bytes::copy_from_slice(id))
    }
}
