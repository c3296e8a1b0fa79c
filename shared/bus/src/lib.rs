//! The JetStream bus: connection, the topology every service ensures at start-up, publishing
//! with `Nats-Msg-Id`, compare-and-set updates of KV records, and the worker loop that turns
//! a handler's [`Outcome`] into ack, delayed NAK or terminate; what a failed step does
//! ([`step`]) and the job's lifecycle over KV ([`lifecycle`]: stop, suspend, resume, cancel).

pub mod lifecycle;
pub mod step;
mod trace;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, kv, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use rowsmith_config::NatsSettings;
use rowsmith_contract::events::Event;
use rowsmith_contract::messages::subjects;
use rowsmith_contract::records::BUCKET;

/// The cause kept whole in a [`BusError`], whatever layer it came from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const WORK_STREAM: &str = "ROWSMITH_WORK";
/// How long a starting service waits for NATS.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(120);
pub const EVENTS_STREAM: &str = "ROWSMITH_EVENTS";

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("NATS credentials or TLS files could not be used: {0}")]
    Auth(String),
    #[error("JetStream set-up failed ({what}): {source}")]
    Topology {
        what: String,
        #[source]
        source: BoxError,
    },
    #[error("publish to {subject} failed: {source}")]
    Publish {
        subject: String,
        #[source]
        source: BoxError,
    },
    #[error("KV {op} of {key} failed: {source}")]
    Kv {
        op: &'static str,
        key: String,
        #[source]
        source: BoxError,
    },
    #[error("KV record {key} is not valid JSON for its type: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("KV record {key} not found")]
    NotFound { key: String },
}

impl BusError {
    /// The server refused the credentials.
    pub fn is_authorization(&self) -> bool {
        matches!(self, BusError::Connect { source, .. }
            if source.kind() == async_nats::ConnectErrorKind::AuthorizationViolation)
    }

    fn topology(what: impl Into<String>, error: impl Into<BoxError>) -> Self {
        BusError::Topology {
            what: what.into(),
            source: error.into(),
        }
    }
}

/// Connection options carrying the configured authentication and TLS.
async fn connect_options(settings: &NatsSettings) -> Result<async_nats::ConnectOptions, BusError> {
    use secrecy::ExposeSecret;
    let mut options = match &settings.creds_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| BusError::Auth(format!("creds file {}: {e}", path.display())))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), password.expose_secret().to_owned());
    }
    if let Some(token) = &settings.token {
        options = options.token(token.expose_secret().to_owned());
    }
    if let Some(path) = &settings.nkey_seed_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| BusError::Auth(format!("nkey seed file {}: {e}", path.display())))?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let Some(ca) = &settings.tls_ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if settings.tls_required {
        options = options.require_tls(true);
    }
    // With server permissions, each user gets its own inbox space (`_INBOX_<user>.>`).
    match (&settings.inbox_prefix, &settings.user) {
        (Some(prefix), _) => options = options.custom_inbox_prefix(prefix),
        (None, Some(user)) => options = options.custom_inbox_prefix(format!("_INBOX_{user}")),
        (None, None) => {}
    }
    Ok(options.event_callback(|event| async move {
        match event {
            // A publish or subscribe the server's permissions refuse arrives only this way.
            async_nats::Event::ServerError(error) => {
                tracing::error!(%error, "NATS server error (permissions or authorization)");
            }
            event => tracing::info!(%event, "nats connection event"),
        }
    }))
}

/// `nats.url` as the list of servers it names: one URL, or several separated by commas (the
/// nodes of a cluster; the client then also learns the others from the server).
fn server_urls(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// A plain client for health probes: connects in the background and keeps trying, so a
/// probe can report NATS as down instead of the process failing to start.
pub async fn probe_client(
    settings: &NatsSettings,
    name: &str,
) -> Result<async_nats::Client, BusError> {
    connect_options(settings)
        .await?
        .name(name)
        .retry_on_initial_connect()
        .connect(server_urls(&settings.url))
        .await
        .map_err(|source| BusError::Connect {
            url: settings.url.clone(),
            source,
        })
}

/// A connection to NATS with the JetStream context and the jobs KV bucket.
#[derive(Debug, Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub kv: kv::Store,
}

