//! Every way an API request can fail, and the one place that maps it to an HTTP status,
//! OpenAI's error `type` and a stable `code`.

use std::time::Duration;

use appliance_api::openai::{ErrorBody, ErrorDetail};
use http::StatusCode;

use crate::limits::{Denied, RateInfo};

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 400: the request is malformed or out of range.
    Invalid {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// 401: no `Authorization: Bearer` header.
    MissingKey,
    /// 401: not a key this appliance issued (or the secret does not match).
    InvalidKey,
    /// 401: a valid key past its expiry.
    ExpiredKey,
    /// 401: a revoked key.
    RevokedKey,
    /// 403: the key may not use this model.
    ModelNotAllowed(String),
    /// 404: no such model.
    ModelNotFound(String),
    /// 404: no such route.
    NoRoute(String),
    /// 405
    MethodNotAllowed,
    /// 413
    BodyTooLarge(usize),
    /// 408: the body did not arrive in time.
    BodyTimeout,
    /// 429
    RateLimited(Denied, RateInfo),
    /// 503: the model's queue is full.
    Overloaded {
        model: String,
        retry_after: Duration,
    },
    /// 503: no worker for this model is ready.
    NotReady(String),
    /// 503: every worker for this model failed for good (its file cannot be used).
    ModelFailed(String),
    /// 503: the daemon is shutting down.
    Draining,
    /// 500: the worker failed.
    Worker(String),
    /// 403: an admin key on the inference API, or an inference key on the admin API.
    WrongScope(&'static str),
    /// 409: an admin action that conflicts with the current state.
    Conflict(String),
    /// 500: an admin action failed.
    AdminFailed(String),
    /// 503: the audit record could not be written, so nothing was done.
    AuditUnavailable,
    /// 403: the policy does not allow this request (to this model).
    PolicyDenied(String),
    /// 503: the policy allows this request only to destinations that are not available.
    NoDestination(String),
    /// 502: an upstream broke off (or sent something unusable) after its answer had
    /// begun reaching the client, or answered a request it should not have refused.
    UpstreamFailed(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError::Invalid {
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::MissingKey
            | ApiError::InvalidKey
            | ApiError::ExpiredKey
            | ApiError::RevokedKey => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound(_) | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded { .. }
            | ApiError::NotReady(_)
            | ApiError::ModelFailed(_)
            | ApiError::Draining
            | ApiError::AuditUnavailable
            | ApiError::NoDestination(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Worker(_) | ApiError::AdminFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::WrongScope(_) | ApiError::PolicyDenied(_) => StatusCode::FORBIDDEN,
            ApiError::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
        }
    }

    /// Seconds for a `Retry-After` header, where one applies.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited(d, _) => {
                Some(d.retry_after().as_secs_f64().ceil().max(1.0) as u64)
            }
            ApiError::Overloaded { retry_after, .. } => Some(retry_after.as_secs().max(1)),
            ApiError::NotReady(_) => Some(5),
            ApiError::Draining => Some(10),
            ApiError::AuditUnavailable => Some(5),
            _ => None,
        }
    }

    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = match self {
            ApiError::RateLimited(_, info) => info.headers(),
            _ => Vec::new(),
        };
        if let Some(s) = self.retry_after() {
            h.push(("retry-after", s.to_string()));
        }
        if matches!(self, ApiError::MissingKey | ApiError::InvalidKey) {
            h.push(("www-authenticate", "Bearer".into()));
        }
        h
    }

    /// The stable code of the error (its OpenAI type where it has no code), for records.
    pub fn code(&self) -> String {
        let d = self.body().error;
        d.code.unwrap_or(d.kind)
    }

    pub fn body(&self) -> ErrorBody {
        let (kind, code, param, message): (&str, Option<&str>, Option<String>, String) = match self
        {
            ApiError::Invalid {
                message,
                param,
                code,
            } => (
                "invalid_request_error",
                *code,
                param.clone(),
                message.clone(),
            ),
            ApiError::MissingKey => (
                "authentication_error",
                Some("missing_api_key"),
                None,
                "No API key was given. Send it as 'Authorization: Bearer <key>'.".into(),
            ),
            ApiError::InvalidKey => (
                "authentication_error",
                Some("invalid_api_key"),
                None,
                "The API key is not valid.".into(),
            ),
            ApiError::ExpiredKey => (
                "authentication_error",
                Some("expired_api_key"),
                None,
                "The API key has expired.".into(),
            ),
            ApiError::RevokedKey => (
                "authentication_error",
                Some("revoked_api_key"),
                None,
                "The API key has been revoked.".into(),
            ),
            ApiError::ModelNotAllowed(m) => (
                "permission_error",
                Some("model_not_allowed"),
                Some("model".into()),
                format!("This API key may not use the model '{m}'."),
            ),
            ApiError::ModelNotFound(m) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".into()),
                format!("The model '{m}' does not exist."),
            ),
            ApiError::NoRoute(p) => (
                "invalid_request_error",
                Some("not_found"),
                None,
                if p.starts_with("/v1/") {
                    format!("No such endpoint: {p}. This appliance serves /v1/chat/completions, /v1/completions and /v1/models (no embeddings, files, images, audio or responses).")
                } else {
                    format!("No such endpoint: {p}")
                },
            ),
            ApiError::MethodNotAllowed => (
                "invalid_request_error",
                Some("method_not_allowed"),
                None,
                "This endpoint does not accept this method.".into(),
            ),
            ApiError::BodyTooLarge(limit) => (
                "invalid_request_error",
                Some("request_too_large"),
                None,
                format!("The request body is larger than the limit of {limit} bytes."),
            ),
            ApiError::BodyTimeout => (
                "invalid_request_error",
                Some("request_timeout"),
                None,
                "The request body did not arrive in time.".into(),
            ),
            ApiError::RateLimited(d, _) => {
                let (code, message) = match d {
                    Denied::Concurrency { limit } => (
                        "concurrency_limit_exceeded",
                        format!(
                            "This API key already has {limit} request(s) in progress, its limit."
                        ),
                    ),
                    Denied::Requests { limit, .. } => (
                        "rate_limit_exceeded",
                        format!(
                            "Rate limit reached: {limit} requests per minute for this API key."
                        ),
                    ),
                    Denied::Tokens { limit, .. } => (
                        "tokens_limit_exceeded",
                        format!("Rate limit reached: {limit} tokens per minute for this API key."),
                    ),
                };
                ("rate_limit_error", Some(code), None, message)
            }
            ApiError::Overloaded { model, .. } => (
                "server_error",
                Some("overloaded"),
                None,
                format!("The model '{model}' has too many queued requests; try again shortly."),
            ),
            ApiError::NotReady(m) => (
                "server_error",
                Some("model_not_ready"),
                None,
                format!("The model '{m}' is not ready; try again shortly."),
            ),
            ApiError::ModelFailed(m) => (
                "server_error",
                Some("model_failed"),
                None,
                format!("The model '{m}' cannot be served: its file could not be loaded. An administrator must replace it."),
            ),
            ApiError::Draining => (
                "server_error",
                Some("shutting_down"),
                None,
                "The appliance is shutting down; try again shortly.".into(),
            ),
            ApiError::PolicyDenied(m) => (
                "permission_error",
                Some("policy_denied"),
                None,
                m.clone(),
            ),
            ApiError::NoDestination(m) => (
                "server_error",
                Some("no_allowed_destination"),
                None,
                m.clone(),
            ),
            ApiError::UpstreamFailed(m) => (
                "server_error",
                Some("upstream_failed"),
                None,
                m.clone(),
            ),
            ApiError::AuditUnavailable => (
                "server_error",
                Some("audit_unavailable"),
                None,
                "The audit log cannot be written right now, so the request was refused and nothing was done; try again shortly.".into(),
            ),
            ApiError::Worker(m) => (
                "server_error",
                Some("worker_error"),
                None,
                format!("The model worker failed: {m}"),
            ),
            ApiError::WrongScope(m) => (
                "permission_error",
                Some("wrong_key_scope"),
                None,
                m.to_string(),
            ),
            ApiError::Conflict(m) => ("invalid_request_error", Some("conflict"), None, m.clone()),
            ApiError::AdminFailed(m) => {
                ("server_error", Some("admin_action_failed"), None, m.clone())
            }
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: kind.into(),
                param,
                code: code.map(str::to_string),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_types() {
        let cases = [
            (
                ApiError::invalid("x", Some("n")),
                400,
                "invalid_request_error",
            ),
            (ApiError::ExpiredKey, 401, "authentication_error"),
            (
                ApiError::ModelNotAllowed("m".into()),
                403,
                "permission_error",
            ),
            (
                ApiError::ModelNotFound("m".into()),
                404,
                "invalid_request_error",
            ),
            (ApiError::BodyTooLarge(10), 413, "invalid_request_error"),
            (
                ApiError::RateLimited(Denied::Concurrency { limit: 1 }, RateInfo::default()),
                429,
                "rate_limit_error",
            ),
            (ApiError::Draining, 503, "server_error"),
        ];
        for (e, status, kind) in cases {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.body().error.kind, kind, "{e:?}");
        }
        let h = ApiError::RateLimited(
            Denied::Requests {
                limit: 1,
                retry_after: Duration::from_millis(59_100),
            },
            RateInfo::default(),
        )
        .headers();
        assert!(h.contains(&("retry-after", "60".into())));
    }
}
