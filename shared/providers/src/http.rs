//! The HTTP policy shared by the provider clients: retry 408/409/429/5xx and transport
//! errors with jittered exponential backoff, honour `retry-after-ms` / `retry-after` (up to a
//! cap; longer waits are not retried) and `x-should-retry`, never retry `insufficient_quota`,
//! a timeout on every call. A call that creates something (a batch) is never retried blindly:
//! only failures that prove nothing happened are retried, any other comes back as
//! [`ProviderError::Unconfirmed`] for the caller to reconcile. Error messages never carry the
//! request's headers (the API key).

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use reqwest::{RequestBuilder, Response};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;

use super::ProviderError;
use rowsmith_store::Store;

/// Calls to one provider.
#[derive(Debug, Clone)]
pub struct Http {
    pub name: String,
    pub client: reqwest::Client,
    /// Tries per call, the first included.
    pub max_tries: u32,
    /// The longest `retry-after` that is waited out; longer ones fail the call.
    pub max_retry_after: Duration,
    /// First backoff step; doubles per try, capped at 8 s.
    pub base_backoff: Duration,
    /// Redirects are not followed but answered to the caller (an upload that hands out a
    /// presigned URL in `Location`).
    pub pass_redirects: bool,
}

impl Http {
    pub fn new(
        name: &str,
        timeout: Duration,
        max_retry_after: Duration,
    ) -> Result<Self, ProviderError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ProviderError::Transport {
                provider: name.into(),
                operation: "client set-up",
                source: e.into(),
            })?;
        Ok(Self {
            name: name.into(),
            client,
            max_tries: 5,
            max_retry_after,
            base_backoff: Duration::from_millis(500),
            pass_redirects: false,
        })
    }

    /// The same policy with a client that does not follow redirects: a 3xx comes back to the
    /// caller as an answer.
    pub fn passing_redirects(mut self, timeout: Duration) -> Result<Self, ProviderError> {
        self.client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ProviderError::Transport {
                provider: self.name.clone(),
                operation: "client set-up",
                source: e.into(),
            })?;
        self.pass_redirects = true;
        Ok(self)
    }

    /// Sends the request `build` makes, retrying as the policy says.
    pub async fn send(
        &self,
        operation: &'static str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, ProviderError> {
        self.send_as(operation, Repeat::Safe, build).await
    }

    /// Sends a request that must not take effect twice (creating a batch). Only a failure that
    /// proves the request was not acted on is retried: the connection could not be made, or a
    /// 429 rate limit. Any other failure (a timeout, a dropped connection, a 5xx) may have
    /// taken effect and is returned as [`ProviderError::Unconfirmed`].
    pub async fn send_unrepeatable(
        &self,
        operation: &'static str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, ProviderError> {
        self.send_as(operation, Repeat::OnlyIfNotActedOn, build)
            .await
            .map_err(ProviderError::unconfirmed)
    }

    async fn send_as(
        &self,
        operation: &'static str,
        repeat: Repeat,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, ProviderError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let started = std::time::Instant::now();
            let sent = build().send().await;
            let status_label = match &sent {
                Ok(response) => response.status().as_u16().to_string(),
                Err(_) => "transport".to_owned(),
            };
            metrics::histogram!("rowsmith_provider_request_seconds", "provider" => self.name.clone(), "operation" => operation)
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("rowsmith_provider_requests_total", "provider" => self.name.clone(), "operation" => operation, "status" => status_label)
                .increment(1);
            let (error, should_retry, wait, not_acted_on) = match sent {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) if self.pass_redirects && response.status().is_redirection() => {
                    return Ok(response);
                }
                Ok(response) => {
                    let status = response.status().as_u16();
                    let header = |name: &str| header(&response, name);
                    let should_retry = header("x-should-retry").map(|v| v == "true");
                    let wait = retry_after(
                        header("retry-after-ms").as_deref(),
                        header("retry-after").as_deref(),
                    );
                    // AWS names the error's type in a header (`ValidationException`…).
                    let aws_type = header("x-amzn-errortype");
                    let mut message = error_message(&response.text().await.unwrap_or_default());
                    if let Some(kind) = aws_type {
                        let kind = kind.split(':').next().unwrap_or_default();
                        message = format!("{message} ({kind})");
                    }
                    let error = ProviderError::Http {
                        provider: self.name.clone(),
                        operation,
                        status,
                        message,
                    };
                    (error, should_retry, wait, status == 429)
                }
                Err(error) => {
                    let not_acted_on = error.is_connect();
                    let error = ProviderError::Transport {
                        provider: self.name.clone(),
                        operation,
                        source: error.without_url().into(),
                    };
                    (error, None, None, not_acted_on)
                }
            };
            let retry = should_retry.unwrap_or_else(|| error.is_retryable())
                && (repeat == Repeat::Safe || not_acted_on);
            let wait_too_long = wait.is_some_and(|w| w > self.max_retry_after);
            if !retry || wait_too_long || tries >= self.max_tries {
                return Err(error);
            }
            let backoff = self
                .base_backoff
                .saturating_mul(2u32.saturating_pow(tries - 1))
                .min(Duration::from_secs(8));
            let jitter = 1.0 - 0.25 * rand::random::<f64>();
            let wait = wait.unwrap_or_else(|| backoff.mul_f64(jitter));
            tracing::warn!(provider = %self.name, operation, tries, %error, ?wait, "provider call failed, retrying");
            tokio::time::sleep(wait).await;
        }
    }

    pub async fn bytes(
        &self,
        operation: &'static str,
        response: Response,
    ) -> Result<Bytes, ProviderError> {
        response
            .bytes()
            .await
            .map_err(|e| ProviderError::Transport {
                provider: self.name.clone(),
                operation,
                source: e.without_url().into(),
            })
    }

    /// Writes a response's body to object `key` as it arrives, so no more than a part of it
    /// is held in memory; a body cut off leaves `key` as it was (a transport error, to be
    /// tried again). Returns the bytes written.
    pub async fn download_to(
        &self,
        operation: &'static str,
        response: Response,
        store: &Store,
        key: &str,
    ) -> Result<u64, ProviderError> {
        let name = self.name.clone();
        write_stream(store, key, response.bytes_stream(), |error| {
            ProviderError::Transport {
                provider: name.clone(),
                operation,
                source: error.without_url().into(),
            }
        })
        .await
    }

    /// A call that creates something: sent once (see `send_unrepeatable`) and its answer read
    /// as `T`; an answer that cannot be read may still stand for a created object, so that
    /// failure is unconfirmed too.
    pub async fn create<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<T, ProviderError> {
        let response = self.send_unrepeatable(operation, build).await?;
        self.json(operation, response)
            .await
            .map_err(ProviderError::unconfirmed)
    }

    pub async fn json<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        response: Response,
    ) -> Result<T, ProviderError> {
        let bytes = self.bytes(operation, response).await?;
        serde_json::from_slice(&bytes).map_err(|e| ProviderError::Decode {
            provider: self.name.clone(),
            operation,
            source: e.into(),
        })
    }
}