/// A work consumer's settings; each service has one durable on the work stream.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub durable: &'static str,
    pub filter_subject: &'static str,
    pub ack_wait: Duration,
    /// `-1` for unlimited. The consumer is created with one delivery more, which is never
    /// handled: it records the dead letter of a handler that did not return
    /// ([`Delivery::exhausted`]).
    pub max_deliver: i64,
    pub max_ack_pending: i64,
}

/// Whether a KV write happened or the record was already as wanted.
#[derive(Debug)]
pub enum Cas<R> {
    /// Write the changed record, then return the value.
    Write(R),
    /// Leave the record as it is and return the value.
    Keep(R),
}

impl Bus {
    /// Connects and ensures the streams and the KV bucket exist.
    pub async fn connect(settings: &NatsSettings, name: &str) -> Result<Self, BusError> {
        let client = connect_options(settings)
            .await?
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(settings.request_timeout))
            .connect(server_urls(&settings.url))
            .await
            .map_err(|source| BusError::Connect {
                url: settings.url.clone(),
                source,
            })?;
        let js = jetstream::new(client.clone());
        let kv = ensure_topology(&js, settings).await?;
        Ok(Self { client, js, kv })
    }

    /// Connects like [`Bus::connect`], trying again every second while NATS is unreachable
    /// (a service may start before NATS, or during its restart) until `shutdown` or `patience`.
    pub async fn connect_retrying(
        settings: &NatsSettings,
        name: &str,
        shutdown: &CancellationToken,
        patience: Duration,
    ) -> Result<Self, BusError> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match Self::connect(settings, name).await {
                Ok(bus) => return Ok(bus),
                // Wrong credentials do not fix themselves: fail at once.
                Err(error @ BusError::Connect { .. }) if error.is_authorization() => {
                    return Err(error);
                }
                Err(error)
                    if tokio::time::Instant::now() < deadline && !shutdown.is_cancelled() =>
                {
                    tracing::warn!(%error, "NATS not ready, trying again in 1s");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(error),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Creates or updates a service's durable pull consumer on the work stream.
    pub async fn work_consumer(
        &self,
        spec: &ConsumerSpec,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
        let stream = self
            .js
            .get_stream(WORK_STREAM)
            .await
            .map_err(|e| BusError::topology(WORK_STREAM, e))?;
        stream
            .create_consumer(pull::Config {
                durable_name: Some(spec.durable.to_owned()),
                filter_subject: spec.filter_subject.to_owned(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: spec.ack_wait,
                max_deliver: match spec.max_deliver {
                    counted if counted > 0 => counted + 1,
                    unlimited => unlimited,
                },
                max_ack_pending: spec.max_ack_pending,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::topology(format!("consumer {}", spec.durable), e))
    }

    /// Publishes `payload` as JSON with `Nats-Msg-Id = msg_id` and waits for the stream's
    /// ack; a timed-out publish is retried with the same id, so the stream keeps one copy.
    pub async fn publish<T: Serialize>(
        &self,
        subject: &str,
        msg_id: &str,
        payload: &T,
    ) -> Result<(), BusError> {
        self.publish_once(subject, msg_id, payload).await.map(drop)
    }

    /// Like [`Bus::publish`]; `Ok(false)` when the stream had a message of that id already
    /// (within its duplicate window) and dropped this one.
    pub async fn publish_once<T: Serialize>(
        &self,
        subject: &str,
        msg_id: &str,
        payload: &T,
    ) -> Result<bool, BusError> {
        let body = Bytes::from(serde_json::to_vec(payload).map_err(|e| BusError::Publish {
            subject: subject.into(),
            source: e.into(),
        })?);
        let mut last_error: BoxError = "no publish attempt made".into();
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            let mut headers = async_nats::HeaderMap::new();
            crate::trace::inject_context(&mut headers);
            let message = jetstream::message::PublishMessage::build()
                .payload(body.clone())
                .headers(headers)
                .message_id(msg_id);
            match self.js.send_publish(subject.to_owned(), message).await {
                Ok(ack) => match ack.await {
                    // A retry of a publish whose ack was lost is a duplicate of our own.
                    Ok(ack) => return Ok(!ack.duplicate || attempt > 0),
                    Err(error) => last_error = error.into(),
                },
                Err(error) => last_error = error.into(),
            }
            tracing::warn!(subject, msg_id, attempt, error = %last_error, "publish not acknowledged, retrying");
        }
        Err(BusError::Publish {
            subject: subject.into(),
            source: last_error,
        })
    }

    /// Publishes an event; an event that cannot be published is logged, never fatal.
    pub async fn emit(&self, event: &Event) {
        let id = format!("{}.{}.{}", event.job_id, event.kind.as_str(), nuid::next());
        if let Err(error) = self.publish(&event.subject(), &id, event).await {
            tracing::warn!(job_id = %event.job_id, kind = event.kind.as_str(), %error, "event not published");
        }
    }

    /// Reads a record and its revision.
    pub async fn read<T: DeserializeOwned>(&self, key: &str) -> Result<Option<(T, u64)>, BusError> {
        let entry = self.kv.entry(key).await.map_err(|e| BusError::Kv {
            op: "read",
            key: key.into(),
            source: e.into(),
        })?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let value =
                    serde_json::from_slice(&entry.value).map_err(|source| BusError::Decode {
                        key: key.into(),
                        source,
                    })?;
                Ok(Some((value, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Creates a record; `Ok(false)` when the key already exists.
    pub async fn create<T: Serialize>(&self, key: &str, value: &T) -> Result<bool, BusError> {
        let body = serde_json::to_vec(value).map_err(|e| BusError::Kv {
            op: "create",
            key: key.into(),
            source: e.into(),
        })?;
        match self.kv.create(key, body.into()).await {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(error) => Err(BusError::Kv {
                op: "create",
                key: key.into(),
                source: error.into(),
            }),
        }
    }

    /// Read-decide-write with compare-and-set on the revision: `decide` sees the current
    /// record, changes it in place and says whether to write; a lost race re-reads and
    /// decides again, so `decide` must be re-runnable.
    pub async fn modify<T, R, E>(
        &self,
        key: &str,
        mut decide: impl FnMut(&mut T) -> Result<Cas<R>, E>,
    ) -> Result<R, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<BusError>,
    {
        loop {
            let (mut record, revision) = self
                .read::<T>(key)
                .await?
                .ok_or_else(|| BusError::NotFound { key: key.into() })?;
            let result = match decide(&mut record)? {
                Cas::Keep(result) => return Ok(result),
                Cas::Write(result) => result,
            };
            let body = serde_json::to_vec(&record).map_err(|e| BusError::Kv {
                op: "update",
                key: key.into(),
                source: e.into(),
            })?;
            match self.kv.update(key, body.into(), revision).await {
                Ok(_) => return Ok(result),
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    let jitter = rand::random_range(1..20);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(error) => {
                    return Err(BusError::Kv {
                        op: "update",
                        key: key.into(),
                        source: error.into(),
                    }
                    .into());
                }
            }
        }
    }

    /// Overwrites a record without a revision check (for records one writer owns).
    pub async fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), BusError> {
        let body = serde_json::to_vec(value).map_err(|e| BusError::Kv {
            op: "put",
            key: key.into(),
            source: e.into(),
        })?;
        self.kv
            .put(key, body.into())
            .await
            .map(|_| ())
            .map_err(|e| BusError::Kv {
                op: "put",
                key: key.into(),
                source: e.into(),
            })
    }

    /// Every key under `prefix` (e.g. `job.`).
    pub async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, BusError> {
        let kv_error = |e: BoxError| BusError::Kv {
            op: "keys",
            key: prefix.into(),
            source: e,
        };
        let mut keys = self.kv.keys().await.map_err(|e| kv_error(e.into()))?;
        let mut found = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| kv_error(e.into()))?;
            if key.starts_with(prefix) {
                found.push(key);
            }
        }
        found.sort();
        Ok(found)
    }
}

/// The streams and the KV bucket: created or updated (`nats.ensure_topology`, the default),
/// else only looked up, failing clearly when a set-up step has not made them.
async fn ensure_topology(
    js: &jetstream::Context,
    settings: &NatsSettings,
) -> Result<kv::Store, BusError> {
    if !settings.ensure_topology {
        for name in [WORK_STREAM, EVENTS_STREAM] {
            js.get_stream(name).await.map_err(|e| {
                BusError::topology(
                    name,
                    format!(
                        "{e}; with nats.ensure_topology = false the streams must exist: run \
                         `rowsmith setup` once as a user allowed to create them"
                    ),
                )
            })?;
        }
        return js.get_key_value(BUCKET).await.map_err(|e| {
            BusError::topology(
                format!("KV bucket {BUCKET}"),
                format!("{e}; run `rowsmith setup` once"),
            )
        });
    }
    let replicas = settings.replicas.max(1);
    js.create_or_update_stream(stream::Config {
        name: WORK_STREAM.into(),
        description: Some("rowsmith work: jobs, shards, batches".into()),
        subjects: vec![
            subjects::JOBS_SUBMIT.into(),
            subjects::SHARDS_READY.into(),
            subjects::BATCHES_SUBMITTED.into(),
            subjects::BATCHES_ENDED.into(),
            subjects::JOBS_RESUME.into(),
            subjects::JOBS_SUSPENDED.into(),
        ],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    })
    .await
    .map_err(|e| BusError::topology(WORK_STREAM, e))?;
    js.create_or_update_stream(stream::Config {
        name: EVENTS_STREAM.into(),
        description: Some("rowsmith job events".into()),
        subjects: vec![format!("{}.>", subjects::EVENTS_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(7 * 24 * 3600),
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| BusError::topology(EVENTS_STREAM, e))?;
    if let Ok(store) = js.get_key_value(BUCKET).await {
        ensure_bucket_replicas(js, replicas).await?;
        return Ok(store);
    }
    let config = kv::Config {
        bucket: BUCKET.into(),
        description: "rowsmith job and shard records".into(),
        history: 5,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another service created it at the same moment.
        Err(create_error) => js
            .get_key_value(BUCKET)
            .await
            .map_err(|_| BusError::topology(format!("KV bucket {BUCKET}"), create_error)),
    }
}

/// Gives an existing KV bucket the configured replica count (a bucket first made with one
/// replica would otherwise keep every job's state on one node).
async fn ensure_bucket_replicas(js: &jetstream::Context, replicas: usize) -> Result<(), BusError> {
    let name = format!("KV_{BUCKET}");
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| BusError::topology(format!("KV bucket {BUCKET}"), e))?;
    let mut config = stream
        .info()
        .await
        .map_err(|e| BusError::topology(format!("KV bucket {BUCKET}"), e))?
        .config
        .clone();
    if config.num_replicas == replicas {
        return Ok(());
    }
    tracing::info!(
        bucket = BUCKET,
        from = config.num_replicas,
        to = replicas,
        "changing the KV bucket's replicas"
    );
    config.num_replicas = replicas;
    js.update_stream(&config)
        .await
        .map(drop)
        .map_err(|e| BusError::topology(format!("KV bucket {BUCKET} replicas"), e))
}

/// What a handler decided about one message; only the worker loop acks.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done (or nothing left to do): ack.
    Done,
    /// Not now: NAK with this delay.
    Retry { after: Duration },
    /// Never: terminate the message (poison, or dead letter already recorded).
    Terminate { reason: String },
}

/// One delivered message, decoded of its transport.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    pub payload: Bytes,
    /// 1-based delivery count.
    pub delivered: i64,
    /// Whether this is the last delivery a handler gets.
    pub last: bool,
    /// Past the last counted delivery: the handler of the last one never returned (killed,
    /// out of memory). Not to be handled; see `lifecycle::dead_letter`.
    pub exhausted: bool,
    /// The message's sequence in the work stream: the same on every redelivery, so a
    /// handler can derive a stable name from it (0 when unknown, as in unit tests).
    pub stream_sequence: u64,
}

/// Decodes a JSON payload; `Err` carries the reason a message is poison.
pub fn decode<T: DeserializeOwned>(delivery: &Delivery) -> Result<T, String> {
    serde_json::from_slice(&delivery.payload)
        .map_err(|error| format!("undecodable message on {}: {error}", delivery.subject))
}

/// Backoff for transient handler errors: 1 s, 2 s, 4 s … capped at 30 s.
pub fn retry_delay(delivered: i64) -> Duration {
    let exponent = u32::try_from(delivered.clamp(1, 6) - 1).unwrap_or(0);
    Duration::from_secs(2u64.pow(exponent)).min(Duration::from_secs(30))
}

/// How long one pull waits for a first message.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Pulls from `consumer` until `shutdown`, handling at most `concurrency` messages at once.
///
/// It never asks for more messages than it has free permits, so no delivered message waits
/// in a client buffer while its `ack_wait` runs; and while a handler works it sends an
/// in-progress ack every third of `ack_wait`, so a slow handler is not handed to a second
/// worker. On shutdown it stops pulling, releases (NAKs) what it had pulled but not started,
/// and waits for the messages in flight.
pub async fn run_worker<H, Fut>(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    spec: ConsumerSpec,
    concurrency: usize,
    shutdown: CancellationToken,
    handler: H,
) -> Result<(), BusError>
where
    H: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut in_flight = JoinSet::new();
    tracing::info!(consumer = spec.durable, concurrency, "worker started");
    tokio::spawn(report_backlog(
        consumer.clone(),
        spec.durable,
        shutdown.clone(),
    ));
    'pull: loop {
        while in_flight.try_join_next().is_some() {}
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let free = 1 + permits.available_permits();
        let pulled = tokio::select! {
            _ = shutdown.cancelled() => break,
            pulled = consumer.fetch().max_messages(free).expires(PULL_EXPIRES).messages() => pulled,
        };
        let mut batch = match pulled {
            Ok(batch) => batch,
            Err(error) => {
                // A pull that fails (NATS restarting, say) is tried again shortly.
                tracing::warn!(consumer = spec.durable, %error, "pull failed");
                drop(first);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let mut held = Some(first);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    release_pulled(&mut batch, spec.durable).await;
                    break 'pull;
                }
                next = batch.next() => next,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    tracing::warn!(consumer = spec.durable, %error, "pull stream error");
                    continue;
                }
                None => continue 'pull,
            };
            // The pull asked for no more messages than there were free permits.
            let permit = match held.take() {
                Some(permit) => permit,
                None => match permits.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        release(&message, spec.durable).await;
                        continue;
                    }
                },
            };
            let handler = handler.clone();
            let spec = spec.clone();
            in_flight.spawn(async move {
                handle_message(message, &spec, handler.as_ref()).await;
                drop(permit);
            });
        }
    }
    tracing::info!(
        consumer = spec.durable,
        in_flight = in_flight.len(),
        "worker stopping"
    );
    while in_flight.join_next().await.is_some() {}
    Ok(())
}

