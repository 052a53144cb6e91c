//! The subscriptions management API of the gateway, kept away from readers: on a listener of its
//! own (`--admin-listen`), or on the public port behind a bearer token (`--admin-token`), and
//! not served at all without either. Readers (`/subscriptions/{id}/subscribe`, topic streams)
//! stay on the public port, in the stack.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tokio::net::TcpListener;
use tower::Service;
use tower_sse::subscriptions::{SubscriptionApi, SubscriptionStore, Subscriptions};
use tower_sse::Shutdown;

use crate::BoxError;

/// The shortest `--admin-token` accepted.
pub(crate) const MIN_TOKEN: usize = 16;

/// An `--admin-token`: at least [`MIN_TOKEN`] visible ASCII characters (it goes in a header).
pub(crate) fn token(value: &str) -> Result<String, String> {
    if value.len() >= MIN_TOKEN && value.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "expected at least {MIN_TOKEN} visible ASCII characters (no spaces), such as the \
             output of `openssl rand -hex 32`"
        ))
    }
}

/// Who may use the API where it is asked for.
#[derive(Clone, Debug)]
enum Access {
    /// Not served here: `404`, as for any unknown path.
    Hidden,
    /// Served to whoever reaches this listener (the admin listener, without a token).
    Open,
    /// Served to requests with `Authorization: Bearer <token>`; `401` otherwise.
    Token(Arc<[u8]>),
}

/// Answers the API's routes by their access, and `404` for any other path (the admin
/// listener's whole service).
pub(crate) struct Admin<Sub> {
    subscriptions: Subscriptions<Sub>,
    api: SubscriptionApi<Sub>,
    access: Access,
}

impl<Sub: Clone> Clone for Admin<Sub> {
    fn clone(&self) -> Self {
        Self {
            subscriptions: self.subscriptions.clone(),
            api: self.api.clone(),
            access: self.access.clone(),
        }
    }
}

impl<Sub: SubscriptionStore> Admin<Sub> {
    fn new(subscriptions: &Subscriptions<Sub>, access: Access) -> Self {
        Self {
            subscriptions: subscriptions.clone(),
            api: subscriptions.api(),
            access,
        }
    }

    /// Starts the admin listener when `listen` is set, and returns what the public port does
    /// with the API's routes: serve them behind `token` when there is one and no admin
    /// listener, answer `404` otherwise.
    pub(crate) async fn start(
        subscriptions: &Subscriptions<Sub>,
        listen: Option<SocketAddr>,
        token: Option<&str>,
        limits: crate::Limits,
    ) -> Self {
        let token = token.map(|token| Access::Token(Arc::from(token.as_bytes())));
        let Some(listen) = listen else {
            return Self::new(subscriptions, token.unwrap_or(Access::Hidden));
        };
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("cannot listen on --admin-listen {listen}: {error}");
                std::process::exit(2);
            }
        };
        let addr = listener.local_addr().unwrap_or(listen);
        let guarded = if token.is_some() {
            ", token required"
        } else {
            ""
        };
        println!("  subscriptions API (admin listener{guarded}): http://{addr}/topics/<topic>/subscriptions");
        let admin = Self::new(subscriptions, token.unwrap_or(Access::Open));
        tokio::spawn(crate::serve(listener, admin, Shutdown::new(), limits));
        Self::new(subscriptions, Access::Hidden)
    }

    /// Whether `request` is on one of the API's routes.
    fn handles<B>(&self, request: &Request<B>) -> bool {
        self.subscriptions.is_api_path(request.uri().path())
    }

    /// The answer to a request on one of the API's routes.
    fn answer<B>(&mut self, request: Request<B>) -> AdminFuture
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let refused = match &self.access {
            Access::Hidden => Some(not_found()),
            Access::Open => None,
            Access::Token(token) => (!authorized(&request, token)).then(unauthorized),
        };
        match refused {
            Some(refused) => AdminFuture::Ready {
                answer: Some(refused),
            },
            None => AdminFuture::Api {
                future: self.api.call(request),
            },
        }
    }
}

/// True when `request` carries `Authorization: Bearer <token>`, compared in constant time.
fn authorized<B>(request: &Request<B>, token: &[u8]) -> bool {
    let Some(given) = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    constant_time_eq(given, token)
}

/// Equality whose time depends only on the length of `expected`, never on where `given`
/// first differs.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut differ = u8::from(given.len() != expected.len());
    for (i, byte) in expected.iter().enumerate() {
        let other = given.get(i).copied().unwrap_or(!byte);
        differ |= std::hint::black_box(other ^ byte);
    }
    differ == 0
}

fn json(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn not_found() -> Response<Full<Bytes>> {
    json(
        StatusCode::NOT_FOUND,
        r#"{"error":"not-found","message":"no such resource"}"#,
    )
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = json(
        StatusCode::UNAUTHORIZED,
        r#"{"error":"unauthorized","message":"the subscriptions API needs Authorization: Bearer <admin token>"}"#,
    );
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static(r#"Bearer realm="subscriptions""#),
    );
    response
}

type ApiFuture = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

pub(crate) enum AdminFuture {
    Ready {
        answer: Option<Response<Full<Bytes>>>,
    },
    Api {
        future: ApiFuture,
    },
}

impl Future for AdminFuture {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Self::Ready { answer } => Poll::Ready(Ok(answer.take().expect("polled once"))),
            Self::Api { future } => future.as_mut().poll(cx),
        }
    }
}

/// The admin listener's service.
impl<Sub, B> Service<Request<B>> for Admin<Sub>
where
    Sub: SubscriptionStore,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = AdminFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> AdminFuture {
        if self.handles(&request) {
            self.answer(request)
        } else {
            AdminFuture::Ready {
                answer: Some(not_found()),
            }
        }
    }
}

/// The public port: the API's routes as [`Admin`] says, everything else to the stack.
#[derive(Clone)]
pub(crate) struct Gate<S, Sub> {
    stack: S,
    admin: Option<Admin<Sub>>,
}

impl<S, Sub> Gate<S, Sub> {
    /// In front of `stack`, with the API's routes answered as `admin` says (without
    /// subscriptions, none: everything goes to the stack).
    pub(crate) fn new(stack: S, admin: Option<Admin<Sub>>) -> Self {
        Self { stack, admin }
    }
}

impl<S, Sub, B, ResBody> Service<Request<B>> for Gate<S, Sub>
where
    S: Service<Request<B>, Response = Response<ResBody>, Error = Infallible>,
    Sub: SubscriptionStore,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Either<ResBody, Full<Bytes>>>;
    type Error = Infallible;
    type Future = GateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.stack.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.admin.as_mut() {
            Some(admin) if admin.handles(&request) => GateFuture::Admin {
                admin: admin.answer(request),
            },
            _ => GateFuture::Stack {
                stack: self.stack.call(request),
            },
        }
    }
}

pin_project! {
    #[project = GateProj]
    pub(crate) enum GateFuture<F> {
        Stack { #[pin] stack: F },
        Admin { admin: AdminFuture },
    }
}

impl<F, ResBody> Future for GateFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, Infallible>>,
{
    type Output = Result<Response<Either<ResBody, Full<Bytes>>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GateProj::Stack { stack } => {
                let response = ready!(stack.poll(cx))?;
                Poll::Ready(Ok(response.map(Either::Left)))
            }
            GateProj::Admin { admin } => {
                let response = ready!(Pin::new(admin).poll(cx))?;
                Poll::Ready(Ok(response.map(Either::Right)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef0", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"", b"0123456789abcdef"));
    }
}