/// One provider's API at a base URL with its key: every call refuses to go out without the
/// key, carries it the provider's way (`authorize`), and follows the [`Http`] policy.
#[derive(Clone)]
pub struct Endpoint {
    pub base_url: String,
    api_key: Option<SecretString>,
    pub http: Http,
    authorize: fn(RequestBuilder, &str) -> RequestBuilder,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("provider", &self.http.name)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl Endpoint {
    pub fn new(
        http: Http,
        base_url: &str,
        api_key: Option<SecretString>,
        authorize: fn(RequestBuilder, &str) -> RequestBuilder,
    ) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            http,
            authorize,
        }
    }

    /// The same endpoint with the key sent another way.
    pub fn authorized_by(mut self, authorize: fn(RequestBuilder, &str) -> RequestBuilder) -> Self {
        self.authorize = authorize;
        self
    }

    pub fn has_key(&self) -> bool {
        self.api_key.is_some()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn authorized(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.api_key {
            Some(key) => (self.authorize)(request, key.expose_secret()),
            None => request,
        }
    }

    fn require_key(&self) -> Result<(), ProviderError> {
        super::require_key(&self.http.name, &self.api_key)
    }

    /// A call that may be repeated (see [`Http::send`]).
    pub async fn send(
        &self,
        operation: &'static str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, ProviderError> {
        self.require_key()?;
        self.http
            .send(operation, || self.authorized(build(&self.http.client)))
            .await
    }

    /// A call whose effect must not happen twice (see [`Http::send_unrepeatable`]).
    pub async fn send_unrepeatable(
        &self,
        operation: &'static str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, ProviderError> {
        self.require_key()?;
        self.http
            .send_unrepeatable(operation, || self.authorized(build(&self.http.client)))
            .await
    }

    /// A call that creates something (see [`Http::create`]).
    pub async fn create<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<T, ProviderError> {
        self.require_key()?;
        self.http
            .create(operation, || self.authorized(build(&self.http.client)))
            .await
    }
}

