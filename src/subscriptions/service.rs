//! [`SubscribeLayer`]: the subscribe paths and disposable subscriptions (and, when asked, the
//! API) in front of the topics' service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{HeaderName, ALLOW};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::api::{self, error, not_found, unavailable};
use super::body::{Channel, SubscribeBody};
use super::{Created, Route, Status, Subscription, SubscriptionStore, Subscriptions};
use crate::replay::client_last_event_id;
use crate::telemetry;
use crate::wire::LAST_EVENT_ID;
use crate::BoxError;

const SUBSCRIPTION: HeaderName = HeaderName::from_static("sse-subscription");

/// Serves the subscribe paths and disposable subscriptions in front of the service that serves
/// the topics' streams; made by [`Subscriptions::layer`]. The management API goes to the inner
/// service untouched unless [`with_api`](Self::with_api) says otherwise. See the
/// [module docs](super).
#[derive(Clone)]
pub struct SubscribeLayer<St> {
    subscriptions: Subscriptions<St>,
    api: bool,
}

impl<St: fmt::Debug> fmt::Debug for SubscribeLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscribeLayer")
            .field("subscriptions", &self.subscriptions)
            .field("api", &self.api)
            .finish()
    }
}

impl<St> SubscribeLayer<St> {
    /// The layer of `subscriptions` (the same as [`Subscriptions::layer`]): readers only.
    pub fn new(subscriptions: Subscriptions<St>) -> Self {
        Self {
            subscriptions,
            api: false,
        }
    }

    /// Serves the management API here too (create, list, get, suspend and reactivate,
    /// delete), under the [`api_prefix`](Subscriptions::api_prefix). Only for a service that
    /// only operators reach (everything in front of it authenticates them): whoever reaches
    /// the API can list every id, read any subscription and suspend or delete it. Otherwise
    /// mount [`Subscriptions::api`] behind your authentication.
    pub fn with_api(mut self) -> Self {
        self.api = true;
        self
    }
}

impl<S, St: Clone> Layer<S> for SubscribeLayer<St> {
    type Service = Subscribe<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Subscribe {
            inner,
            subscriptions: self.subscriptions.clone(),
            api: self.api,
        }
    }
}

/// The service made by [`SubscribeLayer`]; see the [module docs](super).
#[derive(Clone)]
pub struct Subscribe<S, St> {
    inner: S,
    subscriptions: Subscriptions<St>,
    api: bool,
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Subscribe<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscribe")
            .field("inner", &self.inner)
            .field("subscriptions", &self.subscriptions)
            .field("api", &self.api)
            .finish()
    }
}

impl<S, St: Clone> Subscribe<S, St> {
    /// Wraps `inner`, the topics' service, for the readers of `subscriptions` (as
    /// [`SubscribeLayer::new`]).
    pub fn new(inner: S, subscriptions: Subscriptions<St>) -> Self {
        SubscribeLayer::new(subscriptions).layer(inner)
    }

    /// The layer, to configure it.
    pub fn layer(subscriptions: Subscriptions<St>) -> SubscribeLayer<St> {
        SubscribeLayer::new(subscriptions)
    }
}

impl<S, St> Subscribe<S, St> {
    inner_service_accessors!();
}

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A channel about to open: the request for the topic's stream, and the channel to hold while
/// it is open (none when a disposable subscription could not be stored).
type Opened<ReqBody> = Result<(Request<ReqBody>, Option<Channel>), Response<Bytes>>;

impl<S, St, ReqBody, ResBody> Service<Request<ReqBody>> for Subscribe<S, St>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: SubscriptionStore,
    ReqBody: Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<SubscribeBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let subscriptions = self.subscriptions.clone();
        let config = &subscriptions.config;
        let path = request.uri().path();
        let reading = matches!(*request.method(), Method::GET | Method::HEAD);
        let state = match Route::under(&config.api_prefix, path) {
            Some(Route::Subscribe(id)) if reading => self.opening(open(subscriptions, id, request)),
            Some(Route::Subscribe(_)) => {
                let mut refused = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method-not-allowed",
                    "allowed: GET, HEAD",
                );
                refused
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
                State::Answer {
                    answer: Some(refused),
                }
            }
            Some(route) if self.api => State::Api {
                future: Box::pin(api::answer(subscriptions, route, request)),
            },
            Some(_) => State::Calling {
                future: self.inner.call(request),
                channel: None,
            },
            None => match config.topic_path.topic(path) {
                Some(topic) if reading && config.disposable => {
                    let topic = topic.to_owned();
                    self.opening(open_disposable(subscriptions, topic, request))
                }
                _ => State::Calling {
                    future: self.inner.call(request),
                    channel: None,
                },
            },
        };
        ResponseFuture { state }
    }
}

impl<S, St> Subscribe<S, St> {
    fn opening<ReqBody>(
        &mut self,
        future: impl Future<Output = Opened<ReqBody>> + Send + 'static,
    ) -> State<S, ReqBody>
    where
        S: Service<Request<ReqBody>> + Clone,
    {
        // The ready service goes into the future; a clone takes its place (tower's rule).
        let clone = self.inner.clone();
        State::Opening {
            future: Box::pin(future),
            inner: Some(std::mem::replace(&mut self.inner, clone)),
        }
    }
}