/// NAKs whatever a pull still brings after shutdown, so another worker takes it at once.
async fn release_pulled(batch: &mut pull::Batch, durable: &'static str) {
    let drain = async {
        while let Some(next) = batch.next().await {
            if let Ok(message) = next {
                release(&message, durable).await;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

async fn release(message: &jetstream::Message, durable: &'static str) {
    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
        tracing::warn!(consumer = durable, %error, "could not release a pulled message");
    }
}

/// Runs the handler on one message, with in-progress acks while it works, and settles the
/// message as the handler decided.
async fn handle_message<H, Fut>(message: jetstream::Message, spec: &ConsumerSpec, handler: &H)
where
    H: Fn(Delivery) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let durable = spec.durable;
    let (delivered, stream_sequence) = message
        .info()
        .map(|info| (info.delivered, info.stream_sequence))
        .unwrap_or((1, 0));
    let delivery = Delivery {
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
        delivered,
        last: spec.max_deliver > 0 && delivered >= spec.max_deliver,
        exhausted: spec.max_deliver > 0 && delivered > spec.max_deliver,
        stream_sequence,
    };
    let span = handle_span(&delivery, message.headers.as_ref());
    let started = std::time::Instant::now();
    let handling = handler(delivery).instrument(span);
    tokio::pin!(handling);
    let mut progress = tokio::time::interval(progress_interval(spec.ack_wait));
    progress.tick().await;
    let outcome = loop {
        tokio::select! {
            outcome = &mut handling => break outcome,
            _ = progress.tick() => {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::warn!(consumer = durable, %error, "in-progress ack failed");
                }
            }
        }
    };
    metrics::histogram!("rowsmith_handle_seconds", "consumer" => durable)
        .record(started.elapsed().as_secs_f64());
    let label = match &outcome {
        Outcome::Done => "done",
        Outcome::Retry { .. } => "retry",
        Outcome::Terminate { .. } => "terminate",
    };
    metrics::counter!("rowsmith_messages_total", "consumer" => durable, "outcome" => label)
        .increment(1);
    let ack = match &outcome {
        Outcome::Done => AckKind::Ack,
        Outcome::Retry { after } => AckKind::Nak(Some(*after)),
        Outcome::Terminate { reason } => {
            tracing::warn!(consumer = durable, reason, "message terminated");
            AckKind::Term
        }
    };
    if let Err(error) = message.ack_with(ack).await {
        tracing::warn!(consumer = durable, %error, "ack failed; the message will be redelivered");
    }
}

/// In-progress acks come every third of `ack_wait`, so two may be lost before it runs out.
pub fn progress_interval(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(Duration::from_millis(100))
}

/// The span a message is handled in: a child of the trace context the message carries,
/// with the job, shard and attempt when the payload names them.
fn handle_span(delivery: &Delivery, headers: Option<&async_nats::HeaderMap>) -> tracing::Span {
    #[derive(serde::Deserialize)]
    struct Names {
        job_id: Option<String>,
        key: Option<rowsmith_contract::messages::ShardKey>,
    }
    let names: Option<Names> = serde_json::from_slice(&delivery.payload).ok();
    let (job_id, key) = names.map(|n| (n.job_id, n.key)).unwrap_or_default();
    let job_id = job_id.or_else(|| key.as_ref().map(|k| k.job_id.clone()));
    let span = tracing::info_span!(
        "handle",
        subject = %delivery.subject,
        delivered = delivery.delivered,
        job_id = job_id.as_deref().unwrap_or(""),
        shard = key.as_ref().map(|k| k.shard),
        attempt = key.as_ref().map(|k| k.attempt),
    );
    crate::trace::set_parent_from(&span, headers);
    span
}

/// Publishes the consumer's backlog as gauges every 10 s.
async fn report_backlog(
    mut consumer: jetstream::consumer::Consumer<pull::Config>,
    durable: &'static str,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(info) = consumer.info().await {
            metrics::gauge!("rowsmith_consumer_pending", "consumer" => durable)
                .set(info.num_pending as f64);
            metrics::gauge!("rowsmith_consumer_ack_pending", "consumer" => durable)
                .set(info.num_ack_pending as f64);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_caps() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(4));
        assert_eq!(retry_delay(50), Duration::from_secs(30));
    }
}
