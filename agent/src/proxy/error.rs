//! Errors the proxy answers itself: a status, a stable `x-vmesh-error` code and a short body;
//! for gRPC callers a trailers-only response with `grpc-status`, as gRPC clients expect.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use super::complete::Completion;

pub static X_VMESH_ERROR: http::HeaderName = http::HeaderName::from_static("x-vmesh-error");

/// A failure of the proxy itself, with its stable code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// No endpoint accepted a TCP connection.
    ConnectFailed,
    /// The upstream closed or reset the connection before a response.
    Reset,
    /// The cluster has no endpoint to send to.
    NoHealthyEndpoint,
    /// The upstream did not answer within the route's timeout.
    Timeout,
    /// The shared outbound port got a `Host` that names no configured service.
    UnknownService,
    /// The request is malformed (e.g. no usable authority or path).
    BadRequest,
    /// A request body was larger than allowed while being buffered, or failed to arrive.
    BodyError,
    /// The service's circuit breaker is open (or half-open with its probes taken).
    CircuitOpen,
    /// The service's breaker limits (`max_requests`, `max_pending_requests`) are reached.
    CircuitFull,
    /// A new upstream connection was needed and `max_pending_requests` were already dialling.
    CircuitPending,
    /// A rate limit refused the request.
    RateLimited,
    /// The inbound adaptive concurrency limit shed the request.
    Overloaded,
    /// An inbound authorization rule refused the caller (or it has no identity).
    UnauthorizedCaller,
    /// The upstream's certificate names another service than the one asked for.
    IdentityMismatch,
    /// The client did not send the whole request body within `proxy.request_body_timeout`.
    RequestBodyTimeout,
    /// `proxy.max_requests_in_flight` requests were already in progress on this agent.
    AgentOverloaded,
}

impl ProxyError {
    pub fn code(self) -> &'static str {
        match self {
            Self::ConnectFailed => "UPSTREAM_CONNECT_FAILED",
            Self::Reset => "UPSTREAM_RESET",
            Self::NoHealthyEndpoint => "NO_HEALTHY_ENDPOINT",
            Self::Timeout => "UPSTREAM_TIMEOUT",
            Self::UnknownService => "UNKNOWN_SERVICE",
            Self::BadRequest => "BAD_REQUEST",
            Self::BodyError => "REQUEST_BODY_ERROR",
            Self::CircuitOpen => "CIRCUIT_OPEN",
            Self::CircuitFull => "CIRCUIT_MAX_REQUESTS",
            Self::CircuitPending => "CIRCUIT_MAX_PENDING",
            Self::RateLimited => "RATE_LIMITED",
            Self::Overloaded => "OVERLOADED",
            Self::UnauthorizedCaller => crate::governance::authz::UNAUTHORIZED_CALLER,
            Self::IdentityMismatch => crate::tls::UPSTREAM_IDENTITY_MISMATCH,
            Self::RequestBodyTimeout => "REQUEST_BODY_TIMEOUT",
            Self::AgentOverloaded => "AGENT_OVERLOADED",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::ConnectFailed | Self::Reset | Self::IdentityMismatch => StatusCode::BAD_GATEWAY,
            Self::UnauthorizedCaller => StatusCode::FORBIDDEN,
            Self::NoHealthyEndpoint
            | Self::CircuitOpen
            | Self::CircuitFull
            | Self::CircuitPending
            | Self::Overloaded
            | Self::AgentOverloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UnknownService => StatusCode::NOT_FOUND,
            Self::BadRequest | Self::BodyError => StatusCode::BAD_REQUEST,
        }
    }

    /// The gRPC status code for this error (UNAVAILABLE, DEADLINE_EXCEEDED, ...).
    fn grpc_status(self) -> &'static str {
        match self {
            Self::ConnectFailed
            | Self::Reset
            | Self::NoHealthyEndpoint
            | Self::CircuitOpen
            | Self::CircuitFull
            | Self::CircuitPending
            | Self::Overloaded
            | Self::AgentOverloaded
            | Self::IdentityMismatch => "14",
            Self::RequestBodyTimeout => "4",
            Self::UnauthorizedCaller => "7",
            Self::RateLimited => "8",
            Self::Timeout => "4",
            Self::UnknownService => "12",
            Self::BadRequest | Self::BodyError => "13",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::ConnectFailed => "upstream connect failed",
            Self::Reset => "upstream reset the connection before a response",
            Self::NoHealthyEndpoint => "no healthy endpoint",
            Self::Timeout => "upstream timed out",
            Self::UnknownService => "unknown service",
            Self::BadRequest => "bad request",
            Self::BodyError => "request body could not be read",
            Self::CircuitOpen => "circuit open: the service is failing, requests are refused for a while",
            Self::CircuitFull => "circuit breaker limit reached: too many requests in flight",
            Self::CircuitPending => "circuit breaker limit reached: too many requests waiting for a connection",
            Self::RateLimited => "rate limit exceeded",
            Self::Overloaded => "overloaded: the adaptive concurrency limit shed this request",
            Self::UnauthorizedCaller => "the caller's identity is not allowed to make this request",
            Self::IdentityMismatch => "the upstream's certificate does not name the service asked for",
            Self::RequestBodyTimeout => "the request body did not arrive in time",
            Self::AgentOverloaded => "overloaded: too many requests in progress on this agent",
        }
    }

    /// The response for this error; `grpc` answers in gRPC's trailers-only form.
    pub fn response(self, grpc: bool, completion: Option<Completion>) -> Response<ResponseBody> {
        let code = HeaderValue::from_static(self.code());
        if grpc {
            let mut r = Response::new(ResponseBody::full(Bytes::new(), completion));
            let h = r.headers_mut();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from_static(self.grpc_status()));
            h.insert("grpc-message", HeaderValue::from_static(self.code()));
            h.insert(X_VMESH_ERROR.clone(), code);
            return r;
        }
        let body = Bytes::from(format!("{}: {}\n", self.code(), self.message()));
        let mut r = Response::new(ResponseBody::full(body, completion));
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(X_VMESH_ERROR.clone(), code);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_grpc_forms() {
        let r = ProxyError::Timeout.response(false, None);
        assert_eq!(r.status(), 504);
        assert_eq!(r.headers()["x-vmesh-error"], "UPSTREAM_TIMEOUT");
        let g = ProxyError::ConnectFailed.response(true, None);
        assert_eq!(g.status(), 200);
        assert_eq!(g.headers()["grpc-status"], "14");
        assert_eq!(ProxyError::NoHealthyEndpoint.status(), 503);
    }
}