/// Opens a channel of the provisioned subscription `id`: its topic's stream, from its cursor.
async fn open<St: SubscriptionStore, ReqBody>(
    subscriptions: Subscriptions<St>,
    id: String,
    mut request: Request<ReqBody>,
) -> Opened<ReqBody> {
    // Registered before the status is read, so a suspension in between is not missed.
    let registration = subscriptions.channels.open(&id);
    subscriptions
        .channels
        .watch(subscriptions.store(), subscriptions.config.poll_interval);
    let subscription = match subscriptions.store().get(&id).await {
        Ok(Some(subscription)) => subscription,
        Ok(None) => {
            telemetry::subscription_channel("unknown", &id);
            return Err(not_found(&id));
        }
        Err(failed) => return Err(unavailable(&failed)),
    };
    if subscription.status == Status::Suspended {
        telemetry::subscription_channel("suspended", &id);
        return Err(error(
            StatusCode::CONFLICT,
            "suspended",
            &format!("subscription {id} is suspended; reactivate it to read it"),
        ));
    }
    // Read before the rewrite, which drops the query: the reader cannot steer what the
    // subscription reads, only say where it is.
    let own = client_last_event_id(&request);
    let path = subscriptions.config.topic_path.path(&subscription.topic);
    set_path(&mut request, &path);
    // The client's own id wins: an EventSource that reconnects by itself knows what it has.
    let resume =
        own.or_else(|| (!subscription.cursor.is_empty()).then(|| subscription.cursor.to_vec()));
    match resume.map(|id| HeaderValue::from_bytes(&id)) {
        Some(Ok(id)) => {
            request.headers_mut().insert(LAST_EVENT_ID, id);
        }
        _ => {
            request.headers_mut().remove(LAST_EVENT_ID);
        }
    }
    telemetry::subscription_channel("provisioned", &id);
    Ok((
        request,
        Some(Channel::new(
            subscriptions.sink.clone(),
            registration,
            false,
        )),
    ))
}

/// Opens a plain topic request with a disposable subscription; without one if the store
/// refuses or fails (the stream is served either way).
async fn open_disposable<St: SubscriptionStore, ReqBody>(
    subscriptions: Subscriptions<St>,
    topic: String,
    request: Request<ReqBody>,
) -> Opened<ReqBody> {
    let subscription = Subscription::new(topic).disposable(true);
    let registration = subscriptions.channels.open(&subscription.id);
    subscriptions
        .channels
        .watch(subscriptions.store(), subscriptions.config.poll_interval);
    let caps = subscriptions.config.caps;
    let id = subscription.id.clone();
    match subscriptions.store().create(subscription, caps).await {
        Ok(Created::Stored) => {
            telemetry::subscription_channel("disposable", &id);
            Ok((
                request,
                Some(Channel::new(subscriptions.sink.clone(), registration, true)),
            ))
        }
        Ok(Created::Full) => Ok((request, None)),
        Err(failed) => {
            tracing::warn!(target: "tower_sse", error = %failed, "subscriptions: disposable subscription not stored");
            Ok((request, None))
        }
    }
}

/// Points `request` at `path`, without a query.
fn set_path<B>(request: &mut Request<B>, path: &str) {
    let Ok(path_and_query) = PathAndQuery::try_from(path) else {
        return;
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

pin_project! {
    /// The response future of [`Subscribe`].
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        Answer { answer: Option<Response<Bytes>> },
        Api { future: Boxed<Response<Bytes>> },
        Opening { future: Boxed<Opened<ReqBody>>, inner: Option<S> },
        Calling { #[pin] future: S::Future, channel: Option<Channel> },
    }
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Answer { .. } => "Answer",
            State::Api { .. } => "Api",
            State::Opening { .. } => "Opening",
            State::Calling { .. } => "Calling",
        };
        f.debug_tuple("ResponseFuture").field(&state).finish()
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Response<SubscribeBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Answer { answer } => {
                    let answer = answer.take().expect("polled after completion");
                    return Poll::Ready(Ok(answer.map(SubscribeBody::answer)));
                }
                StateProj::Api { future } => {
                    let answer = ready!(future.as_mut().poll(cx));
                    return Poll::Ready(Ok(answer.map(SubscribeBody::answer)));
                }
                StateProj::Opening { future, inner } => {
                    let (request, channel) = match ready!(future.as_mut().poll(cx)) {
                        Ok(opened) => opened,
                        Err(answer) => {
                            state.set(State::Answer {
                                answer: Some(answer),
                            });
                            continue;
                        }
                    };
                    let mut inner = inner.take().expect("polled after completion");
                    let future = inner.call(request);
                    state.set(State::Calling { future, channel });
                }
                StateProj::Calling { future, channel } => {
                    let response = ready!(future.poll(cx))?;
                    let Some(channel) = channel.take() else {
                        return Poll::Ready(Ok(response.map(SubscribeBody::untouched)));
                    };
                    let id = HeaderValue::from_str(channel.id());
                    let mut response = channel.wrap(response);
                    if let Ok(id) = id {
                        response.headers_mut().insert(SUBSCRIPTION, id);
                    }
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}