/// Writes `chunks` to object `key` as they come; a failed chunk (`failed` says how to report
/// it) or write leaves `key` as it was. Returns the bytes written.
pub async fn write_stream<E>(
    store: &Store,
    key: &str,
    chunks: impl futures::Stream<Item = Result<Bytes, E>>,
    failed: impl Fn(E) -> ProviderError,
) -> Result<u64, ProviderError> {
    let mut writer = store.writer(key)?;
    let mut chunks = std::pin::pin!(chunks);
    let mut written = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => {
                writer.abort().await;
                return Err(failed(error));
            }
        };
        if let Err(error) = writer.write(&chunk).await {
            writer.abort().await;
            return Err(error.into());
        }
        written += chunk.len() as u64;
    }
    writer.finish().await?;
    Ok(written)
}

/// Whether a call may be sent again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Reading, or an effect that is the same when repeated.
    Safe,
    /// An effect that must not happen twice: repeat only when the failure proves it did not
    /// happen.
    OnlyIfNotActedOn,
}

/// A response header's value, when it is there and text.
pub fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The wait a response asks for: `retry-after-ms`, else `retry-after` in seconds.
pub fn retry_after(retry_after_ms: Option<&str>, retry_after: Option<&str>) -> Option<Duration> {
    if let Some(ms) = retry_after_ms.and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    retry_after
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|secs| Duration::from_secs_f64(secs.max(0.0)))
}

/// The error's message (and code or type) from an OpenAI or Anthropic error body, or the body
/// itself, shortened.
pub fn error_message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let field = |pointer: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.pointer(pointer))
            .and_then(|m| m.as_str())
            .map(str::to_owned)
    };
    let message = field("/error/message")
        .or_else(|| field("/error"))
        .or_else(|| field("/message"))
        .or_else(|| field("/Message"))
        .unwrap_or_else(|| body.to_owned());
    let code = field("/error/code")
        .or_else(|| field("/error/type"))
        .or_else(|| field("/error/status"))
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    let mut text = format!("{message}{code}");
    if text.len() > 500 {
        let cut = (0..=500)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_prefers_milliseconds() {
        assert_eq!(
            retry_after(Some("250"), Some("3")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            retry_after(None, Some("1.5")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(retry_after(None, None), None);
    }

    #[test]
    fn error_messages_name_the_code() {
        let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
        assert_eq!(
            error_message(quota),
            "You exceeded your current quota (insufficient_quota)"
        );
        let anthropic =
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(error_message(anthropic), "Overloaded (overloaded_error)");
        // Together's batch endpoints: a plain string; AWS: a bare `message`.
        assert_eq!(
            error_message(r#"{"error":"batch not found"}"#),
            "batch not found"
        );
        assert_eq!(
            error_message(r#"{"message":"Invalid jobName"}"#),
            "Invalid jobName"
        );
    }
}
